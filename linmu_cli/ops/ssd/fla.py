"""fla-core's ``chunk_simple_gla`` (Triton, CUDA only) as an SSD backend (docs/design.md §8).

fla imports on CPU but its kernels run only on CUDA; this module imports fla lazily, only when a scan on a CUDA
device asks for it. Its gated chunk backward is refused on Hopper with Triton < 3.7.1 except at key widths whose K
tile is not 64 (:func:`fla_backward_verdict`).
"""

from __future__ import annotations

import functools
import re

import torch

from linmu_cli.ops.ssd.utils import ResetPlan, check_inputs, require_cuda, split_segments


@functools.cache
def _import_fla():
    """Return fla's ``chunk_simple_gla`` (imports fla-core; call only when CUDA is available)."""
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla


def _parse_version(v: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    if not m:
        return (0, 0, 0)
    return tuple(int(g or 0) for g in m.groups())  # type: ignore[return-value]


def fla_dqkwg_block_k(key_dim: int, hopper: bool = True) -> int:
    """The K tile (BK) of fla 0.6.0's ``chunk_bwd_dqkwg`` on Hopper: min(max(next_pow2(K), 16), 128)."""
    tile = 16
    while tile < key_dim:
        tile *= 2
    return min(tile, 128 if hopper else 64)


def fla_backward_verdict(hopper: bool, triton_version: str, key_dim: int | None) -> tuple[bool, str, bool]:
    """(may run, why, needs fla's guard lifted) for fla's gated ``chunk_simple_gla`` backward.

    fla 0.6.0 raises in ``chunk_bwd_dqkwg`` (gated case) on Hopper with 3.4.0 <= Triton < 3.7.1 (fla issue #640).
    The miscompile behind it needs a K tile of 64: the issue's bisection on Hopper (sweeping fla's CONST_TILING)
    failed at BK = 64 and passed at 32 and 128, and fla tiles K at BK = min(next_pow2(K), 128) there. So for a key
    width whose tile is not 64 (K <= 32 or K > 64; Qwen2-VL's heads are 128) the guard is broader than the bug and
    linmu lifts it (`lift_fla_guard`); for 32 < K <= 64 it stays refused. The GPU tests compare fla's backward with
    the reference at K = 128 (tests/ops/test_ssd_gpu.py, tests/layers/test_mate_gpu.py)."""
    tv = _parse_version(triton_version)
    if not (hopper and (3, 4, 0) <= tv < (3, 7, 1)):
        return True, "ok", False
    if key_dim is not None and fla_dqkwg_block_k(key_dim) != 64:
        return (
            True,
            (
                f"ok: fla's issue-#640 guard lifted on Hopper with Triton {triton_version}: the miscompile needs a K "
                f"tile of 64, and K = {key_dim} tiles at {fla_dqkwg_block_k(key_dim)}"
            ),
            True,
        )
    return (
        False,
        (
            f"fla refuses the gated chunk backward on Hopper (sm_90) with Triton {triton_version} "
            f"(3.4.0 <= Triton < 3.7.1 miscompiles it at a K tile of 64, fla issue #640"
            + (f"; K = {key_dim} tiles at 64" if key_dim is not None else "")
            + "); upgrade Triton to >= 3.7.1 or use backend 'mamba' or 'torch' for training"
        ),
        False,
    )


def fla_backward_supported(
    device: torch.device | str, key_dim: int | None = None, lift: bool = False
) -> tuple[bool, str]:
    """Whether fla's gated ``chunk_simple_gla`` backward may run on ``device`` for keys of width ``key_dim``
    (None: any width, i.e. fla's own check), by :func:`fla_backward_verdict`; `lift`: also lift fla's guard
    where the verdict says it is broader than the bug (:func:`lift_fla_guard`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, "fla needs a CUDA device"
    import triton

    major, _minor = torch.cuda.get_device_capability(device)
    hopper = major == 9 or "NVIDIA H" in torch.cuda.get_device_name(device)
    ok, why, needs_lift = fla_backward_verdict(hopper, triton.__version__, key_dim)
    if lift and needs_lift:
        lift_fla_guard()
    return ok, why


@functools.cache
def lift_fla_guard() -> str:
    """Switch off fla's issue-#640 raise (process-wide: fla reads one module flag at call time), once, with a
    warning. Only :func:`select_ssd_backend` calls it, after :func:`fla_backward_verdict` allowed the key width."""
    import warnings

    from fla.ops.common import chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True
    msg = (
        "linmu: lifted fla's issue-#640 guard (fla.ops.common.chunk_o) for a gated backward whose K tile is not "
        "64; fla's own check stays off for the rest of this process"
    )
    warnings.warn(msg, stacklevel=2)
    return msg


def _fla_call(
    kernel, x, dt, A, B, C, reset=None, initial_state=None, chunk_size=None, return_final_state=False,
    plan: ResetPlan | None = None,
):  # fmt: skip
    """Map our SSD onto fla's ``chunk_simple_gla`` (``kernel``).

    fla: h_t = exp(g_t) h_{t-1} + k_t^T v_t, o_t = scale * q_t h_t, with q, k (B, T, H, K),
    v (B, T, H, V), g (B, T, H) and state [N, H, K, V]. Ours: q = C, k = B * dt, v = x,
    g = dt * A, scale = 1, K = n, V = p, so our state (b, h, p, n) is fla's transposed.
    Resets: rows are flattened to batch 1 and split at resets with ``cu_seqlens``; each
    segment gets its own initial state (the row's initial state for a row's first segment,
    zeros after a reset) and the final state of a row is that of its last segment.
    """
    dtype = x.dtype
    q = C.to(dtype)
    k = (B.float() * dt.float()[..., None]).to(dtype)
    g = dt.float() * A.float()[None, None, :]
    return _fla_run(kernel, q, k, x, g, 1.0, reset, initial_state, chunk_size, return_final_state, plan)


def _fla_run(kernel, q, k, v, g, scale, reset, initial_state, chunk_size, return_final_state, plan):
    """Call fla's kernel on prepared q, k, v, g; resets from ``plan`` (no sync) or from ``reset`` (one sync)."""
    b, T, h, p = v.shape
    dtype = v.dtype
    h0 = None
    if initial_state is not None:
        h0 = initial_state.float().transpose(-1, -2)  # (b, h, n, p) = fla [N, H, K, V]
    kw = {} if chunk_size is None else {"chunk_size": int(chunk_size)}

    if reset is None and plan is None:
        o, ht = kernel(
            q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=return_final_state, **kw
        )
        y = o.to(dtype)
    else:
        if plan is None:
            reset_cpu = reset.detach().to("cpu", torch.bool)  # host sync: pass a ResetPlan to avoid it
            cu, _starts, rows, first_of_row, last_idx = split_segments(reset_cpu, T)
            cu_dev = cu.to(v.device)
        else:
            cu, cu_dev, rows, first_of_row, last_idx = (
                plan.cu_seqlens_cpu, plan.cu_seqlens, plan.rows, plan.first_of_row, plan.last_idx
            )  # fmt: skip
        hs = None
        if h0 is not None:
            dev_rows = rows.to(h0.device)
            keep = first_of_row.to(h0.device)[:, None, None, None]
            hs = torch.where(keep, h0[dev_rows], torch.zeros((), dtype=h0.dtype, device=h0.device))
        o, ht = kernel(
            q.reshape(1, b * T, h, -1),
            k.reshape(1, b * T, h, -1),
            v.reshape(1, b * T, h, p),
            g=g.reshape(1, b * T, h),
            scale=scale,
            initial_state=hs,
            output_final_state=return_final_state,
            cu_seqlens=cu_dev,
            cu_seqlens_cpu=cu,
            **kw,
        )
        y = o.reshape(b, T, h, p).to(dtype)
        if return_final_state:
            ht = ht[last_idx.to(ht.device)]
    if return_final_state:
        return y, ht.float().transpose(-1, -2)
    return y


def ssd_fla(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD via fla-core's ``chunk_simple_gla`` (CUDA only). Same contract as :func:`ssd_chunked`.

    ``chunk_size`` None -> fla's default (64); must be a power of 2. The backward raises on
    Hopper with Triton < 3.7.1 (see :func:`fla_backward_supported`).
    """
    check_inputs(x, dt, A, B, C, reset, initial_state)
    require_cuda("fla", x, dt, A, B, C, initial_state)
    return _fla_call(_import_fla(), x, dt, A, B, C, reset, initial_state, chunk_size, return_final_state)


def fla_scan_gqa(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float,
    plan: ResetPlan | None,
    initial_state: torch.Tensor | None,
    cs: int,
    return_final_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The grouped scan on fla: v = x repeated, k = B repeated * dt and g = dt * A from one Triton launch
    (`linmu_cli.ops.scan_inputs`, with a one-launch backward), the query scale as fla's own ``scale``."""
    from linmu_cli.ops.scan_inputs import scan_inputs

    h = C.shape[2]
    dtype = x.dtype
    v, k, gate = scan_inputs(x, B, dt, A.float(), h)
    return _fla_run(_import_fla(), C.to(dtype), k, v, gate, scale, None, initial_state, cs,
                    return_final_state, plan)  # fmt: skip


__all__ = ["fla_backward_supported", "fla_scan_gqa", "ssd_fla"]

"""Mamba2 SSD (state-space duality) scan with a scalar decay per head.

Shapes (``b`` batch, ``l`` length, ``h`` heads, ``p`` head dim of the values, ``n`` state size):

* ``x``  (b, l, h, p)  values
* ``dt`` (b, l, h)     step sizes, already positive (the caller applies softplus)
* ``A``  (h,)          negative decay rates
* ``B``  (b, l, h, n)  "keys"
* ``C``  (b, l, h, n)  "queries"
* state ``S`` (b, h, p, n)

Recurrence::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t                                   # (b, l, h, p)

``reset`` (b, l) bool: where ``reset[b, t]`` is True the state is zeroed before step ``t``
(``S_{t-1} := 0``), i.e. a new sequence starts at ``t``. ``initial_state`` (b, h, p, n) is the
state before step 0 (it is dropped if ``reset[:, 0]`` is True). The final state is ``S_{l-1}``
in float32. A token with ``dt == 0`` and ``x == 0`` (padding) leaves the state unchanged.

Implementations:

* :func:`ssd_naive`   sequential loop in float32, the ground truth for tests.
* :func:`ssd_chunked` chunked SSD in pure PyTorch (CPU or GPU, differentiable, float32 math).
* :func:`ssd_fla`     CUDA only: fla-core's ``chunk_simple_gla`` (Triton).
* :func:`ssd_mamba`   CUDA only: mamba_ssm's ``mamba_chunk_scan_combined`` (Triton).

:func:`ssd_scan` dispatches by name (``select_ssd_backend``) and never silently falls back;
:func:`last_ssd_backend` tells which backend ran last. The CUDA libraries are imported lazily,
only when a CUDA device is involved, so this module is safe to import on a CPU-only machine.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass

import torch

from linmu_cli.errors import LinmuError

__all__ = [
    "SSD_BACKENDS",
    "SSDBackendError",
    "available_ssd_backends",
    "fla_backward_supported",
    "last_ssd_backend",
    "select_ssd_backend",
    "ssd_chunked",
    "ssd_fla",
    "ssd_mamba",
    "ssd_naive",
    "ResetPlan",
    "reset_plan",
    "ssd_scan",
    "ssd_scan_gqa",
]

SSD_BACKENDS = ("torch", "fla", "mamba")
_DEFAULT_CHUNK = {"torch": 64, "fla": 64, "mamba": 256}


class SSDBackendError(LinmuError, RuntimeError):
    """A requested SSD backend cannot run here (wrong device, missing package, unsupported op)."""


# --------------------------------------------------------------------------------------------
# shape checks
# --------------------------------------------------------------------------------------------


def _check_inputs(x, dt, A, B, C, reset, initial_state) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, T, h, p = x.shape
    if tuple(dt.shape) != (b, T, h):
        raise ValueError(f"dt must be {(b, T, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must be {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:3]) != (b, T, h):
        raise ValueError(f"B must be (b, l, h, n) = {(b, T, h)} + (n,), got {tuple(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    n = B.shape[-1]
    if reset is not None and tuple(reset.shape) != (b, T):
        raise ValueError(f"reset must be {(b, T)}, got {tuple(reset.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")


# --------------------------------------------------------------------------------------------
# reference implementations (CPU or GPU)
# --------------------------------------------------------------------------------------------


def ssd_naive(x, dt, A, B, C, reset=None, initial_state=None):
    """Sequential float32 loop over time. Returns ``(y, final_state)``, both float32."""
    _check_inputs(x, dt, A, B, C, reset, initial_state)
    b, T, h, p = x.shape
    n = B.shape[-1]
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    S = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n)
    ys = []
    for t in range(T):
        if reset is not None:
            S = torch.where(reset[:, t].to(torch.bool)[:, None, None, None], torch.zeros_like(S), S)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b, h, p, n)
        S = decay[..., None, None] * S + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, S


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``i > j`` and 0 elsewhere.

    Masked cumsum (as in mamba2's ``ssd_minimal``): no differences of large cumsums, no -inf;
    entries above the diagonal are 0 and must be masked by the caller.
    """
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    z = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)  # z[..., k, j] = a_k (k > j)
    return torch.cumsum(z, dim=-2)


def ssd_chunked(
    x,
    dt,
    A,
    B,
    C,
    reset=None,
    initial_state=None,
    chunk_size: int = 64,
    return_final_state: bool = False,
):
    """Chunked SSD in pure PyTorch; float32 math, ``y`` in ``x.dtype``.

    Returns ``y`` or ``(y, final_state)`` (final state float32, (b, h, p, n)).
    Resets are exact: contributions across a reset are multiplied by an exact 0 (segment ids
    from an integer cumsum of the reset flags), never approximated by a large negative decay.
    """
    _check_inputs(x, dt, A, B, C, reset, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, T, h, p = x.shape
    n = B.shape[-1]
    out_dtype = x.dtype
    dev = x.device
    cs = chunk_size
    nc = max(1, -(-T // cs))
    L = nc * cs
    pad = L - T

    xf, dtf, Bf, Cf = (t.float() for t in (x, dt, B, C))
    Af = A.float()
    if reset is None:
        rst = torch.zeros(b, T, dtype=torch.bool, device=dev)
    else:
        rst = reset.to(device=dev, dtype=torch.bool)
    if pad:
        # padding at the end: dt = 0, x = B = C = 0, no reset -> state unchanged, outputs dropped
        xf = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = torch.nn.functional.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = torch.nn.functional.pad(Cf, (0, 0, 0, 0, 0, pad))
        dtf = torch.nn.functional.pad(dtf, (0, 0, 0, pad))
        rst = torch.nn.functional.pad(rst, (0, pad), value=False)

    # segment id of every position: positions i, j (j <= i) interact iff no reset in (j, i]
    rid = torch.cumsum(rst.to(torch.int64), dim=1).view(b, nc, cs)  # (b, c, l)
    rid_last = rid[:, :, -1]  # (b, c) segment id at the end of each chunk
    rid_prev = torch.cat([rid.new_zeros(b, 1), rid_last[:, :-1]], dim=1)  # before each chunk
    same_seg = rid[:, :, :, None] == rid[:, :, None, :]  # (b, c, l, s)
    causal = torch.ones(cs, cs, dtype=torch.bool, device=dev).tril()
    intra_mask = (same_seg & causal).unsqueeze(1)  # (b, 1, c, l, s)
    to_end_mask = (rid == rid_last[:, :, None]).unsqueeze(1)  # (b, 1, c, s): reaches chunk end
    from_prev_mask = (rid == rid_prev[:, :, None]).unsqueeze(1)  # (b, 1, c, l): sees carried state
    carry_mask = (rid_last == rid_prev).unsqueeze(1)  # (b, 1, c): no reset inside the chunk

    xc = xf.view(b, nc, cs, h, p)
    Bc = Bf.view(b, nc, cs, h, n)
    Cc = Cf.view(b, nc, cs, h, n)
    dtc = dtf.view(b, nc, cs, h)
    a = (dtf * Af).view(b, nc, cs, h).permute(0, 3, 1, 2)  # (b, h, c, l) log decay per step, <= 0

    seg = _segsum(a)  # (b, h, c, l, s): sum_{k=s+1..l} a_k, all <= 0
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, l): sum_{k=0..l} a_k, all <= 0
    zero = a.new_zeros(())

    # 1) intra-chunk (quadratic) part
    Lmat = torch.where(intra_mask, torch.exp(seg), zero)  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * Lmat
    xdt = xc * dtc[..., None]  # (b, c, s, h, p)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2) state contributed by each chunk's own tokens, at the end of that chunk
    decay_to_end = torch.where(to_end_mask, torch.exp(seg[..., -1, :]), zero)  # (b, h, c, s)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay_to_end, xdt)

    # 3) pass states across chunks (exact resets via carry_mask)
    carry = torch.where(carry_mask, torch.exp(a_cum[..., -1]), zero)  # (b, h, c)
    if initial_state is not None:
        S = initial_state.to(device=dev, dtype=torch.float32)
    else:
        S = xf.new_zeros(b, h, p, n)
    prev_states = []
    for c in range(nc):
        prev_states.append(S)
        S = carry[:, :, c, None, None] * S + chunk_states[:, c]
    prev = torch.stack(prev_states, dim=1)  # (b, c, h, p, n): state before each chunk

    # 4) contribution of the carried state to each position
    decay_in = torch.where(from_prev_mask, torch.exp(a_cum), zero)  # (b, h, c, l)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev, decay_in)

    y = (y_diag + y_off).reshape(b, L, h, p)[:, :T].to(out_dtype)
    if return_final_state:
        return y, S
    return y


# --------------------------------------------------------------------------------------------
# CUDA backends (lazy imports)
# --------------------------------------------------------------------------------------------


def _require_cuda(name: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise SSDBackendError(
                f"SSD backend {name!r} needs CUDA tensors, got a tensor on {t.device}; "
                "use backend='torch' (ssd_chunked) on CPU"
            )


@functools.cache
def _import_fla():
    """Return fla's ``chunk_simple_gla`` (imports fla-core; call only when CUDA is available)."""
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla


@functools.cache
def _import_mamba():
    """Return mamba_ssm's ``mamba_chunk_scan_combined`` without running ``mamba_ssm/__init__``.

    The package ``__init__`` imports the compiled ``selective_scan_cuda`` extension (absent from a
    wheel built with ``MAMBA_SKIP_CUDA_BUILD=TRUE``) plus Mamba3 / model code we do not need. If
    ``mamba_ssm`` is not imported yet, we register a bare package module named ``mamba_ssm``
    whose ``__path__`` points at the installed package (found with ``importlib.util.find_spec``,
    which does not execute it), then import only ``mamba_ssm.ops.triton.ssd_combined``, which
    needs torch, triton, einops and packaging. Side effect: a later ``import mamba_ssm`` in the
    same process returns that bare package (its submodules still import normally).
    """
    name = "mamba_ssm.ops.triton.ssd_combined"
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'mamba_ssm' (pip install mamba-ssm)")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        pkg.__package__ = "mamba_ssm"
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
    return importlib.import_module(name).mamba_chunk_scan_combined


def _parse_version(v: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    if not m:
        return (0, 0, 0)
    return tuple(int(g or 0) for g in m.groups())  # type: ignore[return-value]


def fla_backward_supported(device) -> tuple[bool, str]:
    """Whether fla's gated ``chunk_simple_gla`` backward may run on ``device``.

    fla 0.6.0 raises in ``chunk_bwd_dqkwg`` (gated case) on Hopper GPUs with
    3.4.0 <= Triton < 3.7.1, which miscompile it (fla issue #640). Mirrors that check.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False, "fla needs a CUDA device"
    import triton

    major, _minor = torch.cuda.get_device_capability(device)
    hopper = major == 9 or "NVIDIA H" in torch.cuda.get_device_name(device)
    tv = _parse_version(triton.__version__)
    if hopper and (3, 4, 0) <= tv < (3, 7, 1):
        return False, (
            f"fla refuses the gated chunk backward on Hopper (sm_90) with Triton {triton.__version__} "
            "(3.4.0 <= Triton < 3.7.1 miscompiles it, fla issue #640); upgrade Triton to >= 3.7.1 "
            "or use backend 'mamba' or 'torch' for training"
        )
    return True, "ok"


@functools.cache
def _backend_import_error(name: str) -> str | None:
    """None if backend ``name`` imports, else the error text (cached). Only call with CUDA."""
    try:
        if name == "fla":
            _import_fla()
        elif name == "mamba":
            _import_mamba()
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"{type(e).__name__}: {e}"
    return None


def available_ssd_backends() -> dict[str, str]:
    """Backend name -> "ok" or the reason it is unusable here (for ``linmu doctor``)."""
    out = {"torch": "ok"}
    if not torch.cuda.is_available():
        from importlib import metadata

        for name, dist in (("fla", "fla-core"), ("mamba", "mamba-ssm")):
            try:
                ver = metadata.version(dist)
                out[name] = f"no CUDA device ({dist} {ver} is installed)"
            except metadata.PackageNotFoundError:
                out[name] = f"no CUDA device, and {dist} is not installed"
        return out
    for name in ("fla", "mamba"):
        err = _backend_import_error(name)
        out[name] = "ok" if err is None else err
    return out


def select_ssd_backend(device, requested: str = "auto", need_backward: bool = False) -> str:
    """Pick "torch", "fla" or "mamba" for ``device``; raise :class:`SSDBackendError` if
    an explicitly requested backend cannot run (never silently substitutes another one).

    ``auto`` on CUDA: mamba_ssm if it imports (its Triton SSD runs forward and backward on
    Hopper with Triton 3.6), else fla if it imports and (no backward is needed or
    :func:`fla_backward_supported`), else torch. On CPU always torch.
    """
    if requested not in ("auto", *SSD_BACKENDS):
        raise ValueError(f"unknown SSD backend {requested!r}; choose one of auto, {', '.join(SSD_BACKENDS)}")
    device = torch.device(device)
    if device.type != "cuda":
        if requested in ("auto", "torch"):
            return "torch"
        raise SSDBackendError(
            f"SSD backend {requested!r} needs a CUDA GPU but the device is {device}; "
            "use 'torch' or 'auto' on CPU"
        )
    if requested == "torch":
        return "torch"
    if requested in ("fla", "mamba"):
        err = _backend_import_error(requested)
        if err is not None:
            pkg = "fla-core" if requested == "fla" else "mamba-ssm"
            raise SSDBackendError(f"SSD backend {requested!r} is not importable ({pkg}): {err}")
        if requested == "fla" and need_backward:
            ok, why = fla_backward_supported(device)
            if not ok:
                raise SSDBackendError(why)
        return requested
    # auto
    if _backend_import_error("mamba") is None:
        return "mamba"
    if _backend_import_error("fla") is None and (not need_backward or fla_backward_supported(device)[0]):
        return "fla"
    return "torch"


def _split_segments(reset_cpu: torch.Tensor, T: int):
    """Flatten (b, l) rows and split them at row starts and reset positions.

    Returns (cu_seqlens (N+1,) int64, starts (N,), first_of_row (N,) bool: segment starts a row
    without a reset at t=0 (gets the initial state), last_idx (b,): segment ending each row).
    """
    b = reset_cpu.shape[0]
    is_start = reset_cpu.clone()
    is_start[:, 0] = True
    starts = is_start.reshape(-1).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([b * T], dtype=starts.dtype)])
    rows = starts // T
    first_of_row = (starts % T == 0) & ~reset_cpu[rows, 0]
    ends = cu[1:]
    last_idx = (ends % T == 0).nonzero().flatten()
    return cu, starts, rows, first_of_row, last_idx


@dataclass(frozen=True)
class ResetPlan:
    """Resets of a (b, l) scan prepared on the host once (per layout), so no scan reads them back.

    fla splits flattened rows with ``cu_seqlens`` (it needs a host copy too), mamba takes ``seq_idx``;
    building both from a host tensor once per forward keeps every layer free of host syncs
    (docs/design.md §6, issue 11).
    """

    reset: torch.Tensor  # (b, l) bool, on the device
    seq_idx: torch.Tensor  # (b, l) int32, on the device: cumsum of reset per row
    cu_seqlens: torch.Tensor  # (N + 1,) int64, on the device
    cu_seqlens_cpu: torch.Tensor  # the same on the host
    rows: torch.Tensor  # (N,) row of each piece, on the device
    first_of_row: torch.Tensor  # (N,) bool, on the device
    last_idx: torch.Tensor  # (b,) piece that ends each row, on the device


def reset_plan(reset_cpu: torch.Tensor, put=None) -> ResetPlan:
    """A :class:`ResetPlan` from a host (b, l) bool tensor; ``put`` moves a host tensor to the device."""
    put = put or (lambda t: t)
    reset_cpu = reset_cpu.to("cpu", torch.bool)
    cu, _starts, rows, first_of_row, last_idx = _split_segments(reset_cpu, reset_cpu.shape[1])
    seq_idx = torch.cumsum(reset_cpu.to(torch.int32), dim=1, dtype=torch.int32)
    return ResetPlan(put(reset_cpu), put(seq_idx), put(cu), cu, put(rows), put(first_of_row), put(last_idx))


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
            cu, _starts, rows, first_of_row, last_idx = _split_segments(reset_cpu, T)
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


def ssd_fla(x, dt, A, B, C, reset=None, initial_state=None, chunk_size=None, return_final_state=False):
    """SSD via fla-core's ``chunk_simple_gla`` (CUDA only). Same contract as :func:`ssd_chunked`.

    ``chunk_size`` None -> fla's default (64); must be a power of 2. The backward raises on
    Hopper with Triton < 3.7.1 (see :func:`fla_backward_supported`).
    """
    _check_inputs(x, dt, A, B, C, reset, initial_state)
    _require_cuda("fla", x, dt, A, B, C, initial_state)
    return _fla_call(_import_fla(), x, dt, A, B, C, reset, initial_state, chunk_size, return_final_state)


def _mamba_call(
    kernel, x, dt, A, B, C, reset=None, initial_state=None, chunk_size=None, return_final_state=False,
    plan: ResetPlan | None = None,
):  # fmt: skip
    """Map our SSD onto mamba_ssm's ``mamba_chunk_scan_combined`` (``kernel``).

    mamba: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n) with g = ngroups (= h here),
    initial_states (b, h, p, n) (same layout as ours), seq_idx (b, l) int32: tokens interact
    only when their seq_idx is equal; the initial state belongs to seq_idx == 0. So
    seq_idx = cumsum(reset) per row (a reset at t = 0 drops the initial state), exactly our
    semantics. No D, z, dt_bias, dt_softplus (dt is already positive).
    """
    dtype = x.dtype
    seq_idx = None
    if plan is not None:
        seq_idx = plan.seq_idx
    elif reset is not None:
        seq_idx = torch.cumsum(reset.to(device=x.device, dtype=torch.int32), dim=1, dtype=torch.int32)
        seq_idx = seq_idx.contiguous()
    init = initial_state.float() if initial_state is not None else None
    out = kernel(
        x,
        dt,
        A.float(),
        B.to(dtype),
        C.to(dtype),
        int(chunk_size or _DEFAULT_CHUNK["mamba"]),
        initial_states=init,
        seq_idx=seq_idx,
        return_final_states=return_final_state,
    )
    if return_final_state:
        y, final = out
        return y.to(dtype), final.float()
    return out.to(dtype)


def ssd_mamba(x, dt, A, B, C, reset=None, initial_state=None, chunk_size=None, return_final_state=False):
    """SSD via mamba_ssm's Triton ``mamba_chunk_scan_combined`` (CUDA only).

    ``chunk_size`` None -> 256 (mamba2's default). See :func:`_import_mamba` for how the package
    is imported without its compiled extension.
    """
    _check_inputs(x, dt, A, B, C, reset, initial_state)
    _require_cuda("mamba", x, dt, A, B, C, initial_state)
    return _mamba_call(_import_mamba(), x, dt, A, B, C, reset, initial_state, chunk_size, return_final_state)


_LAST_BACKEND: str | None = None


def last_ssd_backend() -> str | None:
    """Name of the backend that ran the most recent :func:`ssd_scan` call (None before any)."""
    return _LAST_BACKEND


def ssd_scan(
    x,
    dt,
    A,
    B,
    C,
    reset=None,
    initial_state=None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
):
    """Run the SSD scan on the backend chosen by :func:`select_ssd_backend`.

    A backward is considered needed when grad mode is on and any input requires grad. An
    explicitly named backend that cannot run raises :class:`SSDBackendError`; there is no
    silent fallback. ``chunk_size`` None -> the backend's default (torch 64, fla 64, mamba 256).
    """
    global _LAST_BACKEND
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_state)
    )
    name = select_ssd_backend(x.device, backend, need_backward=need_backward)
    fn = {"torch": ssd_chunked, "fla": ssd_fla, "mamba": ssd_mamba}[name]
    cs = chunk_size if chunk_size is not None else _DEFAULT_CHUNK[name]
    _LAST_BACKEND = name
    return fn(
        x,
        dt,
        A,
        B,
        C,
        reset=reset,
        initial_state=initial_state,
        chunk_size=cs,
        return_final_state=return_final_state,
    )


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, l, g, d) -> (b, l, heads, d), each group repeated heads // g times (= repeat_interleave)."""
    b, T, g, d = t.shape
    if g == heads:
        return t
    return t.unsqueeze(3).expand(b, T, g, heads // g, d).reshape(b, T, heads, d)


def ssd_scan_gqa(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float = 1.0,
    plan: ResetPlan | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
):
    """The SSD scan with grouped values / keys and the query scale folded in (Flex-MA's fast entry).

    x (b, l, g, p) and B (b, l, g, n) at key/value-head width (GQA, g divides h), C (b, l, h, n), dt (b, l, h):
    y = ssd(x repeated, dt, A, B repeated, C * scale). The repetition happens once, at the kernel's input,
    fused with work the kernel needs anyway (fla: k = B * dt, and its own ``scale``; mamba: x * scale), so
    everything before the scan (gathers, conv) stays at key/value width. Resets come from ``plan``
    (host-built: no sync). The torch backend is the reference: repeat, scale C, :func:`ssd_chunked`.
    """
    global _LAST_BACKEND
    b, T, h, n = C.shape
    need_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_state)
    )
    name = select_ssd_backend(x.device, backend, need_backward=need_backward)
    cs = chunk_size if chunk_size is not None else _DEFAULT_CHUNK[name]
    _LAST_BACKEND = name
    reset = plan.reset if plan is not None else None
    if name == "torch":
        return ssd_chunked(
            _expand_heads(x, h), dt, A, _expand_heads(B, h), C * scale, reset=reset, initial_state=initial_state,
            chunk_size=cs, return_final_state=return_final_state,
        )  # fmt: skip
    _require_cuda(name, x, dt, A, B, C, initial_state)
    g = B.shape[2]
    if name == "fla":
        dtype = x.dtype
        k = (B.unsqueeze(3) * dt.to(dtype).view(b, T, g, h // g, 1)).reshape(b, T, h, n)
        v = _expand_heads(x, h)
        gate = dt.float() * A.float()
        return _fla_run(_import_fla(), C.to(dtype), k, v, gate, scale, None, initial_state, cs,
                        return_final_state, plan)  # fmt: skip
    hx = x.shape[2]
    xs = x.unsqueeze(3).expand(b, T, hx, h // hx, x.shape[-1]) * scale  # repeat and scale in one kernel
    return _mamba_call(_import_mamba(), xs.reshape(b, T, h, -1), dt, A, _expand_heads(B, h), C, None,
                       initial_state, cs, return_final_state, plan)  # fmt: skip

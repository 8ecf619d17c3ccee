"""Flex-MA's output: gate, then per-head RMSNorm (docs/design.md §3), as a reference and one Triton kernel.

out = rmsnorm_per_head(y * silu(gate)) * weight. The reference computes it in float32 from y's dtype (what
Flex-MA always ran); on CUDA the gated RMSNorm of mamba-ssm (or fla-core, same kernel lineage) does the gate,
the per-head statistics and the scale in one pass, reading bf16 and writing bf16 (no float32 copies of the
activations), with its own backward.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

_LAST_NORM_BACKEND: str | None = None


def last_norm_backend() -> str | None:
    """ "mamba", "fla" or "torch": which path the most recent :func:`gated_rmsnorm` took; "skip_add" when the
    norm last ran fused with Flex-MA's adds (`linmu_cli.ops.skip_add.skip_gated_norm`)."""
    return _LAST_NORM_BACKEND


def note_norm_backend(name: str) -> None:
    """Record the path of a gated norm that ran outside :func:`gated_rmsnorm` (the fused skip add + norm)."""
    global _LAST_NORM_BACKEND
    _LAST_NORM_BACKEND = name


@functools.cache
def _norm_kernel() -> tuple[str, object] | None:
    """(name, rmsnorm_fn) of the first gated-norm kernel that imports (call only with CUDA), else None."""
    try:
        from linmu_cli.ops.ssd.mamba import _import_mamba

        _import_mamba()  # the bare mamba_ssm package (no compiled extension)
        return "mamba", importlib.import_module("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn
    except Exception:  # noqa: BLE001 - try the next provider
        pass
    try:
        return "fla", importlib.import_module("fla.modules.norm.layernorm_gated").rmsnorm_fn
    except Exception:  # noqa: BLE001 - none imports: the reference runs (and is reported)
        return None


def gated_rmsnorm_reference(
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    norm_heads: int | None = None,
) -> torch.Tensor:
    """y (B, L, H, d); gate (B, L, H*d) or None; weight (H*d,) -> (B, L, H, d) in y's dtype.

    `norm_heads` (MateConfig.output_norm_heads): only the first that many heads are normalised, the others keep
    their magnitude (gate and scale only); None: every head."""
    h, d = y.shape[-2:]
    if gate is not None:
        y = y * F.silu(gate).view(*y.shape)
    yf = y.float()
    n = h if norm_heads is None else norm_heads
    normed = yf[..., :n, :] * torch.rsqrt(yf[..., :n, :].pow(2).mean(-1, keepdim=True) + eps)
    yf = normed if n == h else torch.cat([normed, yf[..., n:, :]], dim=-2)
    return (yf * weight.float().view(h, d)).to(y.dtype)


def gated_rmsnorm(
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    fast: bool = True,
    norm_heads: int | None = None,
) -> torch.Tensor:
    """The fused kernel when `fast` on CUDA and one imports; else the reference (`last_norm_backend()`). Some heads
    left un-normalised (`norm_heads` < H) always run the reference: the fused kernels norm every group."""
    global _LAST_NORM_BACKEND
    mixed = norm_heads is not None and norm_heads != y.shape[-2]
    kernel = _norm_kernel() if fast and y.is_cuda and not mixed else None
    if kernel is None:
        _LAST_NORM_BACKEND = "torch"
        return gated_rmsnorm_reference(y, gate, weight, eps, norm_heads=norm_heads)
    name, fn = kernel
    _LAST_NORM_BACKEND = name
    shape = y.shape
    rows = y.reshape(-1, shape[-2] * shape[-1])
    gates = gate.reshape(-1, gate.shape[-1]) if gate is not None else None
    w = weight.to(y.dtype)
    outs = [
        fn(
            rows[i:j],
            w,
            None,
            z=gates[i:j] if gates is not None else None,
            eps=eps,
            group_size=shape[-1],
            norm_before_gate=False,
        )  # fmt: skip
        for i, j in int32_row_chunks(rows, gates)
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).view(shape)


_INT32_MAX = 2**31 - 1


def int32_row_chunks(*matrices: torch.Tensor | None) -> list[tuple[int, int]]:
    """Row ranges [i, j) of 2-D views whose every element offset fits in int32.

    mamba-ssm's / fla's gated-norm kernels address a row as `row * stride_row` in int32 (the program id times an
    int argument). The gate is a column slice of the block's fused projection GEMM (12,864 columns at 7B), so from
    ~167k tokens (1,300 frames) one call would overflow and read out of bounds; a call per chunk of rows starts
    each chunk at its own base pointer (64-bit on the host)."""
    present = [m for m in matrices if m is not None]
    n = present[0].shape[0]
    stride = max(max(m.stride(0), 1) for m in present)
    cols = max(m.shape[1] for m in present)
    step = max(1, (_INT32_MAX - cols) // stride)  # (step - 1) * stride + cols - 1 < 2^31 - 1
    return [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]


__all__ = ["gated_rmsnorm", "gated_rmsnorm_reference", "int32_row_chunks", "last_norm_backend"]

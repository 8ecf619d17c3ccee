"""The decoder's text rotary embedding (M-RoPE merged into cos / sin) of q and k: `naive.py` is the one
definition (transformers' math in the input dtype), `triton.py` one fused launch for q and k with its backward.
`apply_rotary` chooses; `last_rotary_backend()` says which ran. CPU never touches Triton."""

from __future__ import annotations

from types import ModuleType

import torch

from linmu_cli.ops.rotary.naive import rotary_naive, rotate_half

_LAST_ROTARY_BACKEND: str | None = None


def last_rotary_backend() -> str | None:
    """ "triton" or "torch": which path the most recent :func:`apply_rotary` took."""
    return _LAST_ROTARY_BACKEND


def _triton_impl() -> ModuleType:
    """The Triton module, imported on first use (triton is optional on CPU)."""
    from linmu_cli.ops.rotary import triton as impl

    return impl


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated: q (B, L, H, d), k (B, L, H_kv, d) (strided views welcome), cos / sin (B, L, d) or
    broadcastable to it. The Triton kernel when `fast` on CUDA (contiguous outputs, float32 math, its own
    backward), else the reference (`rotary_naive`)."""
    global _LAST_ROTARY_BACKEND
    _LAST_ROTARY_BACKEND = "triton" if fast and q.is_cuda else "torch"
    if _LAST_ROTARY_BACKEND == "triton":
        return _triton_impl().rotary_triton(q, k, cos, sin)
    return rotary_naive(q, cos, sin), rotary_naive(k, cos, sin)


__all__ = ["apply_rotary", "last_rotary_backend", "rotary_naive", "rotate_half"]

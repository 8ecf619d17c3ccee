"""Flex-MA's output adds, the backward scan's masked output and the D skip (`naive.py`: the definition; `triton.py`:
one launch, with a one-launch backward). `skip_add` chooses; CPU never touches Triton (the CPU and "torch" blocks
keep their two `addcmul`s in `FlexMA`, and never call it)."""

from __future__ import annotations

import torch

from linmu_cli.ops.skip_add.naive import skip_add_naive

_LAST_BACKEND: str | None = None


def last_skip_add_backend() -> str | None:
    """ "triton" or "torch": which path the most recent :func:`skip_add` took."""
    return _LAST_BACKEND


def skip_add(
    y: torch.Tensor,
    back: torch.Tensor | None,
    keep: torch.Tensor | None,
    x: torch.Tensor,
    D: torch.Tensor,
    fast: bool = True,
) -> torch.Tensor:
    """As :func:`skip_add_naive`; the Triton kernel when `fast` on CUDA (a contiguous output)."""
    global _LAST_BACKEND
    _LAST_BACKEND = "triton" if fast and y.is_cuda else "torch"
    if _LAST_BACKEND == "torch":
        return skip_add_naive(y, back, keep, x, D)
    from linmu_cli.ops.skip_add import triton as impl

    return impl.skip_add_triton(y, back, keep, x, D)


__all__ = ["last_skip_add_backend", "skip_add", "skip_add_naive"]

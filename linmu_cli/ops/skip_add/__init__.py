"""Flex-MA's output adds, the backward scan's masked output and the D skip, alone (`skip_add`) or followed by the
gate and per-head RMSNorm (`skip_gated_norm`) (`naive.py`: the definitions; `triton.py`: one launch each, with a
one-launch backward). The entries choose; CPU never touches Triton (the CPU and "torch" blocks keep their two
`addcmul`s and the reference norm in `FlexMA`, and never call them). `FlexMA`'s fast path calls `skip_add` then
mamba-ssm's gated norm; `skip_gated_norm` replaces both once the GPU has compared it (docs/benchmarks.md, row 21
of the optimization log)."""

from __future__ import annotations

import torch

from linmu_cli.ops.skip_add.naive import skip_add_naive, skip_gated_norm_naive

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


def skip_gated_norm(
    y: torch.Tensor,
    back: torch.Tensor | None,
    keep: torch.Tensor | None,
    x: torch.Tensor,
    D: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    fast: bool = True,
) -> torch.Tensor:
    """As :func:`skip_gated_norm_naive`; the Triton kernel when `fast` on CUDA (a contiguous output). The norm
    backend it reports (`linmu_cli.ops.gated_norm.last_norm_backend`) is "skip_add" on the kernel."""
    global _LAST_BACKEND
    from linmu_cli.ops import gated_norm

    _LAST_BACKEND = "triton" if fast and y.is_cuda else "torch"
    gated_norm.note_norm_backend("skip_add" if _LAST_BACKEND == "triton" else "torch")
    if _LAST_BACKEND == "torch":
        return skip_gated_norm_naive(y, back, keep, x, D, gate, weight, eps)
    from linmu_cli.ops.skip_add import triton as impl

    return impl.skip_gated_norm_triton(y, back, keep, x, D, gate, weight, eps)


__all__ = ["last_skip_add_backend", "skip_add", "skip_add_naive", "skip_gated_norm", "skip_gated_norm_naive"]

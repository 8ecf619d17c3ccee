"""The grouped SSD scan's per-head inputs from Flex-MA's key/value-width x and B (`naive.py`: the definition;
`triton.py`: one launch for v, k and g, with a one-launch backward). `scan_inputs` chooses; CPU never touches
Triton (the CPU and "torch" scans never call it: they repeat inside `ssd_chunked`'s reference)."""

from __future__ import annotations

import torch

from linmu_cli.ops.scan_inputs.naive import scan_inputs_naive

_LAST_BACKEND: str | None = None


def last_scan_inputs_backend() -> str | None:
    """ "triton" or "torch": which path the most recent :func:`scan_inputs` took."""
    return _LAST_BACKEND


def scan_inputs(
    x: torch.Tensor,
    B: torch.Tensor,
    dt: torch.Tensor | None,
    A: torch.Tensor | None,
    heads: int,
    x_scale: float = 1.0,
    dt_on_b: bool = True,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(v, k, g) as :func:`scan_inputs_naive`; the Triton kernel when `fast` on CUDA (contiguous outputs)."""
    global _LAST_BACKEND
    _LAST_BACKEND = "triton" if fast and x.is_cuda else "torch"
    if _LAST_BACKEND == "torch":
        return scan_inputs_naive(x, B, dt, A, heads, x_scale, dt_on_b)
    from linmu_cli.ops.scan_inputs import triton as impl

    return impl.scan_inputs_triton(x, B, dt, A, heads, x_scale, dt_on_b)


__all__ = ["last_scan_inputs_backend", "scan_inputs", "scan_inputs_naive"]

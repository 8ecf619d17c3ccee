"""The grouped SSD scan's kernel inputs, as PyTorch: the one definition the Triton kernel is tested against.

Flex-MA keeps x and B at key/value-head width up to the scan (docs/design.md §3); the Triton scans want every head:

* fla (`chunk_simple_gla`): v = x repeated, k = B repeated * dt, g = dt * A (``dt_on_b``);
* mamba (`mamba_chunk_scan_combined`, which has no query scale): x repeated * scale, B repeated.

float32 math, each output rounded once to x's dtype (g stays float32).
"""

from __future__ import annotations

import torch

from linmu_cli.ops.ssd.utils import expand_heads


def scan_inputs_naive(
    x: torch.Tensor,
    B: torch.Tensor,
    dt: torch.Tensor | None,
    A: torch.Tensor | None,
    heads: int,
    x_scale: float = 1.0,
    dt_on_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (b, l, g, p), B (b, l, g, n) at key/value width; dt (b, l, heads) float32 (needed with `dt_on_b`);
    A (heads,) or None -> (v (b, l, heads, p), k (b, l, heads, n), g (b, l, heads) float32 or None):
    v = rep(x) * x_scale, k = rep(B) * dt (`dt_on_b`) or rep(B), g = dt * A (with `dt_on_b` and A)."""
    dtype = x.dtype
    v = (expand_heads(x, heads).float() * x_scale).to(dtype)
    k = expand_heads(B, heads).float()
    if dt_on_b:
        k = k * dt.float()[..., None]
    g = dt.float() * A.float() if dt_on_b and A is not None else None
    return v, k.to(dtype), g


__all__ = ["scan_inputs_naive"]

"""Flex-MA's output adds, alone and followed by the gate and per-head RMSNorm (docs/design.md §3), as PyTorch: the
definitions the Triton kernels are tested against.

The forward scan's output y gets the segment-confined backward scan's output `back` where the per-token mask `keep`
holds (False at text tokens and at each segment's last token in scan order), then the D skip with x at key/value
width, broadcast over each group of heads (GQA: head h reads key/value head h // g). float32 math, rounded once to
y's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def skip_add_naive(
    y: torch.Tensor,
    back: torch.Tensor | None,
    keep: torch.Tensor | None,
    x: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """y (b, l, H, d); back (b, l, H, d) or None (no backward scan); keep per token ((b, l, 1, 1) or (b, l), a
    mask) or None (every token); x (b, l, H_kv, d); D (H,) -> y + keep back + D[h] x[h // g] (b, l, H, d) in
    y's dtype, g = H / H_kv."""
    bsz, length, heads, d = y.shape
    kv = x.shape[2]
    out = y.float()
    if back is not None:
        term = back.float()
        if keep is not None:
            term = term * keep.reshape(bsz, length, 1, 1).float()
        out = out + term
    skip = D.float().view(kv, heads // kv, 1) * x.float().unsqueeze(3)
    return (out + skip.reshape(bsz, length, heads, d)).to(y.dtype)


def skip_gated_norm_naive(
    y: torch.Tensor,
    back: torch.Tensor | None,
    keep: torch.Tensor | None,
    x: torch.Tensor,
    D: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The adds, then Flex-MA's gate and per-head RMSNorm (docs/design.md §3): s = skip_add_naive(...) (rounded to
    y's dtype, as the unfused path stores it), a = s silu(gate), out = a rsqrt(mean_d a^2 + eps) weight, float32
    math rounded once to y's dtype. gate (b, l, H d) or None; weight (H d,) -> (b, l, H, d)."""
    s = skip_add_naive(y, back, keep, x, D).float()
    h, d = s.shape[-2:]
    a = s * F.silu(gate.float()).view(*s.shape) if gate is not None else s
    a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    return (a * weight.float().view(h, d)).to(y.dtype)


__all__ = ["skip_add_naive", "skip_gated_norm_naive"]

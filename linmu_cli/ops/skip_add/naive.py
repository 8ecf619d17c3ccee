"""Flex-MA's output adds (docs/design.md §3), as PyTorch: the one definition the Triton kernel is tested against.

The forward scan's output y gets the segment-confined backward scan's output `back` where the per-token mask `keep`
holds (False at text tokens and at each segment's last token in scan order), then the D skip with x at key/value
width, broadcast over each group of heads (GQA: head h reads key/value head h // g). float32 math, rounded once to
y's dtype.
"""

from __future__ import annotations

import torch


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


__all__ = ["skip_add_naive"]

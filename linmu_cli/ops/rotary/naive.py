"""The text rotary embedding as Qwen2-VL's decoder applies it: the one definition the kernel is tested against.

`x * cos + rotate_half(x) * sin` in x's dtype, exactly transformers' `apply_multimodal_rotary_pos_emb` after the
rotary module merged the M-RoPE sections into cos / sin (so Local-Swin's keys are the teacher's, bit for bit).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (transformers' `rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, d); cos / sin (B, L, d) (or broadcastable to it), shared by every head."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


__all__ = ["rotary_naive", "rotate_half"]

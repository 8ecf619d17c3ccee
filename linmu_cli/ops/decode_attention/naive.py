"""Dense reference for q_len=1 decode attention over a static KV cache, in float32 (tests only).

The layout is `linmu_cli.teacher_decode`'s: a cache of `capacity` slots per (batch row, kv head) of which only
the first `valid_len` are valid (the rest may hold anything, NaN included); GQA query head i reads kv head
i // (Hq / Hkv) (transformers' `repeat_kv` order).
"""

from __future__ import annotations

import torch


def valid_lengths(valid_len: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """`valid_len` as a (batch,) long tensor (an int or a (1,) tensor applies to every row)."""
    if not isinstance(valid_len, torch.Tensor):
        valid_len = torch.tensor([int(valid_len)], device=device)
    return valid_len.to(device=device, dtype=torch.long).reshape(-1).expand(batch)


def decode_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_len: torch.Tensor | int,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T) v over each row's valid slots.

    Args:
        q: (B, Hq, 1, d) the current token's queries; k, v: (B, Hkv, capacity, d), Hq a multiple of Hkv.
        valid_len: (B,) or (1,) long (or an int): slots [0, valid_len) are attended; at least 1.
        scale: softmax scale (head_dim ** -0.5 by default).

    Returns:
        (B, Hq, 1, d) in q's dtype.
    """
    cap = k.shape[2]
    valid = (
        torch.arange(cap, device=q.device)[None, :] < valid_lengths(valid_len, q.shape[0], q.device)[:, None]
    )
    return masked_decode_attention_naive(q, k, v, valid, scale)


def masked_decode_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T) v over the slots where `valid` (B, capacity) bool is True, anywhere in the cache
    (Local-Swin's ring); shapes as `decode_attention_naive`. A row with no valid slot gives NaN (no caller has
    one: the ring always holds the token's own key)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    valid = valid[:, None, None, :]  # (B, 1, 1, cap)
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    vf = v.float().masked_fill(~valid.transpose(-1, -2), 0.0)  # garbage past the valid slots must not leak
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vf)
    return out.reshape(b, hq, 1, d).to(q.dtype)


__all__ = ["decode_attention_naive", "masked_decode_attention_naive", "valid_lengths"]

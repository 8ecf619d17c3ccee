"""Dense references for the windowed attentions: an explicit (L x L) mask and one masked softmax, in float32.

O(L^2) memory: for tests only. The batched implementations (`batched.py`) must equal these (docs/design.md §4).
Like them, every query sees at least itself, so no row of the softmax is empty.
"""

from __future__ import annotations

import torch


def masked_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale q k^T masked) v with every query's own key allowed.

    Args:
        q: (B, L, H, d) queries; k, v: (B, L, H_kv, d) (GQA: query head i reads key head i // (H / H_kv)).
        mask: (B, L, L) bool, True where query i may see key j.
        scale: the softmax scale.

    Returns:
        (B, L, H, d) in q's dtype.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    kf = k.float().repeat_interleave(heads // kv_heads, dim=2)
    vf = v.float().repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), kf) * scale
    eye = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~(mask | eye)[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), vf).to(q.dtype)


def window_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_id: torch.Tensor, scale: float
) -> torch.Tensor:
    """Full attention among the tokens of each window, zeros at tokens in no window.

    Args:
        q: (B, L, H, d); k, v: (B, L, H_kv, d).
        window_id: (B, L) long: tokens with equal ids >= 0 share a window; -1 (text, padding) is in none.
        scale: the softmax scale.

    Returns:
        (B, L, H, d): what `window_attention` returns without `out`.
    """
    inside = window_id >= 0
    mask = (window_id[:, :, None] == window_id[:, None, :]) & inside[:, :, None]
    return masked_attention_naive(q, k, v, mask, scale) * inside[..., None, None].to(q.dtype)


def sliding_window_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Causal attention of each position over the valid keys among the `window` ending at itself.

    Args:
        q: (B, H, N, d); k, v: (B, H_kv, N, d) (the layout `sliding_window_attention` takes).
        key_valid: (B, N) bool.
        window: keys a query sees, itself included.
        scale: the softmax scale.

    Returns:
        (B, H, N, d).
    """
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    rel = pos[:, None] - pos[None, :]
    mask = ((rel >= 0) & (rel < window))[None] & key_valid[:, None, :]
    out = masked_attention_naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale)
    return out.transpose(1, 2)


__all__ = ["masked_attention_naive", "sliding_window_attention_naive", "window_attention_naive"]

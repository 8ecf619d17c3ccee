"""Softmax attention restricted to local windows, as batched SDPA calls (no dense L x L masks).

Both functions allow every query to attend to itself, so a query whose other keys are all masked (padding)
gives a finite value instead of NaN; such outputs are discarded by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmu_cli.layers.layout import WindowPlan


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: WindowPlan,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full attention inside each window of `plan`.

    q (B, L, H, d), k / v (B, L, H_kv, d). Returns (B, L, H, d): the windowed output at vision positions, zeros
    elsewhere; or, given `out` (B, L, H, d), writes the vision positions into it (in place when it is contiguous)
    and returns it.
    """
    batch, length, heads, dim = q.shape
    flat = lambda x: x.reshape(batch * length, x.shape[2], dim)  # noqa: E731
    gather = lambda x: flat(x)[plan.index].transpose(1, 2)  # (n_windows, heads, size, d)  # noqa: E731
    size = plan.index.shape[1]
    mask = None  # all windows complete: a mask-free SDPA (same result; fused kernels take it)
    if not plan.full:
        mask = plan.valid[:, None, None, :] | torch.eye(size, dtype=torch.bool, device=q.device)
    att = _sdpa(gather(q), gather(k), gather(v), mask, scale).transpose(1, 2)  # (n_windows, size, H, d)
    result = (
        q.new_zeros(batch * length, heads, dim) if out is None else out.reshape(batch * length, heads, dim)
    )
    if plan.src is not None:  # integer scatter prepared on the host: no sync
        result[plan.dst] = att.reshape(-1, heads, dim)[plan.src].to(result.dtype)
    else:
        result[plan.index[plan.valid]] = att[plan.valid].to(result.dtype)
    return result.view(batch, length, heads, dim)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    window: int,
    scale: float,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of each position over the `window` keys ending at itself.

    q (B, H, N, d), k / v (B, H_kv, N, d), key_valid (B, N). Blocked: with blocks of size min(window, N), a
    query sees at most its own and the previous block, so cost is O(N * window), not O(N^2). `blocks` (rows,
    block numbers), e.g. from `TokenLayout.text_blocks(sliding_block(window, N))`, restricts the work to those
    query blocks; the other outputs are zeros.
    """
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    blk = min(window, n)
    nb = -(-n // blk)
    pad = nb * blk - n
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        key_valid = F.pad(key_valid, (0, pad), value=False)
    # keys of block i = blocks i-1 and i (a zero block in front of the first)
    kp, vp = F.pad(k, (0, 0, blk, 0)), F.pad(v, (0, 0, blk, 0))
    kvalid = F.pad(key_valid, (blk, 0), value=False)
    rel = blk + torch.arange(blk, device=q.device)[:, None] - torch.arange(2 * blk, device=q.device)[None, :]
    in_window = (rel >= 0) & (rel < window)
    if blocks is not None:  # only the listed query blocks: gather them (and their keys), scatter back
        rows, ids = blocks
        kb = kp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3)[rows, ids]  # (n, H_kv, 2blk, d)
        vb = vp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3)[rows, ids]
        kvb = kvalid.unfold(1, 2 * blk, blk)[rows, ids]  # (n, 2blk)
        qb = q.view(batch, heads, nb, blk, dim).transpose(1, 2)[rows, ids]  # (n, H, blk, d)
        mask = ((in_window[None] & kvb[:, None, :]) | (rel == 0)[None])[:, None]
        out = q.new_zeros(batch, nb, blk, heads, dim)  # token-major, so callers get (B, N, H, d) as a view
        out[rows, ids] = _sdpa(qb, kb, vb, mask, scale).transpose(1, 2)
        return out.view(batch, nb * blk, heads, dim)[:, :n].transpose(1, 2)
    kb = kp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3).reshape(batch * nb, kv_heads, 2 * blk, dim)
    vb = vp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3).reshape(batch * nb, kv_heads, 2 * blk, dim)
    kvb = kvalid.unfold(1, 2 * blk, blk)  # (B, nb, 2blk)
    qb = q.view(batch, heads, nb, blk, dim).transpose(1, 2).reshape(batch * nb, heads, blk, dim)
    mask = (in_window[None, None] & kvb[:, :, None, :]) | (rel == 0)[None, None]
    mask = mask.reshape(batch * nb, 1, blk, 2 * blk)
    out = _sdpa(qb, kb, vb, mask, scale)
    out = out.view(batch, nb, heads, blk, dim).transpose(1, 2).reshape(batch, heads, nb * blk, dim)
    return out[:, :, :n]


def sliding_block(window: int, n: int) -> int:
    """The block size `sliding_window_attention` uses for `n` positions (for `TokenLayout.text_blocks`)."""
    return min(window, n)

"""Softmax attention restricted to local windows, as batched SDPA calls (no dense L x L masks, docs/design.md §4).

Every function lets each query attend to itself, so a query whose other keys are all masked (padding) gives a
finite value instead of NaN; such outputs are discarded by the caller. `naive.py` is the dense reference. The
decode token alone has a Triton kernel on CUDA (`decode_attention(fast=True)`): one query over the ring.

Gathers are on flat row indices, never advanced indexing (`x[index]`): the backward of advanced indexing is a
sort-based `index_put_(accumulate=True)` that cost 246 of a layer's 371 ms forward + backward at 65k tokens on
an H200 (docs/benchmarks.md). `window_attention`'s gathers go further (`ops/gather.py`): their backward copies
the valid slots' gradient back with the plan's `src` -> `dst` map instead of `index_select`'s atomic
`index_add_`; the text-block gathers, whose key rows repeat, keep `index_select`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from linmu_cli.ops.gather import gather_slots, select_slots

if TYPE_CHECKING:  # the plan is built by the layout (layers/layout.py); ops only read its index tensors
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
    """Full attention inside each window of `plan`, all windows in one SDPA call.

    Args:
        q: (B, L, H, d) queries; k, v: (B, L, H_kv, d) keys / values (GQA: H_kv divides H).
        plan: the padded windows (`TokenLayout.window_plan`): `index` into the flattened (B*L) chunk, `valid`
            slots, and the host-built scatter `src` -> `dst`.
        scale: the softmax scale.
        out: (B, L, H, d) or None; given, the vision positions are written into it (in place when contiguous).

    Returns:
        (B, L, H, d): the windowed output at vision positions; zeros (or `out`'s values) elsewhere.
    """
    batch, length, heads, dim = q.shape
    n_windows, size = plan.index.shape

    def gather(x: torch.Tensor) -> torch.Tensor:  # (n_windows, heads, size, d)
        flat = gather_slots(x.reshape(batch * length, x.shape[2], dim), plan.index, plan.src, plan.dst)
        return flat.view(n_windows, size, x.shape[2], dim).transpose(1, 2)

    mask = None  # all windows complete: a mask-free SDPA (same result; fused kernels take it)
    if not plan.full:
        mask = plan.valid[:, None, None, :] | torch.eye(size, dtype=torch.bool, device=q.device)
    att = _sdpa(gather(q), gather(k), gather(v), mask, scale).transpose(1, 2)  # (n_windows, size, H, d)
    result = (
        q.new_zeros(batch * length, heads, dim) if out is None else out.reshape(batch * length, heads, dim)
    )
    # integer scatter prepared on the host: no sync
    result[plan.dst] = select_slots(att.reshape(-1, heads, dim), plan.src).to(result.dtype)
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
    """Causal attention of each position over the `window` keys ending at itself (text tokens, docs/design.md §4).

    Blocked: with blocks of size min(window, N), a query sees at most its own and the previous block, so the
    cost is O(N * window), not O(N^2).

    Args:
        q: (B, H, N, d) queries; k, v: (B, H_kv, N, d).
        key_valid: (B, N) bool, False at padding (a query still sees itself).
        window: keys a query sees, itself included.
        scale: the softmax scale.
        blocks: (rows, block numbers) of the query blocks to compute, e.g. from
            `TokenLayout.text_blocks(sliding_block(window, N))`; None: all.

    Returns:
        (B, H, N, d); outside `blocks` zeros.
    """
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    blk = min(window, n)
    nb = -(-n // blk)
    rel = blk + torch.arange(blk, device=q.device)[:, None] - torch.arange(2 * blk, device=q.device)[None, :]
    in_window = (rel >= 0) & (rel < window)
    if blocks is not None:
        return _selected_blocks(q, k, v, key_valid, blk, in_window, rel == 0, scale, blocks)
    pad = nb * blk - n
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        key_valid = F.pad(key_valid, (0, pad), value=False)
    # keys of block i = blocks i-1 and i (a zero block in front of the first)
    kvalid = F.pad(key_valid, (blk, 0), value=False)
    kp, vp = F.pad(k, (0, 0, blk, 0)), F.pad(v, (0, 0, blk, 0))
    kb = kp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3).reshape(batch * nb, kv_heads, 2 * blk, dim)
    vb = vp.unfold(2, 2 * blk, blk).permute(0, 2, 1, 4, 3).reshape(batch * nb, kv_heads, 2 * blk, dim)
    kvb = kvalid.unfold(1, 2 * blk, blk)  # (B, nb, 2blk)
    qb = q.view(batch, heads, nb, blk, dim).transpose(1, 2).reshape(batch * nb, heads, blk, dim)
    mask = (in_window[None, None] & kvb[:, :, None, :]) | (rel == 0)[None, None]
    mask = mask.reshape(batch * nb, 1, blk, 2 * blk)
    out = _sdpa(qb, kb, vb, mask, scale)
    out = out.view(batch, nb, heads, blk, dim).transpose(1, 2).reshape(batch, heads, nb * blk, dim)
    return out[:, :, :n]


def _selected_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, blk: int,
                     in_window: torch.Tensor, itself: torch.Tensor, scale: float,
                     blocks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """`sliding_window_attention` on the listed query blocks only (text tokens inside a long video).

    Each block's queries and its 2 * blk keys are gathered by flat token row from the callers' token-major
    tensors (no padded copies): rows outside [0, N) are clamped to the edge and masked out (keys) or
    discarded (queries), so the result and its gradient are exact. `in_window`, `itself`: (blk, 2blk) masks.
    """
    batch, heads, n, dim = q.shape
    nb = -(-n // blk)
    rows, ids = blocks
    n_sel = rows.shape[0]
    key_pos = ((ids - 1) * blk)[:, None] + torch.arange(
        2 * blk, device=q.device
    )  # (n, 2blk), may be < 0 or >= N
    query_pos = (ids * blk)[:, None] + torch.arange(blk, device=q.device)  # (n, blk), may be >= N
    key_rows = rows[:, None] * n + key_pos.clamp(0, n - 1)
    query_rows = rows[:, None] * n + query_pos.clamp(max=n - 1)

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (B, h, N, d) -> (n, h, index cols, d)
        flat = x.transpose(1, 2).reshape(batch * n, x.shape[1], dim).index_select(0, index.reshape(-1))
        return flat.view(n_sel, index.shape[1], x.shape[1], dim).transpose(1, 2)

    key_ok = (key_pos >= 0) & (key_pos < n) & key_valid.reshape(-1)[key_rows]
    mask = ((in_window[None] & key_ok[:, None, :]) | itself[None])[:, None]  # (n, 1, blk, 2blk)
    att = _sdpa(take(q, query_rows), take(k, key_rows), take(v, key_rows), mask, scale)
    out = q.new_zeros(batch, nb, blk, heads, dim)  # token-major, so callers get (B, N, H, d) as a view
    out[rows, ids] = att.transpose(1, 2)
    return out.view(batch, nb * blk, heads, dim)[:, :n].transpose(1, 2)


def sliding_block(window: int, n: int) -> int:
    """The block size `sliding_window_attention` uses for `n` positions (for `TokenLayout.text_blocks`)."""
    return min(window, n)


_LAST_DECODE_BACKEND: str | None = None


def last_decode_backend() -> str | None:
    """ "triton" or "sdpa": which path the most recent :func:`decode_attention` took."""
    return _LAST_DECODE_BACKEND


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    fast: bool = False,
) -> torch.Tensor:
    """One query token per row over a set of cached keys (the decode step of the text window, over its ring).

    The H / H_kv query heads sharing a key head are laid out as H / H_kv query positions of that head (GQA
    without repeating K / V). With `fast` on CUDA outside autograd that runs as the masked split-KV Triton kernel
    (`ops/decode_attention`'s `masked_split_kv_decode`: one launch, plus a merge when the ring is split; the
    validity is read on the device, CUDA-graph safe); otherwise, and whenever autograd records the step (the
    kernel has no backward), as one masked multi-head SDPA call (fused CUDA kernels; no `enable_gqa` with a mask).
    `last_decode_backend()` says which ran.

    Args:
        q: (B, 1, H, d); keys, values: (B, H_kv, R, d); key_valid: (B, R) bool.
        scale: the softmax scale.
        fast: allow the Triton kernel (the block's `fast_kernels`).

    Returns:
        (B, 1, H, d).
    """
    global _LAST_DECODE_BACKEND
    bsz, _, heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(bsz, kv_heads, heads // kv_heads, dim)
    recorded = torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad)
    _LAST_DECODE_BACKEND = "triton" if fast and q.is_cuda and not recorded else "sdpa"
    if _LAST_DECODE_BACKEND == "triton":
        from linmu_cli.ops.decode_attention.triton import masked_split_kv_decode  # triton: CUDA only

        out = masked_split_kv_decode(grouped, keys, values, key_valid, scale=scale)
    else:
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=key_valid[:, None, None, :],
                                             scale=scale)  # fmt: skip
    return out.reshape(bsz, 1, heads, dim)


__all__ = [
    "decode_attention",
    "last_decode_backend",
    "sliding_block",
    "sliding_window_attention",
    "window_attention",
]

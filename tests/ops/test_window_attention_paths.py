"""Local-Swin's attentions (docs/design.md §4) against the dense masked-softmax references of
`linmu_cli.ops.window_attention.naive`: 3D windows (shifted, partial at the borders, several segments of
different grids padded into one plan, rows with left padding, GQA), the blocked causal text window (padding,
windows larger and smaller than the chunk, the text-block restriction) and the one-token decode attention."""

from __future__ import annotations

import pytest
import torch
from helpers import autograd_nodes

from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.ops.window_attention import (
    decode_attention,
    masked_attention_naive,
    sliding_block,
    sliding_window_attention,
    sliding_window_attention_naive,
    window_attention,
    window_attention_naive,
)


def swin_window_ids(segments: list[list[Segment]], length: int, window, shifted: bool) -> torch.Tensor:
    """(B, L) window id of every token, -1 outside segments, from the grid alone (not from the layout's plan):
    the window is clipped to the grid; a shifted partition moves by half a window where the grid is larger than
    the window, so the borders get partial windows (no cyclic roll)."""
    ids = torch.full((len(segments), length), -1, dtype=torch.long)
    next_id = 0
    for row, segs in enumerate(segments):
        for s in segs:
            sizes = (s.t, s.h, s.w)
            win = [min(w, n) for w, n in zip(window, sizes, strict=True)]
            shift = [w // 2 if shifted and n > w else 0 for w, n in zip(win, sizes, strict=True)]
            keys: dict[tuple[int, int, int], int] = {}
            for t in range(s.t):
                for h in range(s.h):
                    for w in range(s.w):
                        key = tuple((c + sh) // wn for c, sh, wn in zip((t, h, w), shift, win, strict=True))
                        if key not in keys:
                            keys[key], next_id = next_id, next_id + 1
                        ids[row, s.start + (t * s.h + h) * s.w + w] = keys[key]
    return ids


def layout_of(segments, length, valid=None):
    layout = TokenLayout.text_only(len(segments), length, torch.device("cpu"), valid)
    layout.segments = segments
    return layout


SEGMENTS = {
    "one-complete": ([[Segment(1, 2, 4, 4)]], 34, [2, 2, 2]),
    "partial-borders": ([[Segment(3, 3, 5, 6)]], 3 + 90 + 2, [2, 2, 4]),
    "grids-differ-padded-plan": (
        [[Segment(0, 1, 2, 2), Segment(4, 4, 2, 2), Segment(21, 2, 3, 3)]],
        40,
        [2, 2, 2],
    ),
    "window-larger-than-grid": ([[Segment(2, 1, 3, 2)]], 9, [4, 8, 8]),
    "left-padded-batch": (
        [[Segment(2, 2, 3, 4)], [Segment(7, 2, 3, 4), Segment(31, 1, 2, 2)]],
        36,
        [2, 2, 2],
    ),
}


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("name", list(SEGMENTS))
def test_window_attention_equals_the_dense_reference(name, shifted):
    segments, length, window = SEGMENTS[name]
    batch = len(segments)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[1, :5] = False  # left padding: text positions in front of row 1's segments
    layout = layout_of(segments, length, valid)
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(batch, length, 4, 8),
        torch.randn(batch, length, 2, 8),
        torch.randn(batch, length, 2, 8),
    )
    ids = swin_window_ids(segments, length, window, shifted)
    want = window_attention_naive(q, k, v, ids, 0.3)
    plan = layout.window_plan(window, shifted)
    torch.testing.assert_close(window_attention(q, k, v, plan, 0.3), want, atol=1e-5, rtol=1e-5)
    # given `out`, the vision positions are written over it and everything else is kept
    base = torch.randn(batch, length, 4, 8)
    got = window_attention(q, k, v, plan, 0.3, out=base.clone())
    vision = ids >= 0
    torch.testing.assert_close(got[vision], want[vision], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[~vision], base[~vision])


def test_reference_windows_match_the_layout_partition():
    """The grid-only window ids above and the layout's plan describe the same partition (shifted included)."""
    for segments, length, window in SEGMENTS.values():
        for shifted in (False, True):
            plan = layout_of(segments, length).window_plan(window, shifted)
            ids = swin_window_ids(segments, length, window, shifted).reshape(-1)
            for row, ok in zip(plan.index, plan.valid, strict=True):
                assert len(set(ids[row[ok]].tolist())) == 1  # one plan window = one reference window
            assert int(plan.valid.sum()) == int((ids >= 0).sum())  # every vision token in exactly one


@pytest.mark.parametrize("window", [1, 3, 6, 40, 100])
@pytest.mark.parametrize("n", [1, 17, 40])
def test_sliding_window_equals_the_dense_causal_reference(window, n):
    torch.manual_seed(window + n)
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    key_valid = torch.ones(2, n, dtype=torch.bool)
    key_valid[1, : n // 3] = False  # left padding: never a key, except to itself
    want = sliding_window_attention_naive(q, k, v, key_valid, window, 0.3)
    got = sliding_window_attention(q, k, v, key_valid, window, 0.3)
    valid_q = key_valid[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got[valid_q], want[valid_q], atol=1e-5, rtol=1e-5)


def test_sliding_window_restricted_to_text_blocks_equals_the_dense_reference_at_text():
    segments = [[Segment(3, 2, 4, 4)], [Segment(10, 1, 4, 4), Segment(26, 1, 2, 4)]]
    layout = layout_of(segments, 40)
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    got = sliding_window_attention(q, k, v, valid, 6, 0.3, layout.text_blocks(sliding_block(6, 40)))
    want = sliding_window_attention_naive(q, k, v, valid, 6, 0.3)
    text = ~layout.is_vision()
    torch.testing.assert_close(got.transpose(1, 2)[text], want.transpose(1, 2)[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_text_block_attention_gradients_equal_the_reference_without_advanced_indexing(padded):
    """The text-block path's values and input gradients at text queries equal the dense reference's (partial
    last block, keys before the first block, left padding), and its gathers are index_select: the backward of
    advanced indexing (`IndexBackward0`, a sort-based accumulate) cost 246 ms per layer at 65k tokens."""
    segments = [[Segment(3, 2, 4, 4)], [Segment(10, 1, 4, 4), Segment(26, 1, 2, 4)]]
    valid = torch.ones(2, 40, dtype=torch.bool)
    if padded:
        valid[1, :5] = False
    layout = layout_of(segments, 40, valid)
    torch.manual_seed(3)
    leaves = [torch.randn(2, h, 40, 8, requires_grad=True) for h in (4, 2, 2)]
    got = sliding_window_attention(*leaves, valid, 6, 0.3, layout.text_blocks(sliding_block(6, 40)))
    want = sliding_window_attention_naive(*leaves, valid, 6, 0.3)
    assert "IndexBackward0" not in autograd_nodes(got)
    keep = (~layout.is_vision() & valid)[:, None, :, None].to(got.dtype)
    cotangent = torch.randn_like(got) * keep
    g_got = torch.autograd.grad(got, leaves, cotangent)
    g_want = torch.autograd.grad(want, leaves, cotangent)
    torch.testing.assert_close(got * keep, want * keep, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_attention_gradients_equal_the_reference_without_advanced_indexing():
    segments, length, window = SEGMENTS["partial-borders"]
    layout = layout_of(segments, length)
    torch.manual_seed(4)
    q = torch.randn(1, length, 4, 8, requires_grad=True)
    k, v = (torch.randn(1, length, 2, 8, requires_grad=True) for _ in range(2))
    plan = layout.window_plan(window, True)
    got = window_attention(q, k, v, plan, 0.3)
    assert "IndexBackward0" not in autograd_nodes(got)
    ids = swin_window_ids(segments, length, window, True)
    want = window_attention_naive(q, k, v, ids, 0.3)
    vision = (ids >= 0)[..., None, None].to(got.dtype)
    cotangent = torch.randn_like(got) * vision
    for a, b in zip(torch.autograd.grad(got, (q, k, v), cotangent), torch.autograd.grad(want, (q, k, v), cotangent),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_attention_equals_the_dense_reference_for_its_one_query():
    torch.manual_seed(2)
    b, heads, kv_heads, r, d = 3, 4, 2, 7, 8
    q = torch.randn(b, 1, heads, d)
    keys, values = torch.randn(b, kv_heads, r, d), torch.randn(b, kv_heads, r, d)
    key_valid = torch.ones(b, r, dtype=torch.bool)
    key_valid[1, :4] = False
    key_valid[:, -1] = True  # the query's own key, last in the ring
    got = decode_attention(q, keys, values, key_valid, 0.3)
    # the dense reference over r positions, with the query placed at the last one
    qs = torch.cat([torch.zeros(b, r - 1, heads, d), q], dim=1)
    mask = key_valid[:, None, :].expand(b, r, r)
    want = masked_attention_naive(qs, keys.transpose(1, 2), values.transpose(1, 2), mask, 0.3)[:, -1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

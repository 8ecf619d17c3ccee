"""The row gathers of `linmu_cli.ops.gather`: float64 gradcheck, the same values and gradients as the plain
`index_select` they replace (with a zero gradient at padded slots), and the M-MATE scan and window attention
built on them: no `IndexSelectBackward0` (zero fill plus atomic `index_add_`) left for those gathers."""

from __future__ import annotations

import torch
from helpers import autograd_nodes
from torch.autograd import gradcheck, gradgradcheck
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.layers.mate import MateAttention
from linmu_cli.ops.gather import gather_slots, permute_rows, select_slots
from linmu_cli.ops.window_attention import window_attention


def padded_plan() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, valid, src, dst) over 9 rows: padding repeats a row, row 8 (text) is in no window."""
    index = torch.tensor([[0, 1, 2, 0], [3, 4, 5, 6], [7, 7, 7, 7]])
    valid = torch.tensor([[True, True, True, False], [True] * 4, [True, False, False, False]])
    src = valid.reshape(-1).nonzero().squeeze(1)
    return index, valid, src, index.reshape(-1)[src]


def test_permute_rows_gradcheck_and_equals_index_select():
    torch.manual_seed(0)
    index = torch.randperm(7)
    inverse = torch.argsort(index)
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: permute_rows(t, index, inverse), (x,))
    assert gradgradcheck(lambda t: permute_rows(t, index, inverse), (x,))
    got, want = permute_rows(x, index, inverse), x.index_select(0, index)
    assert torch.equal(got, want)
    cot = torch.randn_like(got)
    assert torch.equal(*(torch.autograd.grad(y, x, cot)[0] for y in (got, want)))


def test_gather_slots_gradcheck_and_equals_index_select_with_zero_gradient_at_padding():
    torch.manual_seed(1)
    index, valid, src, dst = padded_plan()
    keep = valid.reshape(-1, 1, 1).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return gather_slots(t, index, src, dst) * keep

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))
    got, want = gather_slots(x, index, src, dst), x.index_select(0, index.reshape(-1))
    assert torch.equal(got, want)
    cot = torch.randn_like(got) * keep
    g_got, g_want = (torch.autograd.grad(y, x, cot)[0] for y in (got, want))
    assert torch.equal(g_got, g_want)
    assert not g_got[8].any()  # the row no window reads


def test_select_slots_gradcheck_and_equals_index_select():
    torch.manual_seed(2)
    _, _, src, _ = padded_plan()
    att = torch.randn(12, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: select_slots(t, src), (att,))
    assert gradgradcheck(lambda t: select_slots(t, src), (att,))
    got, want = select_slots(att, src), att.index_select(0, src)
    assert torch.equal(got, want)
    cot = torch.randn_like(got)
    assert torch.equal(*(torch.autograd.grad(y, att, cot)[0] for y in (got, want)))


def layout_of(segments: list[list[Segment]], length: int) -> TokenLayout:
    valid = torch.ones(len(segments), length, dtype=torch.bool)
    valid[1, :2] = False
    layout = TokenLayout.text_only(len(segments), length, torch.device("cpu"), valid)
    layout.segments = segments
    return layout


LAYOUT = ([[Segment(3, 2, 2, 3), Segment(17, 3, 1, 2)], [Segment(5, 2, 3, 2)]], 27)


def test_window_attention_gathers_have_no_index_select_backward_and_match_index_select():
    layout = layout_of(*LAYOUT)
    plan = layout.window_plan([2, 2, 2], True)
    assert not plan.full
    torch.manual_seed(3)
    q = torch.randn(2, 27, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 27, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = window_attention(q, k, v, plan, 0.3)
    names = autograd_nodes(got)
    assert "IndexSelectBackward0" not in names
    assert {"_GatherSlotsBackward", "_SelectSlotsBackward"} <= names

    def plain(x: torch.Tensor) -> torch.Tensor:  # the previous gather
        flat = x.reshape(54, x.shape[2], 8).index_select(0, plan.index.reshape(-1))
        return flat.view(*plan.index.shape, x.shape[2], 8).transpose(1, 2)

    mask = plan.valid[:, None, None, :] | torch.eye(plan.index.shape[1], dtype=torch.bool)
    att = torch.nn.functional.scaled_dot_product_attention(
        plain(q), plain(k), plain(v), attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    want = q.new_zeros(54, 4, 8)
    want[plan.dst] = att.reshape(-1, 4, 8).index_select(0, plan.src)
    want = want.view(2, 27, 4, 8)
    assert torch.equal(got, want)
    cot = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), cot), torch.autograd.grad(want, (q, k, v), cot),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_flex_scan_order_gathers_have_no_index_select_backward():
    config = Qwen2VLTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, num_hidden_layers=2, vocab_size=50)  # fmt: skip
    torch.manual_seed(4)
    block = MateAttention(config, MateConfig(bidirectional=False).validate(), 1)  # layer 1 scans "twh"
    layout = layout_of(*LAYOUT)
    assert layout.scan_gather("twh") is not None
    y = block.flex(torch.randn(2, 27, 32), layout, 1, None)
    names = autograd_nodes(y)
    assert "IndexSelectBackward0" not in names and "_PermuteRowsBackward" in names

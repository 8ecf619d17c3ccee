"""One M-MATE block against the formulas of docs/design.md §3-5, and its causality rules."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.layout import Segment, TokenLayout, scan_permutation
from linmu_cli.layers.mate import MateAttention

HIDDEN, HEADS, KV, D = 32, 4, 2, 8


def text_config():
    return Qwen2VLTextConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV,
                             intermediate_size=64, num_hidden_layers=2, vocab_size=50)  # fmt: skip


def make_block(layer_idx=0, **mate):
    torch.manual_seed(0)
    block = MateAttention(text_config(), MateConfig(**mate).validate(), layer_idx)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        if hasattr(block, "flex"):
            block.flex.init_new_parameters(0.3)
            block.flex.dt_bias.normal_(0, 0.5)
            if block.mate.bidirectional:
                block.flex.dt_bias_bwd.normal_(0, 0.5)
    return block.eval()


def layout_of(segments, length, batch=1):
    layout = TokenLayout.text_only(batch, length, torch.device("cpu"))
    layout.segments = segments
    return layout


def rope(length):
    torch.manual_seed(1)
    angles = torch.randn(1, length, D // 2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def run(block, u, layout):
    return block(u, position_embeddings=rope(u.shape[1]), linmu_layout=layout)[0]


def naive_flex(flex, u, layout, layer_idx):
    """Flex-MA written straight from the formulas, token by token (no conv)."""
    m, h, d = flex.mate, flex.heads, flex.head_dim
    g = h // flex.kv_heads
    x = flex.v_proj(u).view(*u.shape[:2], flex.kv_heads, d).repeat_interleave(g, 2)[0]
    b = flex.k_proj(u).view(*u.shape[:2], flex.kv_heads, d).repeat_interleave(g, 2)[0]
    c = flex.q_proj(u).view(*u.shape[:2], h, d)[0] * d**-0.5
    dt = F.softplus(flex.dt_proj(u) + flex.dt_bias)[0]
    a = -torch.exp(flex.A_log)
    order = m.scan_orders[layer_idx % len(m.scan_orders)]
    visit = list(range(u.shape[1]))
    for s in layout.segments[0]:
        visit[s.start : s.end] = (s.start + scan_permutation(s, order)).tolist()
    y = torch.zeros(u.shape[1], h, d)
    state = torch.zeros(h, d, d)
    for t in visit:
        state = (
            torch.exp(dt[t] * a)[:, None, None] * state
            + dt[t][:, None, None] * x[t][:, :, None] * b[t][:, None, :]
        )
        y[t] = (state @ c[t][:, :, None])[..., 0]
    if m.bidirectional:
        dtb = F.softplus(flex.dt_proj_bwd(u) + flex.dt_bias_bwd)[0]
        ab = -torch.exp(flex.A_log_bwd)
        for s in layout.segments[0]:
            state = torch.zeros(h, d, d)
            for t in reversed((s.start + scan_permutation(s, order)).tolist()):
                y[t] = y[t] + (state @ c[t][:, :, None])[..., 0]  # strictly future: state before adding t
                state = (
                    torch.exp(dtb[t] * ab)[:, None, None] * state
                    + dtb[t][:, None, None] * x[t][:, :, None] * b[t][:, None, :]
                )
    y = y + flex.D[:, None] * x
    y = y * F.silu(flex.gate_proj(u)[0]).view(-1, h, d)
    normed = (h if m.output_norm_heads is None else m.output_norm_heads) if m.output_norm else 0
    for head in range(normed):  # the first heads: per-head RMSNorm; the others keep their magnitude
        y[:, head] = y[:, head] * torch.rsqrt(y[:, head].pow(2).mean(-1, keepdim=True) + flex.eps)
    return y * flex.norm_weight.view(h, d)


@pytest.mark.parametrize(
    "layer_idx,norm",
    [(0, {}), (1, {}), (2, {}), (1, {"output_norm": False}), (0, {"output_norm_heads": 2}),
     (1, {"output_norm_heads": 1}), (2, {"output_norm_heads": 3}), (1, {"output_norm_heads": 0})],
)  # fmt: skip
def test_flex_ma_matches_the_formulas(layer_idx, norm):
    block = make_block(layer_idx, use_swin=False, d_conv=0, **norm)
    segs = [Segment(3, 2, 2, 3), Segment(17, 3, 1, 2)]
    layout = layout_of([segs], 27)
    u = torch.randn(1, 27, HIDDEN)
    with torch.no_grad():
        got = block.flex(u, layout, layer_idx, None)[0]
        want = naive_flex(block.flex, u, layout, layer_idx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("normed", [0, 1, 2, 3, 4])
def test_the_first_heads_are_the_normed_blocks_and_the_others_the_norm_free_blocks(normed):
    """`output_norm_heads: N` = heads 0..N-1 of the all-normed Flex-MA and heads N.. of the `output_norm: false`
    one, with the same weights (conv, backward scan and gate on)."""
    blocks = {k: make_block(1, use_swin=False, **f)
              for k, f in (("all", {}), ("none", {"output_norm": False}), ("mixed", {"output_norm_heads": normed}))}  # fmt: skip
    layout = layout_of([[Segment(3, 2, 2, 3)]], 19)
    u = torch.randn(1, 19, HIDDEN)
    with torch.no_grad():
        out = {k: b.flex(u, layout, 1, None) for k, b in blocks.items()}
    assert blocks["mixed"].flex.normed_heads == normed
    torch.testing.assert_close(out["mixed"][:, :, :normed], out["all"][:, :, :normed], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["mixed"][:, :, normed:], out["none"][:, :, normed:], atol=1e-6, rtol=1e-5)
    if 0 < normed < HEADS:
        assert not torch.allclose(out["all"][:, :, normed:], out["none"][:, :, normed:], atol=1e-3)


def test_output_norm_heads_beyond_the_heads_is_refused_where_the_block_is_built():
    from linmu_cli.errors import LinmuError

    assert MateConfig(output_norm_heads=HEADS).validate().normed_heads(HEADS) == HEADS
    with pytest.raises(
        LinmuError, match=f"output_norm_heads=5: the model has {HEADS} attention heads, so at most"
    ):
        MateAttention(text_config(), MateConfig(output_norm_heads=5).validate(), 0)


def test_fusion_interpolates_the_two_branches():
    block = make_block(d_conv=0)
    layout = layout_of([[Segment(2, 1, 2, 2)]], 9)
    u = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        block.fuse.weight.zero_()
        block.fuse.bias.fill_(50.0)  # a = 1: Flex-MA only
        only_flex = run(block, u, layout)
        want = block.flex.o_proj(block.flex(u, layout, 0, None).flatten(2))
        torch.testing.assert_close(only_flex, want)
        block.fuse.bias.fill_(-50.0)  # a = 0: Local-Swin only
        want = block.swin.o_proj(block.swin(u, rope(9), layout, 0, None).flatten(2))
        torch.testing.assert_close(run(block, u, layout), want)


@pytest.mark.parametrize("fusion", ["token", "head"])
def test_the_vision_fusion_bias_moves_vision_tokens_only(fusion):
    """`fusion_vision_init`: vision tokens start at that Flex-MA weight, text tokens at `fusion_init`; the extra bias
    is one learned parameter per fusion output (trained with the fusion group: the next test)."""
    attn = make_block(d_conv=0, use_swin=False).flex  # any module with the teacher's q/k/v/o projections
    mate = MateConfig(d_conv=0, fusion=fusion, fusion_init=0.3, fusion_vision_init=0.9).validate()
    block = MateAttention.from_attention(attn, text_config(), mate, 0).eval()
    width = HEADS if fusion == "head" else 1
    assert block.fuse_vision.shape == (width,)
    torch.testing.assert_close(torch.sigmoid(block.fuse.bias), torch.full((width,), 0.3))
    torch.testing.assert_close(torch.sigmoid(block.fuse.bias + block.fuse_vision), torch.full((width,), 0.9))
    layout = layout_of([[Segment(2, 1, 2, 2)]], 9)  # tokens 2-5 are vision
    u = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        flex = block.flex(u, layout, 0, None)
        swin = block.swin(u, rope(9), layout, 0, None)
        vision = (torch.arange(9) >= 2) & (torch.arange(9) < 6)
        a = torch.where(vision, 0.9, 0.3).view(1, 9, 1, 1)  # (B, L, heads, d) broadcast
        want = block.flex.o_proj((a * flex).flatten(2)) + block.swin.o_proj(((1 - a) * swin).flatten(2))
        torch.testing.assert_close(run(block, u, layout), want)
        plain = MateAttention.from_attention(
            attn, text_config(), MateConfig(d_conv=0, fusion=fusion, fusion_init=0.3), 0
        )
        plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "fuse_vision"})
        text = run(plain.eval(), u, layout)
    got = run(block, u, layout)
    torch.testing.assert_close(got[:, [0, 1, 6, 7, 8]], text[:, [0, 1, 6, 7, 8]])  # text: as without the bias
    assert not torch.allclose(got[:, 2:6], text[:, 2:6])


def test_the_vision_fusion_bias_trains_with_the_fusion_group():
    from linmu_cli.distillation.trainer import set_trainable
    from linmu_cli.models import convert_model
    from linmu_cli.tiny import build_tiny_teacher

    teacher, _ = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher, MateConfig(fusion_vision_init=0.9))
    names = [n for n, _ in set_trainable(student, ["fusion"])]
    layers = teacher.config.text_config.num_hidden_layers
    assert len(names) == 3 * layers and sum(n.endswith("self_attn.fuse_vision") for n in names) == layers


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"fusion_vision_init": 1.0}, "fusion_vision_init=1.0: the initial Flex-MA weight on vision tokens"),
        ({"fusion_vision_init": 0.9, "use_swin": False}, "fusion_vision_init=0.9: there is no fusion"),
    ],
)
def test_fusion_vision_init_is_checked(fields, why):
    from linmu_cli.errors import LinmuError

    with pytest.raises(LinmuError, match=why):
        MateConfig(**fields).validate()


@pytest.mark.parametrize("mate", [{}, {"use_swin": False}, {"use_flex": False}, {"bidirectional": False}])
def test_causality_rules(mate):
    """Text sees only the past; a vision token sees its own segment and the past, nothing after it."""
    seg = Segment(4, 2, 2, 2)  # positions 4..11
    layout = layout_of([[seg]], 16)
    block = make_block(1, vision_window=[2, 2, 2], text_window=6, **mate)
    u = torch.randn(1, 16, HIDDEN)
    with torch.no_grad():
        base = run(block, u, layout)
        after = u.clone()
        after[:, 12:] += 1.0  # text after the segment
        out = run(block, after, layout)
        assert torch.equal(out[:, :12], base[:, :12])
        assert not torch.allclose(out[:, 12:], base[:, 12:])
        inside = u.clone()
        inside[:, 11] += 1.0  # last token of the segment
        out = run(block, inside, layout)
        assert torch.equal(out[:, :4], base[:, :4])  # text before the segment
        if mate.get("use_flex", True) and (mate.get("use_swin", True) or mate.get("bidirectional", True)):
            assert not torch.allclose(out[:, 4], base[:, 4])  # first token of the segment sees the last one


def test_text_window_limits_what_text_sees():
    block = make_block(use_flex=False, text_window=3)
    layout = layout_of([[]], 10)
    u = torch.randn(1, 10, HIDDEN)
    with torch.no_grad():
        base = run(block, u, layout)
        changed = u.clone()
        changed[:, 2] += 1.0
        out = run(block, changed, layout)
    assert not torch.allclose(out[:, 4], base[:, 4])  # 2 is within the 3 keys ending at 4
    assert torch.equal(out[:, 5:], base[:, 5:])  # but not within those ending at 5


def test_windows_are_local_and_shifted_on_odd_layers():
    seg = Segment(0, 1, 4, 4)
    layout = layout_of([[seg]], 16)
    u = torch.randn(1, 16, HIDDEN)
    changed = u.clone()
    changed[:, 5] += 1.0  # (h=1, w=1)
    for layer, affected in ((0, {0, 1, 4, 5}), (1, {5, 6, 9, 10})):
        block = make_block(layer, use_flex=False, vision_window=[1, 2, 2])
        with torch.no_grad():
            diff = (run(block, changed, layout) - run(block, u, layout)).abs().sum(-1)[0]
        assert {i for i in range(16) if diff[i] > 0} == affected


@pytest.mark.parametrize("norm", [{}, {"output_norm": False}, {"output_norm_heads": 1}, {"output_norm_heads": 2}],
                         ids=["norm", "no-norm", "norm-1-head", "norm-2-heads"])  # fmt: skip
@pytest.mark.parametrize("steps", [1, 3])
def test_decode_continues_a_trained_conv_from_its_cached_tail(steps, norm):
    """Prefill + decode steps equal the full forward with a conv that is not the identity (a trained one): the
    decode step reads the cached conv tail before it overwrites it in place. Also with the per-head norm off, or
    on the first heads only (the decode step's output section is its own code)."""
    from linmu_cli.layers.cache import LinMUCache

    block = make_block(1, text_window=6, **norm)
    with torch.no_grad():
        block.flex.conv.weight.normal_(0, 0.5)
    n, seg = 21, Segment(3, 2, 2, 3)
    u = torch.randn(1, n, HIDDEN)
    cos, sin = rope(n)
    with torch.no_grad():
        full = block(u, position_embeddings=(cos, sin), linmu_layout=layout_of([[seg]], n))[0]
        cache = LinMUCache(2)
        k = n - steps
        outs = [block(u[:, :k], position_embeddings=(cos[:, :k], sin[:, :k]), past_key_values=cache,
                      linmu_layout=layout_of([[seg]], k))[0]]  # fmt: skip
        for t in range(k, n):
            outs.append(block(u[:, t : t + 1], position_embeddings=(cos[:, t : t + 1], sin[:, t : t + 1]),
                              past_key_values=cache, linmu_layout=layout_of([[]], 1))[0])  # fmt: skip
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-4)


def test_a_block_called_without_its_layout_raises():
    block = make_block()
    with pytest.raises(ValueError, match="needs the token layout"):
        block(torch.randn(1, 5, HIDDEN), position_embeddings=rope(5))

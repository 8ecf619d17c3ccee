"""The restructured M-MATE block (fused prefill path) on CPU: one input GEMM, host-built scan-order gathers, grouped
(GQA) scans and the fused output combine equal the module-by-module reference; shared projections convert,
save and train as Flex-MA's. CPU runs the PyTorch reference kernels (no Triton): the fast *plumbing* is forced
on by patching the path switches, the kernels behind them fall back to their references on CPU by design."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import prompt_inputs, video
from test_mate_block import HIDDEN, layout_of, make_block, rope, text_config

from linmu_cli.config import MateConfig
from linmu_cli.layers import flex_ma, mate
from linmu_cli.layers.layout import Segment
from linmu_cli.layers.mate import MateAttention
from linmu_cli.ops.gated_norm import last_norm_backend
from linmu_cli.ops.short_conv import last_conv_backend, short_conv, short_conv_reference


def force_fast(monkeypatch):
    monkeypatch.setattr(mate.MateAttention, "_fast", lambda self, u: u.shape[1] > 1)
    monkeypatch.setattr(flex_ma.FlexMA, "fast_path", lambda self, u: True)


def layout2():
    from linmu_cli.layers.layout import TokenLayout

    valid = torch.ones(2, 27, dtype=torch.bool)
    valid[1, :2] = False  # left padding in row 1
    layout = TokenLayout.text_only(2, 27, torch.device("cpu"), valid)
    layout.segments = [[Segment(3, 2, 2, 3), Segment(17, 3, 1, 2)], [Segment(5, 2, 3, 2)]]
    assert not layout.all_valid
    return layout


@pytest.mark.parametrize("layer_idx", [0, 1, 2])
@pytest.mark.parametrize(
    "fields",
    [{}, {"fusion": "head"}, {"shared_projections": True}, {"bidirectional": False}, {"use_swin": False},
     {"use_flex": False}, {"output_gate": False}, {"shared_projections": True, "fusion": "head"},
     {"output_norm": False}, {"output_norm_heads": 2}, {"fusion_vision_init": 0.9},
     {"fusion_vision_init": 0.9, "fusion": "head"}],
)  # fmt: skip
def test_fused_block_equals_reference_forward_and_backward(monkeypatch, layer_idx, fields):
    ref = make_block(layer_idx, **fields).train()
    fast = copy.deepcopy(ref)
    layout = layout2()
    u = torch.randn(2, 27, HIDDEN)
    pe = tuple(t.expand(2, -1, -1) for t in rope(27))
    out_ref = ref(u, position_embeddings=pe, linmu_layout=layout)[0]
    out_ref[layout.valid].square().sum().backward()
    force_fast(monkeypatch)
    out = fast(u, position_embeddings=pe, linmu_layout=layout)[0]
    out[layout.valid].square().sum().backward()
    assert last_conv_backend() == "torch"  # CPU: the references ran
    if fields.get("output_norm", True):  # (no norm at all: none ran)
        assert last_norm_backend() == "torch"
    torch.testing.assert_close(out[layout.valid], out_ref[layout.valid], atol=2e-5, rtol=1e-4)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    all_normed = ref.mate.output_norm and ref.mate.output_norm_heads is None
    for n, p in fast.named_parameters():
        # heads without the norm keep the random weights' magnitude: gradients up to ~2e4 here, float32 rounding
        # ~1e-7 of that (checked against each tensor's largest gradient)
        scale = 1.0 if all_normed else max(1.0, grads[n].abs().max().item() / 100)
        torch.testing.assert_close(p.grad, grads[n], atol=5e-5 * scale, rtol=1e-3, msg=n)


def old_flex(flex, u, layout, layer_idx):
    """Flex-MA as it was computed before the fused prefill path (conv in token order, full-width gathers), for the comparison."""
    from linmu_cli.ops.ssd import ssd_scan

    def gather(x, index):
        return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)

    bsz, length, _ = u.shape
    h, hk, d = flex.heads, flex.kv_heads, flex.head_dim
    valid = layout.valid[..., None].to(u.dtype)
    xbc = torch.cat([flex.v_proj(u), flex.k_proj(u), flex.q_proj(u)], dim=-1) * valid
    k = flex.mate.d_conv
    seq = xbc.transpose(1, 2)
    full = torch.cat([seq.new_zeros(*seq.shape[:2], k - 1), seq], dim=2)
    xbc = F.conv1d(full, flex.conv.weight, flex.conv.bias, groups=flex.conv_channels).transpose(1, 2)
    x, b, c = torch.split(xbc, [hk * d, hk * d, h * d], dim=-1)
    x = x.view(bsz, length, hk, d).repeat_interleave(h // hk, dim=2)
    b = b.view(bsz, length, hk, d).repeat_interleave(h // hk, dim=2)
    c = c.view(bsz, length, h, d) * d**-0.5
    dt = F.softplus(flex.dt_proj(u).float() + flex.dt_bias) * layout.valid[..., None]
    a = -torch.exp(flex.A_log.float())
    order = flex.mate.scan_orders[layer_idx % len(flex.mate.scan_orders)]
    perm = layout.scan_index(order)
    xs, dts, bs, cs = (x, dt, b, c) if perm is None else (gather(t, perm[0]) for t in (x, dt, b, c))
    y = ssd_scan(xs, dts, a, bs, cs, backend="torch")
    if perm is not None:
        y = gather(y, perm[1])
    plan = layout.backward_plan(order)
    dt_b = F.softplus(flex.dt_proj_bwd(u).float() + flex.dt_bias_bwd) * layout.valid[..., None]
    yb = ssd_scan(gather(x, plan.index), gather(dt_b, plan.index), -torch.exp(flex.A_log_bwd.float()),
                  gather(b, plan.index), gather(c, plan.next_index), reset=plan.reset, backend="torch")  # fmt: skip
    yb = F.pad(yb, (0, 0, 0, 0, 1, 0))[:, :length] * (~plan.reset)[..., None, None]
    y = y + gather(yb, plan.inverse) + flex.D[:, None] * x
    y = (y * F.silu(flex.gate_proj(u)).view(bsz, length, h, d)).float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + flex.eps)
    return y * flex.norm_weight.view(h, d)


@pytest.mark.parametrize("layer_idx", [0, 1, 2])
def test_restructured_flex_equals_the_previous_implementation_with_conv(monkeypatch, layer_idx):
    block = make_block(layer_idx)  # d_conv = 4, bidirectional, gate: every piece of the old path
    layout = layout2()
    u = torch.randn(2, 27, HIDDEN)
    with torch.no_grad():
        want = old_flex(block.flex, u, layout, layer_idx)
        got = block.flex(u, layout, layer_idx, None)
        force_fast(monkeypatch)
        fused = block.flex(u, layout, layer_idx, None)
    v = layout.valid
    torch.testing.assert_close(got[v], want[v], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused[v], want[v], atol=2e-5, rtol=1e-4)


def test_backward_gather_packs_each_segment_reversed_and_reads_the_strictly_future_step():
    layout = layout_of([[Segment(2, 1, 2, 2)], [Segment(1, 1, 1, 2), Segment(4, 1, 1, 3)]], 8, batch=2)
    bg = layout.backward_gather("thw")
    assert (bg.rows, bg.steps) == (3, 4)  # one row per segment, padded to the longest
    rows = bg.index.view(3, 4).tolist()
    assert rows[0] == [5, 4, 3, 2]  # row 0's segment reversed
    assert rows[1][:2] == [8 + 2, 8 + 1] and rows[2][:3] == [8 + 6, 8 + 5, 8 + 4]
    assert bg.next_index.view(3, 4)[0].tolist() == [4, 3, 2, 2]
    keep = bg.keep.view(-1).tolist()
    for t in range(16):
        seg_last = t in (5, 8 + 2, 8 + 6)  # first step of each reversed segment: nothing after it
        inside = 2 <= t < 6 or 8 + 1 <= t < 8 + 3 or 8 + 4 <= t < 8 + 7
        assert keep[t] == (inside and not seg_last)
    assert int(bg.out_index[3]) == 1 and int(bg.out_index[2]) == 2  # token 3 at step 2 reads step 1
    assert int(bg.out_index[8 + 4]) == 2 * 4 + 1


def test_short_conv_without_cuda_runs_the_reference():
    x, w, b = torch.randn(2, 9, 6), torch.randn(6, 1, 4), torch.randn(6)
    torch.testing.assert_close(short_conv(x, w, b, fast=True), short_conv_reference(x, w, b))
    assert last_conv_backend() == "torch"
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w, b, groups=6).transpose(1, 2)
    torch.testing.assert_close(short_conv_reference(x, w, b), want)


def test_shared_projections_convert_save_and_train_as_flex():
    cfg = text_config()
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    teacher = Qwen2VLAttention(cfg, layer_idx=0)
    block = MateAttention.from_attention(teacher, cfg, MateConfig(shared_projections=True), 0)
    names = set(block.state_dict())
    assert not any(n.startswith("swin.") for n in names)  # one copy, saved under Flex-MA's names
    assert {"flex.q_proj.weight", "flex.k_proj.bias", "flex.o_proj.weight"} <= names
    assert block.swin.q_proj is block.flex.q_proj and block.swin.o_proj is block.flex.o_proj
    torch.testing.assert_close(block.flex.q_proj.weight, teacher.q_proj.weight)
    unshared = MateAttention.from_attention(teacher, cfg, MateConfig(), 0)
    assert sum(p.numel() for p in block.parameters()) < sum(p.numel() for p in unshared.parameters())
    # a shared model equals an unshared one whose two copies are equal (they start that way)
    unshared.load_state_dict({**unshared.state_dict(), **block.state_dict()}, strict=False)
    u = torch.randn(1, 10, HIDDEN)
    layout = layout_of([[Segment(2, 1, 2, 2)]], 10)
    with torch.no_grad():
        torch.testing.assert_close(
            block(u, position_embeddings=rope(10), linmu_layout=layout)[0],
            unshared(u, position_embeddings=rope(10), linmu_layout=layout)[0],
        )
    copied = copy.deepcopy(block)
    assert copied.swin.q_proj is copied.flex.q_proj  # deepcopy keeps the sharing inside the copy


@pytest.mark.parametrize(
    "fields", [{}, {"shared_projections": True}, {"output_norm": False}, {"output_norm_heads": 2}]
)
def test_fused_prefill_then_decode_equals_the_full_recompute(monkeypatch, fields):
    """A prefill on the fused path leaves the cache (conv tail, SSM state, ring) that decoding continues from."""
    from linmu_cli.layers.cache import LinMUCache
    from linmu_cli.layers.layout import TokenLayout

    block = make_block(1, text_window=6, **fields)
    n = 21
    u = torch.randn(1, n, HIDDEN)
    cos, sin = rope(n)
    layout = layout_of([[Segment(3, 2, 2, 3)]], n - 1)
    with torch.no_grad():
        full = block(u, position_embeddings=(cos, sin), linmu_layout=layout_of([[Segment(3, 2, 2, 3)]], n))[0]
        force_fast(monkeypatch)
        cache = LinMUCache(2)
        pre = block(u[:, :-1], position_embeddings=(cos[:, :-1], sin[:, :-1]), past_key_values=cache,
                    linmu_layout=layout)[0]  # fmt: skip
        step = block(u[:, -1:], position_embeddings=(cos[:, -1:], sin[:, -1:]), past_key_values=cache,
                     linmu_layout=TokenLayout.text_only(1, 1, torch.device("cpu")))[0]  # fmt: skip
    torch.testing.assert_close(pre, full[:, :-1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(step, full[:, -1:], atol=2e-5, rtol=1e-4)


def test_shared_projection_model_generates_round_trips_and_rebuilds_its_teacher(tiny, tmp_path):
    """shared_projections end to end: convert, cached generation == recompute, save/load, teacher rebuild."""
    from transformers import AutoModelForImageTextToText

    from linmu_cli.bench import teacher_from_student
    from linmu_cli.distillation.trainer import set_trainable
    from linmu_cli.errors import LinmuError
    from linmu_cli.models import convert_model

    _, teacher, processor = tiny
    student = convert_model(
        teacher, MateConfig(text_window=6, vision_window=[2, 1, 2], shared_projections=True)
    )
    assert not any(".self_attn.swin." in n for n, _ in student.named_parameters())
    inputs = prompt_inputs(processor, ["what moves?"], videos=[video(1)])
    with torch.no_grad():
        gen = student.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
        seq = gen.sequences
        full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
        full["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, 4))
        logits = student(**full, use_cache=False).logits
    n = inputs["input_ids"].shape[1]
    for step, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, logits[:, n - 1 + step], atol=2e-4, rtol=1e-4)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.mate_config.shared_projections
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rebuilt = teacher_from_student(student)  # its attention weights are the shared ones
    layer = student.model.language_model.layers[0].self_attn
    assert rebuilt.model.language_model.layers[0].self_attn.q_proj.weight is layer.flex.q_proj.weight
    # stage 1 ("flex") trains the shared projections; "swin" alone holds nothing and says so
    names = [name for name, _ in set_trainable(student, ["flex"])]
    assert any(name.endswith("self_attn.flex.q_proj.weight") for name in names)
    with pytest.raises(LinmuError, match="hold no parameters"):
        set_trainable(student, ["swin"])


def test_complete_windows_skip_the_mask_and_give_the_same_attention():
    from linmu_cli.layers.layout import WindowPlan
    from linmu_cli.ops.window_attention import window_attention

    layout = layout_of([[Segment(1, 2, 4, 4)]], 34)
    plan = layout.window_plan([2, 2, 2], False)
    assert (
        plan.full and not layout.window_plan([2, 2, 2], True).full
    )  # shifted partitions have partial windows
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 34, 4, 8), torch.randn(1, 34, 2, 8), torch.randn(1, 34, 2, 8)
    masked = WindowPlan(plan.index, plan.valid, plan.src, plan.dst, full=False)
    torch.testing.assert_close(window_attention(q, k, v, plan, 0.3), window_attention(q, k, v, masked, 0.3))


def test_ssd_backend_is_a_runtime_setting_not_a_saved_field(tiny, tmp_path):
    """Like attn_implementation: the blocks run the backend they were given, config.json never carries it, an
    older checkpoint that does still loads (its value ignored), and `set_ssd_backend` changes it at run time."""
    import json

    from transformers import AutoModelForImageTextToText

    from linmu_cli.errors import LinmuError
    from linmu_cli.layers.mate import set_ssd_backend
    from linmu_cli.models import convert_model

    _, teacher, _ = tiny
    mate_cfg = MateConfig(text_window=8, ssd_backend="torch")
    assert "ssd_backend" not in mate_cfg.to_dict() and mate_cfg.replace(text_window=4).ssd_backend == "torch"
    student = convert_model(teacher, mate_cfg)
    blocks = [m for m in student.modules() if isinstance(m, MateAttention)]
    assert blocks and all(b.mate.ssd_backend == b.flex.mate.ssd_backend == "torch" for b in blocks)
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "ssd_backend" not in config["mate"]
    config["mate"]["ssd_backend"] = "fla"  # what a checkpoint of an earlier linmu carries
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.mate_config.ssd_backend == "auto"
    assert "ssd_backend" not in loaded.config.mate  # and not saved again
    with torch.no_grad():
        loaded(input_ids=torch.randint(0, 100, (1, 6)), use_cache=False)  # runs on CPU ("fla" would raise)
    set_ssd_backend(loaded, "torch")
    assert all(m.flex.mate.ssd_backend == "torch" for m in loaded.modules() if isinstance(m, MateAttention))
    with pytest.raises(LinmuError, match="ssd_backend"):
        set_ssd_backend(loaded, "triton")

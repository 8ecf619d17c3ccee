"""`linmu_cli.decode_layer`: the decoder layer written out once for both decode runners (LinMU's StaticDecoder and
the served teacher) equals transformers' decoder-layer forward, both runners step through it (so they differ only
in their attention), and StaticDecoder fed generate()'s tokens still equals the model's cache path."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CACHE, output_cache
from torch import nn

from linmu_cli import bench, decode_layer
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.models import convert_model
from linmu_cli.teacher_decode import ServedTeacherDecoder


def _first_step(student: nn.Module, ids: torch.Tensor):
    """A prefilled cache, the next token's embeddings, rotary and layout: what a decoder layer gets at decode."""
    with torch.no_grad():
        cache = output_cache(student(input_ids=ids, use_cache=True))
    text = student.family.text_model(student)
    b = ids.shape[0]
    pos = bench.next_positions(student, ids.shape[1], b, ids.device)
    hidden = text.embed_tokens(torch.randint(0, 900, (b, 1)))
    return cache, hidden, text.rotary_emb(hidden, pos), TokenLayout.text_only(b, 1, ids.device)


@pytest.mark.parametrize("carried", [False, True], ids=["first-layer", "carried-residual"])
def test_the_written_out_layer_equals_the_hf_decoder_layer_forward(tiny, carried):
    """Float32, every layer of the tiny student in turn: the HF layer's output (its own residual adds) equals
    decode_layer's MLP output + carried stream, and both leave the layer's cache the same. `carried` splits the
    layer input into (previous MLP output, stream) as the runners carry it."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (2, 9))
    cache, hidden, rope, layout = _first_step(student, ids)
    kw = bench.cache_kw(student)
    with torch.no_grad():
        for i, layer in enumerate(student.family.decoder_layers(student)):
            mine = copy.deepcopy(cache)
            want = layer(hidden, position_embeddings=rope, linmu_layout=layout, **{kw: cache})
            want = want[0] if isinstance(want, tuple) else want

            def attend(x, block=layer.self_attn, c=mine):
                return block(hidden_states=x, position_embeddings=rope, linmu_layout=layout, **{kw: c})[0]

            if carried:
                part = torch.randn_like(hidden)
                out, stream = decode_layer.decode_layer(layer, hidden - part, part, attend)
            else:
                out, stream = decode_layer.decode_layer(layer, hidden, None, attend)
            torch.testing.assert_close(out + stream, want, atol=1e-5, rtol=1e-5, msg=f"layer {i}")
            for (name, a), (_, b) in zip(mine.layers[i].tensors(), cache.layers[i].tensors(), strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=f"layer {i} cache {name}")
            hidden = want
        text = student.family.text_model(student)
        part = torch.randn_like(hidden)
        torch.testing.assert_close(decode_layer.final_norm(text.norm, hidden - part, part), text.norm(hidden),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def _spy(monkeypatch) -> dict[str, int]:
    """Count the fused ops decode_layer calls (the names it imported)."""
    counts: dict[str, int] = {}
    for name in ("rms_norm", "add_rms_norm", "silu_mul"):
        fn = getattr(decode_layer, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(decode_layer, name, wrapped)
    return counts


def test_both_runners_step_through_the_shared_layer(tiny, monkeypatch):
    """Per step and model: one plain RMSNorm (layer 0's input), a fused add + norm for every other norm (2 per
    layer, the final one included), one SiLU product per layer, for LinMU's StaticDecoder and for the served teacher alike; on CPU the references
    run (`norm_mlp_paths`), and HF's RMSNorm / MLP forwards do not run at all."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    layers = len(student.family.decoder_layers(student))
    counts = _spy(monkeypatch)
    hf_calls = []
    hooks = [module.register_forward_hook(lambda *_: hf_calls.append(1))
             for model in (teacher, student) for layer in student.family.decoder_layers(model)
             for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp)]  # fmt: skip
    runners = [StaticDecoder.random(student, batch=2, position=20),
               ServedTeacherDecoder.random(teacher, batch=2, prompt=20, new_tokens=4)]  # fmt: skip
    try:
        with torch.no_grad():
            for runner in runners:
                counts.clear()
                runner.step()
                assert counts == {"rms_norm": 1, "add_rms_norm": 2 * layers, "silu_mul": layers}, type(runner)
    finally:
        for hook in hooks:
            hook.remove()
    assert decode_layer.norm_mlp_paths() == {
        "rms_norm": "torch",
        "add_rms_norm": "torch",
        "silu_mul": "torch",
    }
    assert hf_calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_feeding_equals_the_cache_path(tiny, dtype):
    """StaticDecoder.feed (generate(cache_implementation="static")'s step) fed the tokens the model's own cache
    path chose gives that path's logits: bit for bit, since on CPU the written-out layer runs transformers' own
    norm / MLP math in its order (bf16 included)."""
    _, teacher, _ = tiny
    student = convert_model(copy.deepcopy(teacher).to(dtype), MateConfig(text_window=4))
    ids = torch.randint(0, 900, (2, 7))
    with torch.no_grad():
        cache = output_cache(student(input_ids=ids, use_cache=True))
        runner = StaticDecoder.from_cache(student, copy.deepcopy(cache), ids[:, -1:],
                                          bench.next_positions(student, 7, 2, ids.device))  # fmt: skip
        token, pos = ids[:, -1:], bench.next_positions(student, 7, 2, ids.device)
        for _ in range(6):  # the ring of 4 wraps
            want = student(input_ids=token, position_ids=pos, **{CACHE: cache}).logits[:, -1]
            got = runner.feed(token)
            assert torch.equal(got, want)
            token, pos = want.argmax(-1, keepdim=True), pos + 1


def test_the_decode_mlp_refuses_an_activation_it_does_not_fuse(tiny):
    _, teacher, _ = tiny
    mlp = copy.deepcopy(teacher.model.language_model.layers[0].mlp)
    x = torch.randn(2, 1, mlp.gate_proj.in_features)
    torch.testing.assert_close(decode_layer.decode_mlp(mlp, x), mlp(x), atol=0, rtol=0)
    mlp.act_fn = nn.GELU()
    with pytest.raises(TypeError, match="fuses the MLP's SiLU; this model's is GELU"):
        decode_layer.decode_mlp(mlp, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_runners_on_the_fused_kernels_follow_their_reference_steps_on_gpu():
    """bf16 on CUDA: each runner with the Triton norms / MLP, replayed from its CUDA graph, against the same
    runner (same random state) stepping eagerly on the references (`use_backend("torch")`)."""
    from helpers import rel_error

    from linmu_cli.ops.rms_norm import use_backend
    from linmu_cli.tiny import build_tiny_teacher

    dev = torch.device("cuda")
    teacher, _ = build_tiny_teacher("qwen2_vl")
    teacher = teacher.to(dev, torch.bfloat16)
    with torch.device(dev):
        student = convert_model(teacher, MateConfig(text_window=4))
    make = {"linmu": lambda: StaticDecoder.random(student, batch=3, position=50, seed=2),
            "teacher": lambda: ServedTeacherDecoder.random(teacher, batch=3, prompt=50, new_tokens=12, seed=2,
                                                           kernel="sdpa_masked")}  # fmt: skip
    with torch.no_grad():
        for name, build in make.items():
            fused, ref = build(), build()
            for i in range(5):
                if i == 1:  # after an eager step that compiled the kernels; later steps are graph replays
                    fused.capture(warmup=0)
                    assert set(decode_layer.norm_mlp_paths().values()) == {"triton"}, name
                # the same token into both: a near-tie of the bf16 argmax must not fork them
                fused.tokens.copy_(ref.tokens)
                got = fused.step().clone()
                with use_backend("torch"):
                    want = ref.step().clone()
                assert rel_error(got, want) < 2e-2, (name, i, rel_error(got, want))
            assert set(decode_layer.norm_mlp_paths().values()) == {"torch"}, name

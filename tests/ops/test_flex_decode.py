"""Flex-MA's decode kernels (ops/ssd/decode.py) and the M-MATE block's decode step on them (`MateAttention._decode`).

On CPU through Triton's interpreter (a subprocess: see flex_decode_cases.py): the conv step against
`short_conv_reference` + `conv_tail` (the tail shifted in place, padding entering as zero, widths 4, 2, 1), the fused
step against `flex_step_naive` (GQA 1, 2, 3, 7; head dims off a power of 2; float32 and bf16 states; gate, norm and
every fusion mode; the norm on the first heads only; a padding row keeps its state exactly), and blocks of every
relevant MateConfig (shared or own projections, token or head fusion, no gate, no norm, the norm on half the heads,
Flex-MA alone, no conv, bf16 with a bf16 state), with and
without the packed input weights, decoding after a left-padded prefill against the reference path (outputs and
every cache buffer), and a tiny model's `StaticDecoder` steps. Without the interpreter: the kernels compiled for
sm_90, the packed weights (`PackedLinear`, `pack_decode_weights`: equal to `fused_linear`, refreshed when a weight
changes, dropped by copies, their size at the 7B shape), and the switch (never on CPU, never under autograd).
On the GPU: the kernels and blocks at the Qwen2-VL-7B shape, and one block's decode step in a CUDA graph.

Run the GPU part with `python3 -m pytest -s -m gpu tests/ops/test_flex_decode.py`.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from decode_attention_cases import run_interpreted
from flex_decode_cases import (
    BLOCK_CASES,
    CONV_CASES,
    DTYPES,
    PAD_STEP,
    STEP_CASES,
    STEPS,
    block_run,
    case_id,
    conv_inputs,
    decode_kernels,
    make_block,
    model_steps,
    step_inputs,
)
from helpers import rel_error
from transformers import Qwen2VLTextConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.layers.mate import MateAttention, drop_decode_weights, pack_decode_weights
from linmu_cli.ops.fused_linear import PackedLinear, fused_linear, group_part
from linmu_cli.ops.short_conv import conv_tail, short_conv_reference
from linmu_cli.ops.ssd import flex_decode_step, flex_step_naive, last_ssd_step_backend

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every kernel / block / model result of `flex_decode_cases.py`, run with TRITON_INTERPRET=1 in a subprocess
    (it must be set before triton is imported); this process computes the references from the same seeds."""
    return run_interpreted(
        HERE / "flex_decode_cases.py",
        tmp_path_factory.mktemp("flex_decode") / "interpreted.pt",
        weights_only=False,
    )


def _close(got: torch.Tensor, ref: torch.Tensor, bf16: bool) -> None:
    """float32: elementwise; bf16: the output's rounding (the interpreter truncates where the GPU rounds)."""
    if bf16:
        torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------- the interpreter
def test_the_kernels_ran_and_were_reported(interpreted):
    assert interpreted["ran"] == {"conv": "triton", "step": "triton", "block": ("triton", "triton")}
    assert "has no backward" in interpreted["refused_grad"]


def test_the_kernels_refuse_cpu_tensors_without_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    from linmu_cli.ops.short_conv import conv_step

    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        conv_step(*conv_inputs(CONV_CASES[0]))
    args, kw = step_inputs(STEP_CASES[0])
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        flex_decode_step(*args, **kw)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv_step_equals_the_reference_and_shifts_the_tail(interpreted, case):
    x, tail, weight, bias, valid = conv_inputs(case)
    width, bf16 = case[2], case[3] == "bf16"
    masked = (x * valid[:, None].to(x.dtype))[:, None]  # (B, 1, C): what the block's reference convolves
    ref = short_conv_reference(masked.float(), weight.float(), bias.float() if bias is not None else None,
                               tail.float())[:, 0]  # fmt: skip
    out, new_tail = interpreted["conv"][case]
    assert out.dtype == x.dtype and out.shape == x.shape
    _close(out, ref, bf16)
    assert torch.equal(new_tail, conv_tail(masked, tail, width))  # copies: bit for bit


@pytest.mark.parametrize("case", STEP_CASES, ids=[case_id(c) for c in STEP_CASES])
def test_fused_step_equals_the_naive_step(interpreted, case):
    args, kw = step_inputs(case)
    ref, ref_state = flex_step_naive(*args, **kw)
    out, state = interpreted["step"][case_id(case)]
    bf16 = case["io"] == "bf16" or case["state"] == "bf16"
    assert out.dtype == DTYPES[case["io"]] and state.dtype == DTYPES[case["state"]]
    assert out.shape == ref.shape == (case["b"], 2 if kw.get("logit") is not None and not kw["one_output"] else 1,
                                      case["h"] * case["d"])  # fmt: skip
    _close(out, ref, bf16)
    _close(state, ref_state, case["state"] == "bf16")
    if case["b"] > 1:  # row 1 is padding: dt = 0 keeps its state, bit for bit
        assert torch.equal(state[1], args[3][1])


@pytest.mark.parametrize("norm_heads", [0, 1, 3, 6])
def test_naive_step_norms_the_first_heads_and_keeps_the_others_magnitude(norm_heads):
    """`flex_step_naive` with `norm_heads`: the first heads are the all-normed step's, the others the norm-free
    step's (the reference the fused step is checked against, itself checked against the two plain cases)."""
    case = dict(b=3, h=6, hk=2, d=8, state="fp32", io="fp32", gate=True, norm=True, mix="none", mask=False)
    args, kw = step_inputs(case)
    normed, _ = flex_step_naive(*args, **{**kw, "norm_heads": None})
    free, _ = flex_step_naive(*args, **{**kw, "norm": False})
    mixed, state = flex_step_naive(*args, **{**kw, "norm_heads": norm_heads})
    cut = norm_heads * case["d"]
    torch.testing.assert_close(mixed[..., :cut], normed[..., :cut], atol=0, rtol=0)
    torch.testing.assert_close(mixed[..., cut:], free[..., cut:], atol=0, rtol=0)
    assert torch.equal(state, flex_step_naive(*args, **kw)[1])  # the norm never touches the state
    if 0 < norm_heads < case["h"]:
        assert not torch.allclose(normed[..., cut:], free[..., cut:])  # the two cases differ where it matters


@pytest.mark.parametrize("pack", [False, True], ids=["modules", "packed"])
@pytest.mark.parametrize("name", [c[0] for c in BLOCK_CASES])
def test_block_decode_on_the_kernels_equals_the_reference(interpreted, name, pack):
    """Prefill (reference, left padding), then decode steps (one with a padding row) on the decode kernels: every
    step's output and every cache buffer equal the reference path's."""
    ref = block_run(name, kernels=False)
    got = interpreted["block"][(name, pack)]
    assert got.keys() == ref.keys()
    bf16 = next(c for c in BLOCK_CASES if c[0] == name)[2] == "bf16"
    for key, value in ref.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key
        elif bf16:  # the reference rounds to bf16 between its ops, the kernels once: both ~1e-2 off float32
            assert rel_error(got[key], value) < 3e-2, (key, rel_error(got[key], value))
        else:
            torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert got["out"].shape[1] == STEPS > PAD_STEP


def test_model_static_decoder_steps_on_the_kernels_equal_the_reference(interpreted):
    ref = model_steps(kernels=False)
    assert len(interpreted["model"]) == len(ref)
    for got, want in zip(interpreted["model"], ref, strict=True):
        assert rel_error(got, want) < 1e-5, rel_error(got, want)


# ------------------------------------------------------------------------------------------- no interpreter
def _ptxas_usage(kernel) -> tuple[int, int]:
    """(registers per thread, spill bytes) of a compiled kernel's PTX, from Triton's own ptxas for sm_90a."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
    return regs, spills


def test_kernels_compile_for_the_h200_without_a_gpu():
    """The real (not interpreted) kernels, compiled for sm_90 as the JIT specializes them at the Qwen2-VL-7B decode
    shape (the packed GEMV's row stride 12,864), both state dtypes: no register spills, vectorized state loads."""
    pytest.importorskip("triton", reason="triton is not installed")
    from decode_attention_cases import compile_for_sm90

    from linmu_cli.ops.ssd import decode

    ptr = lambda ty: (f"*{ty}", 0)  # noqa: E731
    ints = lambda **kw: {k: ("i32", v) for k, v in kw.items()}  # noqa: E731
    conv = {n: ptr("bf16") for n in ("X", "TAIL", "W", "BIAS", "OUT")} | {"VALID": ptr("i1")}
    conv |= ints(stride_xb=12864, stride_tb=4608 * 3, stride_tc=3, stride_vb=1, stride_ob=4608, channels=4608)
    k = compile_for_sm90(decode._conv_step_kernel, conv, {"WIDTH": 4, "BLOCK_C": decode.CONV_BLOCK, "HAS_BIAS": True},
                         4, 1)  # fmt: skip
    usage = {"conv": _ptxas_usage(k)}
    for state in ("fp32", "bf16"):
        step = {
            n: ptr("bf16")
            for n in ("XBC", "DT", "GATE", "LOGIT", "SWIN", "OUT", "DT_BIAS", "A_LOG", "D", "NORM_W")
        }
        step |= {"VALID": ptr("i1"), "S": ptr(state), "scale": ("fp32", 0.088), "eps": ("fp32", 1e-6)}
        step |= ints(stride_xb=4608, stride_dtb=12864, stride_gb=12864, stride_lb=12864, stride_lh=0,
                     stride_wb=3584, stride_wh=128, stride_wd=1, stride_vb=1, stride_sb=28 * 128 * 128,
                     stride_sh=128 * 128, stride_sp=128, stride_sn=1, stride_ob=7168, stride_om=3584, kv_heads=4,
                     group=7, dim=128, norm_heads=28)  # fmt: skip
        consts = {"BLOCK_D": 128, "MASK_INPUT": False, "HAS_GATE": True, "NORM": True, "MIX": True,
                  "ONE_OUTPUT": False}  # fmt: skip
        k = compile_for_sm90(decode._flex_step_kernel, step, consts, decode.step_warps(128), 1)
        assert "ld.global.v4" in k.asm["ptx"]  # 16-byte state loads
        usage[f"step ({state} state)"] = _ptxas_usage(k)
    print(f"\n(registers, spill bytes) per kernel: {usage}")
    assert all(spills == 0 for _, spills in usage.values()), usage


def test_cpu_decode_runs_the_reference_and_grad_mode_never_the_kernels(monkeypatch):
    block = make_block({}, "fp32")
    cache = LinMUCache(2)
    u = torch.randn(1, 1, block.flex.q_proj.in_features)
    layout = TokenLayout.text_only(1, 1, torch.device("cpu"))
    state = cache.layer(1)
    with torch.no_grad():
        assert not block._decode_kernels(u, layout, state)  # CPU
        with decode_kernels(True):
            assert block._decode_kernels(u, layout, state)
            assert not block._decode_kernels(torch.randn(1, 2, u.shape[-1]), layout, state)  # a chunk
            assert not block._decode_kernels(u, layout, None)  # no cache
    with decode_kernels(True):
        assert torch.is_grad_enabled() and not block._decode_kernels(
            u, layout, state
        )  # autograd: the reference
    with torch.no_grad():
        angles = torch.zeros(1, 1, block.head_dim)
        block(u, position_embeddings=(angles.cos(), angles.sin()), cache=cache, linmu_layout=layout)
    assert last_ssd_step_backend() == "torch"


def _groups(block: MateAttention) -> list:
    return block._projection_groups(TokenLayout.text_only(1, 1, torch.device("cpu")))[0]


@pytest.mark.parametrize(
    "fields", [{}, {"shared_projections": True}, {"fusion": "head", "output_gate": False}]
)
def test_packed_weights_equal_the_per_call_concatenation_and_follow_the_parameters(fields):
    block = make_block(fields, "fp32")
    groups = _groups(block)
    u = torch.randn(2, 1, block.flex.q_proj.in_features)
    assert pack_decode_weights(block) > 0
    pack = block.__dict__["_decode_pack"]
    want = fused_linear(u, [group_part(g) for g in groups])
    got = pack(u)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not pack.weight.requires_grad and pack.weight.shape[0] % 64 == 0
    assert not pack.refresh()  # fresh: nothing copied
    address = pack.weight.data_ptr()
    with torch.no_grad():
        block.flex.k_proj.weight.add_(1.0)  # an in-place update (an optimizer step, load_state_dict)
    assert pack.refresh()
    assert pack.weight.data_ptr() == address  # re-copied in place: a captured graph's address stays valid
    block.fuse.bias = torch.nn.Parameter(block.fuse.bias.detach() + 1)  # a replaced parameter
    assert pack.refresh()
    for a, b in zip(pack(u), fused_linear(u, [group_part(g) for g in _groups(block)]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    block.flex.dt_proj = copy.deepcopy(
        block.flex.dt_proj
    )  # a replaced module: pack_decode_weights builds anew
    pack_decode_weights(block)
    assert block.__dict__["_decode_pack"] is not pack and block.__dict__["_decode_pack"].built_from(
        _groups(block)
    )
    assert (
        copy.deepcopy(block).__dict__.get("_decode_pack") is None
    )  # a copy owns other weights: no stale pack
    assert pickle.loads(pickle.dumps(pack)) is None  # a pickled model carries no second copy
    drop_decode_weights(block)
    assert "_decode_pack" not in block.__dict__ and "_decode_counts" not in block.__dict__


def test_packed_decode_weights_cost_at_the_7b_shape():
    """The numbers `pack_decode_weights` documents: 92.2 MB per layer (2.58 GB for 28), 59.2 MB shared."""
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=256,
                            num_hidden_layers=1, vocab_size=100)  # fmt: skip
    for fields, rows in (({}, 12_864), ({"shared_projections": True}, 8_256), ({"fusion": "head"}, 12_864)):
        with torch.device("meta"):
            block = MateAttention(cfg, MateConfig(**fields), 0).to(torch.bfloat16)
        pack = PackedLinear(_groups(block))
        assert pack.weight.shape == (rows, 3584)
        assert abs(pack.nbytes() - rows * (3584 + 1) * 2) == 0
    assert round(12_864 * 3584 * 2 / 1e6, 1) == 92.2 and round(28 * 12_864 * 3584 * 2 / 1e9, 2) == 2.58


# --------------------------------------------------------------------------------------------------- GPU
def _gpu_inputs(batch: int, state_dtype: torch.dtype):
    args, kw = step_inputs(dict(b=batch, h=28, hk=4, d=128, state="fp32", io="bf16", gate=True, norm=True,
                               mix="token", mask=False))  # fmt: skip
    args = [a.cuda() if a is not None else None for a in args]
    args[3] = args[3].to(state_dtype)
    return args, {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("batch", [1, 16])
def test_kernels_at_the_7b_shape_on_gpu(batch, state_dtype):
    """Qwen2-VL-7B decode (28 heads, 4 kv heads, d = 128, 4,608 conv channels, bf16) against the references."""
    from linmu_cli.ops.short_conv import conv_step, last_conv_backend

    args, kw = _gpu_inputs(batch, state_dtype)
    ref, ref_state = flex_step_naive(*args, **kw)
    state = args[3]
    out = flex_decode_step(*args, **kw)
    assert last_ssd_step_backend() == "triton"
    errs = {"out": rel_error(out, ref), "state": rel_error(state, ref_state)}
    x, tail, weight, bias, valid = (t.cuda() for t in conv_inputs((max(batch, 2), 4608, 4, "bf16", True)))
    masked = (x * valid[:, None].to(x.dtype))[:, None]
    want_tail = conv_tail(masked, tail, 4)
    want = short_conv_reference(masked.float(), weight.float(), bias.float(), tail.float())[:, 0]
    got = conv_step(x, tail, weight, bias, valid)
    assert last_conv_backend() == "triton" and torch.equal(tail, want_tail)
    errs["conv"] = rel_error(got, want)
    print(f"\nbatch {batch}, {state_dtype} state: rel. errors {errs}")
    assert errs["out"] < 1e-2 and errs["conv"] < 1e-2
    assert errs["state"] < (1e-5 if state_dtype == torch.float32 else 1e-2)


def _gpu_block(fields: dict, backend: str = "auto") -> MateAttention:
    cfg = Qwen2VLTextConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=256,
                            num_hidden_layers=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    block = MateAttention(cfg, MateConfig(text_window=64, ssd_backend=backend, **fields), 1)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    block.flex.init_new_parameters(0.02)
    with torch.no_grad():
        block.flex.conv.weight.normal_(0, 0.5)
        block.fuse.weight.normal_(0, 0.02)
    return block.to("cuda", torch.bfloat16).eval()


def _prefilled(block: MateAttention, batch: int, length: int = 200, ssm_dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(1)
    u = torch.randn(batch, length, 3584, device="cuda", generator=g).bfloat16()
    angles = torch.randn(batch, length, 64, device="cuda", generator=g)
    rope = (torch.cat([angles] * 2, -1).cos().bfloat16(), torch.cat([angles] * 2, -1).sin().bfloat16())
    cache = LinMUCache(2, ssm_dtype=ssm_dtype)
    with torch.no_grad():
        block(u[:, :-8], position_embeddings=(rope[0][:, :-8], rope[1][:, :-8]), cache=cache,
              linmu_layout=TokenLayout.text_only(batch, length - 8, u.device))  # fmt: skip
    return cache, u[:, -8:], (rope[0][:, -8:], rope[1][:, -8:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pack", [False, True], ids=["modules", "packed"])
@pytest.mark.parametrize(
    "fields",
    [{}, {"shared_projections": True}, {"fusion": "head"}, {"output_norm_heads": 14}],
    ids=["own", "shared", "head", "half-norm"],
)
def test_block_decode_kernels_match_the_reference_on_gpu(fields, pack):
    """7B head shapes, bf16: 8 decode steps on the kernels (after a prefill on the fast path) against the same
    block on the "torch" reference over a copy of the cache: outputs and states."""
    block = _gpu_block(fields)
    ref_block = copy.deepcopy(block)
    ref_block.mate = ref_block.flex.mate = ref_block.swin.mate = block.mate.replace(ssd_backend="torch")
    if pack:
        pack_decode_weights(block)
    cache, u, rope = _prefilled(block, batch=2)
    ref_cache = copy.deepcopy(cache)
    layout = TokenLayout.text_only(2, 1, u.device)
    errs = []
    with torch.no_grad():
        for t in range(u.shape[1]):
            step = (u[:, t : t + 1], (rope[0][:, t : t + 1], rope[1][:, t : t + 1]))
            got = block(step[0], position_embeddings=step[1], cache=cache, linmu_layout=layout)[0]
            assert last_ssd_step_backend() == "triton"
            want = ref_block(step[0], position_embeddings=step[1], cache=ref_cache, linmu_layout=layout)[0]
            errs.append(rel_error(got, want))
    s_err = rel_error(cache.layer(1).ssm, ref_cache.layer(1).ssm)
    print(f"\n{fields} packed={pack}: worst step rel. error {max(errs):.1e}, state {s_err:.1e}")
    c_err = rel_error(cache.layer(1).conv, ref_cache.layer(1).conv)  # bit-equal but for the GEMV's rounding
    # bf16: the reference rounds between its ops (y, the D skip, the gate, each mix), the kernel once at the end
    assert max(errs) < 3e-2 and s_err < 1e-2 and c_err < 1e-2, (errs, s_err, c_err)


def _graph_step(name: str, batch: int) -> float:
    """One block's decode step recorded in a CUDA graph: three replays against eager steps on a copy of the cache,
    then the median replay time (ms) of 50."""
    from linmu_cli.cuda_graphs import record_cuda_graph

    block = _gpu_block({}, backend="torch" if name == "reference" else "auto")
    if name == "kernels+pack":
        pack_decode_weights(block)
    cache, u, rope = _prefilled(block, batch)
    eager_cache = copy.deepcopy(cache)
    step = (u[:, :1].clone(), (rope[0][:, :1].clone(), rope[1][:, :1].clone()))
    layout = TokenLayout.text_only(batch, 1, u.device)

    def run(c: LinMUCache) -> torch.Tensor:
        return block(step[0], position_embeddings=step[1], cache=c, linmu_layout=layout)[0]

    with torch.no_grad():
        for _ in range(2):  # what record_cuda_graph's warm-up does to the graph's cache
            run(eager_cache)
        graph, out = record_cuda_graph(lambda: run(cache), warmup_steps=2)
        assert last_ssd_step_backend() == ("torch" if name == "reference" else "triton")
        for _ in range(3):
            graph.replay()
            want = run(eager_cache)
            torch.cuda.synchronize()
            assert rel_error(out, want) < 1e-3, (name, rel_error(out, want))
        torch.testing.assert_close(cache.layer(1).ssm, eager_cache.layer(1).ssm, atol=1e-4, rtol=1e-3)
        ms = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            ms.append(a.elapsed_time(b))
    return sorted(ms)[len(ms) // 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 16])
def test_block_decode_step_captures_in_a_cuda_graph(batch):
    """No host sync, fixed buffers: one block's decode step replays as a CUDA graph equal to eager steps, on the
    reference, the kernels, and the kernels with packed weights; prints each replay's time (7B head shapes,
    bf16; Local-Swin's reference ops are in all three)."""
    times = {name: _graph_step(name, batch) for name in ("reference", "kernels", "kernels+pack")}
    print(f"\nbatch {batch}: one M-MATE block's decode step as a graph replay (ms): "
          + ", ".join(f"{k} {v:.4f}" for k, v in times.items()))  # fmt: skip
    assert times["kernels"] < times["reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_static_decoder_with_packed_weights_matches_one_without():
    """A tiny LinMU model (bf16) with `pack_decode_weights`, stepped by a captured `StaticDecoder`, against a copy
    without the pack stepped eagerly, fed the same tokens: logits within bf16 rounding (the GEMV sums differ)."""
    from linmu_cli.fast_decode import StaticDecoder
    from linmu_cli.models import convert_model
    from linmu_cli.tiny import build_tiny_teacher

    teacher, _ = build_tiny_teacher("qwen2_vl")
    teacher = teacher.to("cuda", torch.bfloat16)
    with torch.device("cuda"):
        student = convert_model(teacher, MateConfig(text_window=6))
    plain = copy.deepcopy(student)
    assert pack_decode_weights(student) > 0
    assert not any("_decode_pack" in m.__dict__ for m in plain.modules())
    packed = StaticDecoder.random(student, batch=2, position=50, seed=1)
    eager = StaticDecoder.random(plain, batch=2, position=50, seed=1)
    tokens = torch.randint(0, 900, (2, 8), device="cuda")
    with torch.no_grad():
        packed.capture(keep_state=True)  # the warm-up steps are undone: both start from the same state
        for t in range(tokens.shape[1]):
            got, want = packed.feed(tokens[:, t : t + 1]), eager.feed(tokens[:, t : t + 1])
            assert last_ssd_step_backend() == "triton"
            assert rel_error(got, want) < 2e-2, (t, rel_error(got, want))

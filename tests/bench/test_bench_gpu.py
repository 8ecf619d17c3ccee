"""GPU: the decode fast path of `linmu bench` against the reference paths.

- the SSD decode step through mamba-ssm's Triton kernel (in place) equals the PyTorch step;
- the fixed-buffer decode step equals the transformers decode path, and its CUDA-graph replay equals eager;
- the served teacher (static KV cache, every decode attention kernel, CUDA graph) equals transformers' path;
- the fast vision tower equals transformers' at both real tower shapes in bf16 (eager and compiled);
- a `linmu bench` run on the tiny model with CUDA events, memory stats and graphs gives a complete JSON.

Run with `python3 -m pytest -s -m gpu tests/bench/test_bench_gpu.py`.
"""

import copy

import pytest
import torch
from helpers import CACHE, interleave_graph_and_eager, prompt_inputs, video
from helpers import rel_error as rel

from linmu_cli import bench
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.models import convert_model
from linmu_cli.ops.ssd import last_ssd_step_backend, ssd_step, step_backend
from linmu_cli.tiny import build_tiny_teacher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mamba_decode_step_matches_the_torch_step(state_dtype):
    """Both state dtypes (LinMUCache ssm_dtype): mamba's kernel updates in float32 and stores in the state's dtype,
    as the torch step does."""
    dev = torch.device("cuda")
    if step_backend(dev) != "mamba":
        pytest.skip("mamba-ssm does not import here")
    g = torch.Generator(device=dev).manual_seed(0)
    b, h, p, n = 3, 28, 128, 128
    x = torch.randn(b, h, p, device=dev, generator=g).bfloat16()
    bb = (torch.randn(b, h, n, device=dev, generator=g) / n**0.5).bfloat16()
    cc = (torch.randn(b, h, n, device=dev, generator=g) / n**0.5).bfloat16()
    dt = torch.rand(b, h, device=dev, generator=g) * 0.1
    a = -torch.rand(h, device=dev, generator=g) * 8 - 1
    state = torch.randn(b, h, p, n, device=dev, generator=g).to(state_dtype)
    y_ref, s_ref = ssd_step(x, dt, a, bb, cc, state.clone(), backend="torch")
    s_fast = state.clone()
    y_fast, s_out = ssd_step(x, dt, a, bb, cc, s_fast)
    assert last_ssd_step_backend() == "mamba" and s_out.data_ptr() == s_fast.data_ptr()  # in place
    print(f"\nmamba step: y rel. error {rel(y_fast, y_ref):.1e}, state {rel(s_fast, s_ref):.1e}")
    assert s_fast.dtype == state_dtype
    assert rel(y_fast, y_ref) < 1e-2 and rel(s_fast, s_ref) < (1e-5 if state_dtype == torch.float32 else 1e-2)


def test_static_decoder_matches_the_transformers_path_on_gpu():
    dev = torch.device("cuda")
    teacher, processor = build_tiny_teacher("qwen2_vl")
    teacher = teacher.to(dev, torch.bfloat16)
    with torch.device(dev):
        student = convert_model(teacher, MateConfig(text_window=6, vision_window=[2, 1, 2]))
    inputs = prompt_inputs(processor, ["describe the video"], videos=[video(1)]).to(dev)
    cache, token, pos = bench.decode_start(student, inputs)
    with torch.no_grad():
        fast = StaticDecoder.from_cache(student, copy.deepcopy(cache), token, pos)  # steps its cache in place
        for _ in range(9):  # token by token; the ring of 6 wraps around
            ref = student(input_ids=token, position_ids=pos, use_cache=True, **{CACHE: cache}).logits[:, -1]
            got = fast.step()
            assert rel(got, ref) < 2e-2, rel(got, ref)
            token, pos = fast.tokens.clone(), pos + 1  # both paths consume the same tokens


def test_graph_replay_equals_eager_steps():
    dev = torch.device("cuda")
    teacher, _ = build_tiny_teacher("qwen2_5_vl")
    teacher = teacher.to(dev, torch.bfloat16)
    with torch.device(dev):
        student = convert_model(teacher, MateConfig(text_window=8))
    a = StaticDecoder.random(student, batch=4, position=100, seed=1)
    b = StaticDecoder.random(student, batch=4, position=100, seed=1)
    with torch.no_grad():
        for _ in range(2):  # what capture()'s warm-up does to b
            a.step()
        b.capture(warmup=2)
        for _ in range(5):
            la, lb = a.step().clone(), b.step().clone()
            assert torch.equal(a.tokens, b.tokens)
            assert rel(lb, la) < 1e-3


def test_graph_replays_and_eager_forwards_interleave_on_one_cache():
    """tests/layers/test_decode_state.py runs the same check on CPU, without the graph."""
    interleave_graph_and_eager(torch.device("cuda"))


@pytest.mark.parametrize("kernel", ["split_kv", "sdpa_masked", "matmul", "triton_split_kv"])
def test_served_teacher_matches_the_transformers_path_on_gpu(kernel):
    """bf16 on the GPU: the served teacher's step (each kernel, then its CUDA-graph replay) against the
    transformers forward on the same tokens."""
    from linmu_cli.teacher_decode import ServedTeacherDecoder

    dev = torch.device("cuda")
    teacher, processor = build_tiny_teacher("qwen2_5_vl")
    teacher = teacher.to(dev, torch.bfloat16)
    inputs = prompt_inputs(processor, ["describe the video"], videos=[video(3)]).to(dev)
    kw = bench.cache_kw(teacher)
    cache, token, pos = bench.decode_start(teacher, inputs)
    with torch.no_grad():
        served = ServedTeacherDecoder.from_cache(teacher, cache, token, pos, new_tokens=16, kernel=kernel)
        for i in range(8):
            if i == 3:
                served.capture(warmup=0)  # later steps are graph replays
            ref = teacher(input_ids=token, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1]
            got = served.step()
            assert rel(got, ref) < 3e-2, (kernel, i, rel(got, ref))
            token, pos = served.tokens.clone(), pos + 1


def test_decode_kernels_agree_at_the_7b_shape_and_auto_picks_a_timed_one():
    """Qwen2-VL-7B decode attention shape (4 kv heads x 7 queries, d=128) at 32k context, batch 1 and 16."""
    from linmu_cli.teacher_decode import KERNELS, DecodeShape, sdpa_masked, split_chunks

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for b in (1, 16):
        prompt, cap = 32_805, 32_805 + 144
        q = torch.randn(b, 4, 7, 128, device=dev, generator=g).bfloat16()
        k = torch.randn(b, 4, cap, 128, device=dev, generator=g).bfloat16()
        v = torch.randn(b, 4, cap, 128, device=dev, generator=g).bfloat16()
        shape = DecodeShape(
            torch.tensor([prompt + 5], device=dev), prompt, split_chunks(b, 4, prompt, dev), 128**-0.5
        )
        ref = sdpa_masked(q.float(), k.float(), v.float(), shape)
        for name, fn in KERNELS.items():
            got = fn(q, k, v, shape)
            assert rel(got, ref) < 2e-2, (name, b, rel(got, ref))
        print(f"\nbatch {b}: {shape.chunks} split-KV chunks of {shape.chunk}")


def test_fast_vision_tower_matches_transformers_in_bf16():
    """Both real tower shapes (7B configs, random weights, 2 frames at 448x448 and two odd-sized images), bf16,
    eager and compiled elementwise parts. Two bf16 towers of 32 random layers differ by ~2e-2 whatever the code
    (measured on the H200: transformers' SDPA-per-window vs one padded SDPA call), so the reference is the same
    tower in float32: the fast bf16 tower must be as close to it as transformers' own bf16 tower."""
    import copy

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from linmu_cli.archs import arch_config
    from linmu_cli.vision import use_fast_vision

    dev = torch.device("cuda")
    grid = torch.tensor([[2, 32, 32], [1, 16, 22], [1, 20, 12]], device=dev)
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    for alias, cls in (("qwen2-vl-7b", Qwen2VisionTransformerPretrainedModel),
                       ("qwen2.5-vl-7b", Qwen2_5_VisionTransformerPretrainedModel)):  # fmt: skip
        cfg = arch_config(alias).vision_config
        torch.manual_seed(0)
        with torch.device(dev):
            ref_tower = cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
        x = torch.randn(n, 1176, device=dev).bfloat16()
        with torch.no_grad():
            exact = copy.deepcopy(ref_tower).float()(x.float(), grid_thw=grid).pooler_output
            hf_err = rel(ref_tower(x, grid_thw=grid).pooler_output, exact)
            for compile_ in (False, True):
                tower = copy.deepcopy(ref_tower)
                info = use_fast_vision(tower, compile=compile_)
                err = rel(tower(x, grid_thw=grid).pooler_output, exact)
                print(f"\n{alias} compile={compile_}: rel. error vs float32 {err:.1e} (transformers bf16: "
                      f"{hf_err:.1e}); {info.describe()}; {info.paths}")  # fmt: skip
                assert err <= 1.25 * hf_err + 2e-3, (alias, compile_, err, hf_err)
                assert info.compile_error is None and sum(info.paths.values()) == 32
                del tower
        del ref_tower
        torch.cuda.empty_cache()


def test_bench_on_gpu_runs_every_measurement(tmp_path):
    res = bench.run_bench(arch="tiny-qwen2-vl", frames=[8, 16], device="cuda", json_path=tmp_path / "b.json",
                          repeats=1, max_batch=64, decode_seconds=0.2)  # fmt: skip
    env = res["environment"]
    assert env["kernels"]["linmu_decode_loop"] == "cuda_graph" and env["gpu"]
    assert env["kernels"]["decode_norm_mlp"].startswith(
        "rms_norm triton, add_rms_norm triton, silu_mul triton"
    )
    for row in res["results"]:
        for ttft in (row["teacher"]["ttft"], row["linmu"]["ttft"], row["linmu"]["floor"]):
            assert ttft["status"] == "ok" and ttft["prefill_peak_bytes"] > 0
        for model in ("teacher", "linmu"):
            for key in ("batch_1", "equal_batch", "max_batch"):  # teacher = the served teacher
                entry = row[model]["decode"][key]
                assert entry["status"] == "ok", (model, key, entry)
                assert entry["peak_bytes"] > 0
                assert set(entry["norm_mlp_kernels"].values()) == {"triton"}, (model, key)  # decode_layer's
        assert row["linmu"]["decode"]["max_batch"]["mode"].startswith("CUDA graph")
        for key, entry in row["teacher"]["decode"].items():
            assert entry["mode"].startswith("CUDA graph (static KV cache"), (key, entry["mode"])
            assert entry["attention_kernel"]["name"] in entry["mode"]
        assert row["teacher_hf"]["decode"]["batch_1"]["status"] == "ok"
        for entry in (row["teacher"]["ttft"], row["teacher"]["decode"]["batch_1"]):
            assert entry.get("of_matmul_peak", entry.get("of_copy_bandwidth")) > 0
        assert (
            row["linmu"]["decode"]["max_batch"]["batch"] == 64
        )  # the cap: the tiny model never fills an H200
        print(f"\n{row['frames']} frames: ratios {row['ratios']}")

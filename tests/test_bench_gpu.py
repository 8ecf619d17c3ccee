"""GPU: the decode fast path of `linmu bench` against the reference paths.

- the SSD decode step through mamba-ssm's Triton kernel (in place) equals the PyTorch step;
- the fixed-buffer decode step equals the transformers decode path, and its CUDA-graph replay equals eager;
- a `linmu bench` run on the tiny model with CUDA events, memory stats and graphs gives a complete JSON.

Run with `python3 -m pytest -s -m gpu tests/test_bench_gpu.py`.
"""

import pytest
import torch
from conftest import output_cache, prompt_inputs, video

from linmu_cli import bench
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.models import convert_model
from linmu_cli.ops.ssd_step import last_ssd_step_backend, ssd_step, step_backend
from linmu_cli.tiny import build_tiny_teacher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_mamba_decode_step_matches_the_torch_step():
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
    state = torch.randn(b, h, p, n, device=dev, generator=g)
    y_ref, s_ref = ssd_step(x, dt, a, bb, cc, state.clone(), backend="torch")
    s_fast = state.clone()
    y_fast, s_out = ssd_step(x, dt, a, bb, cc, s_fast)
    assert last_ssd_step_backend() == "mamba" and s_out.data_ptr() == s_fast.data_ptr()  # in place
    print(f"\nmamba step: y rel. error {rel(y_fast, y_ref):.1e}, state {rel(s_fast, s_ref):.1e}")
    assert rel(y_fast, y_ref) < 1e-2 and rel(s_fast, s_ref) < 1e-5


def test_static_decoder_matches_the_transformers_path_on_gpu():
    dev = torch.device("cuda")
    teacher, processor = build_tiny_teacher("qwen2_vl")
    teacher = teacher.to(dev, torch.bfloat16)
    with torch.device(dev):
        student = convert_model(teacher, MateConfig(text_window=6, vision_window=[2, 1, 2]))
    inputs = prompt_inputs(processor, ["describe the video"], videos=[video(1)]).to(dev)
    with torch.no_grad():
        out = student(**inputs, use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = bench._next_positions(student, inputs["input_ids"].shape[1], 1, dev)
        fast = StaticDecoder.from_cache(student, cache, token, pos)
        for _ in range(9):  # token by token; the ring of 6 wraps around
            ref = student(input_ids=token, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
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


def test_bench_on_gpu_runs_every_measurement(tmp_path):
    res = bench.run_bench(arch="tiny-qwen2-vl", frames=[8, 16], device="cuda", json_path=tmp_path / "b.json",
                          repeats=1, max_batch=64, decode_seconds=0.2)  # fmt: skip
    env = res["environment"]
    assert env["kernels"]["linmu_decode_loop"] == "cuda_graph" and env["gpu"]
    for row in res["results"]:
        for ttft in (row["teacher"]["ttft"], row["linmu"]["ttft"], row["linmu"]["floor"]):
            assert ttft["status"] == "ok" and ttft["prefill_peak_bytes"] > 0
        for model in ("teacher", "linmu"):
            for key in ("batch_1", "equal_batch", "max_batch"):
                entry = row[model]["decode"][key]
                assert entry["status"] == "ok", (model, key, entry)
                assert entry["peak_bytes"] > 0
        assert row["linmu"]["decode"]["max_batch"]["mode"].startswith("CUDA graph")
        assert (
            row["linmu"]["decode"]["max_batch"]["batch"] == 64
        )  # the cap: the tiny model never fills an H200
        print(f"\n{row['frames']} frames: ratios {row['ratios']}")

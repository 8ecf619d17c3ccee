"""`linmu bench` on CPU: the command and its JSON schema, argument errors, the floor mode, the fixed-buffer
decode step, the real-shape configs. No timing assertions (CPU numbers mean nothing)."""

import copy
import json

import pytest
import torch
from helpers import output_cache, prompt_inputs, video
from typer.testing import CliRunner

import linmu_cli
from linmu_cli import bench
from linmu_cli.archs import ARCHS, build_random_model
from linmu_cli.cli import app
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.layers import flex_ma, local_swin
from linmu_cli.layers.floor import skip_mixers
from linmu_cli.layers.layout import Segment, TokenLayout
from linmu_cli.models import convert_model
from linmu_cli.ops.window_attention import sliding_window_attention

runner = CliRunner()


def test_cpu_smoke_run_writes_the_documented_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = runner.invoke(app, ["bench", "--arch", "tiny-qwen2-vl", "--frames", "8", "--device", "cpu",
                              "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "TTFT" in res.output
        and "Decode tok/s: LinMU vs the served teacher" in res.output
        and "crossover" in res.output
    )
    assert png.stat().st_size > 10_000
    data = json.loads(out.read_text())
    assert data["schema"] == "linmu-bench/2"
    env = data["environment"]
    for key in ("device", "torch", "transformers", "dtype", "python", "kernels", "ceilings"):
        assert key in env
    assert env["kernels"]["flex_ma_prefill"] == "torch" and env["kernels"]["flex_ma_decode"] == "torch"
    assert (
        env["kernels"]["linmu_decode_loop"] == "eager"
        and "static KV cache" in env["kernels"]["teacher_decode_loop"]
    )
    assert env["kernels"]["teacher_hf_decode_loop"] == "transformers eager, DynamicCache"
    assert env["kernels"]["decode_norm_mlp"].startswith("rms_norm torch, add_rms_norm torch, silu_mul torch")
    assert env["kernels"]["vision"].startswith("linmu fast vision") and data["config"]["fast_vision"] is True
    assert env["ceilings"]["matmul_flops_per_s"] > 0 and env["ceilings"]["copy_bytes_per_s"] > 0
    assert (
        0
        < data["config"]["memory_check"]["estimate_bytes"]
        < data["config"]["memory_check"]["available_bytes"]
    )
    assert data["config"]["frames"] == [8] and data["config"]["mate"]["text_window"] == 512
    assert data["weights_bytes"]["teacher"] > data["weights_bytes"]["linmu_own"] > 0
    (row,) = data["results"]
    assert row["frames"] == 8 and row["video_tokens"] == 4 * 16 * 16  # frames/2 x (448/28)^2
    assert row["lm_tokens"] == row["video_tokens"] + data["config"]["text_tokens"]
    assert row["vision_warmup_s"] > 0  # the untimed tower pass before this frame count's runs
    for ttft in (row["teacher"]["ttft"], row["linmu"]["ttft"], row["linmu"]["floor"]):
        assert ttft["status"] == "ok" and len(ttft["runs_s"]) == 2
        parts = ttft["vision_s"] + ttft["prefill_s"] + ttft["first_step_s"]
        assert ttft["vision_s"] > 0 and parts == pytest.approx(ttft["total_s"], rel=1e-6)
        assert "prefill_peak_bytes" in ttft  # None on CPU
        # roofline: analytic matrix FLOPs over the TTFT, against the measured matmul rate
        assert ttft["flops"]["linear"] > 0 and ttft["achieved_tflops"] > 0 and ttft["of_matmul_peak"] > 0
    assert (
        row["teacher"]["ttft"]["flops"]["attention"] > row["linmu"]["floor"]["flops"]["attention"] > 0
    )  # vision
    assert row["linmu"]["ttft_over_floor"] > 0
    for model in ("teacher", "linmu"):
        dec = row[model]["decode"]
        assert dec["batch_1"]["cache_fill"] == "prefill" and dec["batch_1"]["batch"] == 1
        assert dec["equal_batch"]["batch"] == 16 and dec["equal_batch"]["cache_fill"] == "random"
        mx = dec["max_batch"]  # the CPU cap is the equal batch: the largest batch is never below it
        assert (
            mx["batch"] == 16
            and mx["search"]["largest_fit"] == 16
            and mx["search"]["tried"] == [1, 2, 4, 8, 16]
        )
        for entry in (dec["batch_1"], dec["equal_batch"], mx):
            assert entry["status"] == "ok" and entry["tokens_per_s"] > 0 and entry["steps"] >= 2
            assert entry["cache_bytes_per_seq"] > 0 and "peak_bytes" in entry and entry["mode"]
            assert entry["achieved_bytes_per_s"] == pytest.approx(
                entry["bytes_per_step"] * 1000 / entry["step_ms"]
            )
            assert entry["of_copy_bandwidth"] > 0
            assert set(entry["norm_mlp_kernels"].values()) == {"torch"}  # decode_layer's norms and MLP
        assert (
            mx["bytes_per_step"] > dec["batch_1"]["bytes_per_step"]
        )  # 16 caches / states read instead of one
    for entry in row["teacher"]["decode"].values():
        assert entry["mode"] == "eager (static KV cache, split_kv decode attention)"
        assert entry["attention_kernel"]["name"] == "split_kv"
    hf = row["teacher_hf"]["decode"]
    assert (
        set(hf) == {"batch_1", "equal_batch"} and hf["batch_1"]["mode"] == "transformers eager, DynamicCache"
    )
    assert hf["equal_batch"]["batch"] == 16 and hf["batch_1"]["tokens_per_s"] > 0
    assert row["linmu"]["decode"]["batch_1_hf"]["mode"].startswith("transformers")
    # LinMU's decode state per sequence is the same at batch 1 (from the prefill) and batch 16 (random)
    ld = row["linmu"]["decode"]
    assert ld["equal_batch"]["cache_bytes_per_seq"] == ld["max_batch"]["cache_bytes_per_seq"]
    assert set(row["ratios"]) == {"ttft", "decode_batch_1", "decode_equal_batch", "decode_max_batch",
                                  "decode_batch_1_vs_teacher_hf", "decode_equal_batch_vs_teacher_hf",
                                  "decode_batch_1_same_harness", "teacher_served_over_hf_batch_1"}  # fmt: skip
    rd = row["ratios"]
    assert rd["decode_batch_1"] == pytest.approx(
        row["linmu"]["decode"]["batch_1"]["tokens_per_s"]
        / row["teacher"]["decode"]["batch_1"]["tokens_per_s"]
    )
    assert all(v > 0 for v in row["ratios"].values())
    assert "text" in data["crossover"] and data["elapsed_s"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "8"], "exactly one of --model DIR or --arch"),
        (["--arch", "tiny-qwen2-vl", "--model", "x", "--frames", "8"], "exactly one"),
        (["--arch", "qwen9-vl", "--frames", "8"], "unknown --arch 'qwen9-vl'"),
        (["--arch", "tiny-qwen2-vl", "--frames", "7"], "even count"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8,x"], "frame counts like"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--resolution", "100"], "multiple of 28"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--batch", "many"], "'auto' or a positive integer"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--batch", "0"], "'auto' or a positive integer"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--dtype", "int3"], "unknown --dtype"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--device", "tpu"], "choose cuda or cpu"),
        (["--arch", "tiny-qwen2-vl", "--frames", "8", "--new-tokens", "0"], "--new-tokens"),
        (["--model", "/no/such/dir", "--frames", "8", "--device", "cpu"], "no config.json"),
        (
            ["--arch", "tiny-qwen2-vl", "--frames", "8", "--teacher-kernel", "magic"],
            "--teacher-kernel 'magic'",
        ),
        (
            ["--arch", "tiny-qwen2-vl", "--frames", "8", "--vision-compile", "maybe"],
            "--vision-compile 'maybe'",
        ),
    ],
)
def test_bad_arguments_are_one_clear_line(args, message):
    if message == "choose cuda or cpu" or "--device" not in args:
        args = [*args, "--device", "cpu"] if "--device" not in args else args
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so():
    res = runner.invoke(app, ["bench", "--arch", "tiny-qwen2-vl", "--frames", "8"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.output


@pytest.mark.parametrize("tiny", ["qwen2_vl"], indirect=True)
def test_vision_warm_up_runs_the_tower_once_untimed_and_skips_text(tiny):
    """From 512 frames each model's TTFT is one run, teacher first: a new shape's one-time costs of the shared
    tower must not land in one model's timed run (`warm_vision` before the runs)."""
    from linmu_cli.bench.runner import warm_vision

    _, teacher, _ = tiny
    prompt = bench.synthetic_video(teacher.config, 4, 56, torch.device("cpu"), torch.float32)
    calls = []
    hook = teacher.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        seconds = warm_vision(teacher, prompt, torch.device("cpu"))
        text_only = bench.VideoPrompt(4, 56, 0, {"input_ids": prompt.inputs["input_ids"]})
        assert warm_vision(teacher, text_only, torch.device("cpu")) == 0.0
    finally:
        hook.remove()
    assert seconds > 0 and calls == [1]


def test_synthetic_video_has_the_processor_layout():
    config = build_random_model("tiny-qwen2-vl", torch.float32, "cpu").config
    p = bench.synthetic_video(
        config, frames=6, resolution=56, device=torch.device("cpu"), dtype=torch.float32
    )
    ids = p.inputs["input_ids"][0]
    assert p.video_tokens == 3 * 2 * 2 and (ids == config.video_token_id).sum() == p.video_tokens
    assert p.inputs["pixel_values_videos"].shape == (3 * 4 * 4, 3 * 2 * 14 * 14)
    assert p.inputs["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert (p.inputs["mm_token_type_ids"][0] == 2).sum() == p.video_tokens
    start = (ids == config.vision_start_token_id).nonzero().item()
    assert ids[start + 1 + p.video_tokens] == config.vision_end_token_id
    assert ids[:start].max() < config.image_token_id  # ordinary text ids around the video


def _counting(monkeypatch, module, name, counts):
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_floor_skips_the_scans_and_attention_but_runs_every_projection(tiny, monkeypatch):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    counts: dict[str, int] = {}
    for module, name in ((flex_ma, "ssd_scan"), (flex_ma, "ssd_step"), (local_swin, "sliding_window_attention"),
                         (local_swin, "window_attention"), (local_swin, "decode_attention")):  # fmt: skip
        _counting(monkeypatch, module, name, counts)
    projections = [(n, m) for n, m in student.named_modules() if n.endswith(("_proj", "_proj_bwd", ".fuse"))
                   and ".self_attn." in n]  # fmt: skip
    assert {n.split(".")[-1] for n, _ in projections} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "dt_proj", "dt_proj_bwd", "fuse"}  # fmt: skip
    calls = dict.fromkeys((n for n, _ in projections), 0)
    for n, m in projections:
        m.register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
    inputs = prompt_inputs(processor, ["what happens?"], videos=[video(0)])

    def run():
        counts.clear()
        for n in calls:
            calls[n] = 0
        with torch.no_grad():
            out = student(**inputs, use_cache=True)
            step = inputs["input_ids"][:, -1:]
            student(input_ids=step, cache=output_cache(out), use_cache=True)
        return dict(counts), dict(calls)

    normal, normal_calls = run()
    with skip_mixers():
        floor, floor_calls = run()
    assert normal["ssd_scan"] > 0 and normal["ssd_step"] > 0 and normal["window_attention"] > 0
    assert normal["sliding_window_attention"] > 0 and normal["decode_attention"] > 0
    assert floor == {}  # no scan, no step, no attention of any kind
    assert floor_calls == normal_calls and all(v > 0 for v in floor_calls.values())


def test_static_decoder_equals_the_transformers_decode_path(tiny):
    _, teacher, processor = tiny
    for window in (5, 512):  # a ring that wraps around, and one that never fills
        student = convert_model(teacher, MateConfig(text_window=window, vision_window=[2, 1, 2]))
        inputs = prompt_inputs(processor, ["describe the video"], videos=[video(1)])
        cache, token, pos = bench.decode_start(student, inputs)
        with torch.no_grad():
            # the runner steps its cache in place: a copy, so the reference below has its own
            fast = StaticDecoder.from_cache(student, copy.deepcopy(cache), token, pos)
            for _ in range(7):
                ref = student(input_ids=token, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
                torch.testing.assert_close(fast.step(), ref, atol=1e-5, rtol=1e-5)
                token, pos = ref.argmax(-1, keepdim=True), pos + 1
                assert torch.equal(fast.tokens, token)


def test_prefill_cache_holds_copies_not_views_of_the_prompt(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    with torch.no_grad():
        cache = output_cache(student(input_ids=torch.randint(0, 900, (1, 300)), use_cache=True))
    for state in cache.layers:
        for _, t in state.tensors():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # nothing else kept alive


def test_text_block_restriction_matches_the_full_sliding_window():
    torch.manual_seed(0)
    layout = TokenLayout.text_only(2, 40, torch.device("cpu"))
    layout.segments = [[Segment(3, 2, 4, 4)], [Segment(10, 1, 4, 4), Segment(26, 1, 2, 4)]]
    q, k, v = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    full = sliding_window_attention(q, k, v, valid, 6, 0.3)
    part = sliding_window_attention(q, k, v, valid, 6, 0.3, layout.text_blocks(6))
    text = ~layout.is_vision()
    torch.testing.assert_close(part.transpose(1, 2)[text], full.transpose(1, 2)[text])


def test_crossover_interpolates_in_log_frames():
    rows = [{"frames": f, "ratios": {"ttft": r}} for f, r in ((64, 0.5), (128, 0.8), (256, 1.6), (512, 2.0))]
    assert bench.crossover(rows)["frames"] == 152  # 2 ** (7 + 0.25)
    assert bench.crossover(rows[:2])["frames"] is None and "not reached" in bench.crossover(rows[:2])["text"]
    assert "every measured" in bench.crossover(rows[2:])["text"]


def test_real_shape_configs_match_the_published_parameter_counts():
    for alias, arch in ARCHS.items():
        model = build_random_model(alias, torch.bfloat16, "meta")
        assert sum(p.numel() for p in model.parameters()) == arch.params, alias
    model = build_random_model("qwen2-vl-7b", torch.bfloat16, "meta")
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert model.config.vision_config.depth == 32 and model.config.vision_config.embed_dim == 1280


def test_model_dirs_load_as_teacher_and_student(tmp_path):
    # the function, not the package attribute (the submodule shadows it once imported anywhere)
    from linmu_cli.conversion import convert

    report = convert("tiny-qwen2-vl", tmp_path / "linmu", save_teacher=tmp_path / "teacher")
    ids = torch.randint(0, 900, (1, 20))
    cpu = torch.device("cpu")
    t1, s1, _ = bench.build_models(str(report.teacher_out), None, torch.float32, cpu, {})
    t2, s2, source = bench.build_models(str(report.out), None, torch.float32, cpu, {})
    assert "LinMU checkpoint" in source and type(s2).__name__ == type(s1).__name__
    with (
        torch.no_grad()
    ):  # the teacher rebuilt from the LinMU checkpoint is the teacher it was converted from
        torch.testing.assert_close(t2(input_ids=ids).logits, t1(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s2(input_ids=ids).logits, s1(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(linmu_cli.LinmuError, match="already converted"):
        bench.build_models(str(report.out), None, torch.float32, cpu, {"text_window": 8})


def test_random_teacher_source_has_the_real_shape_and_the_tiny_tokenizer():
    """`teacher=random:qwen2-vl-7b`: the real architecture, seeded random weights, token ids of the tiny tokenizer."""
    from linmu_cli.errors import LinmuError
    from linmu_cli.loading import load_model
    from linmu_cli.sources import known_aliases, resolve_source

    assert resolve_source("random:qwen2-vl-7b") == ("random", "qwen2-vl-7b")
    assert "random:qwen2.5-vl-7b" in known_aliases()
    with pytest.raises(LinmuError, match="random:qwen2-vl-2b"):
        resolve_source("random:qwen2-vl-8b")
    teacher = load_model("random:qwen2-vl-7b", device="meta")
    config, tok = teacher.model.config, teacher.processor.tokenizer
    assert config.text_config.hidden_size == 3584 and config.text_config.num_hidden_layers == 28
    for field, token in [("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                         ("vision_start_token_id", "<|vision_start|>")]:  # fmt: skip
        assert getattr(config, field) == tok.convert_tokens_to_ids(token)
    assert len(tok) <= config.text_config.vocab_size
    # the released processors' pixel budget, so 448x448 frames are not scaled down
    assert teacher.processor.video_processor.size["longest_edge"] == 12_845_056


@pytest.mark.parametrize("kernel", ["split_kv", "sdpa_masked", "matmul"])
def test_served_teacher_decoder_equals_the_transformers_decode_path(tiny, kernel):
    """The served teacher (static KV cache, own step, GQA folded) computes what transformers' forward does."""
    from linmu_cli.teacher_decode import ServedTeacherDecoder

    _, teacher, processor = tiny
    inputs = prompt_inputs(processor, ["describe the video"], videos=[video(2)])
    cache, token, pos = bench.decode_start(teacher, inputs)
    with torch.no_grad():
        served = ServedTeacherDecoder.from_cache(teacher, cache, token, pos, new_tokens=8, kernel=kernel)
        assert served.choice.name == kernel and served.prompt == inputs["input_ids"].shape[1]
        for _ in range(6):
            kw = {bench.cache_kw(teacher): cache}
            ref = teacher(input_ids=token, position_ids=pos, use_cache=True, **kw).logits[:, -1]
            torch.testing.assert_close(served.step(), ref, atol=1e-4, rtol=1e-4)
            token, pos = ref.argmax(-1, keepdim=True), pos + 1
            assert torch.equal(served.tokens, token)
        assert served.read_bytes() == 2 * len(served.keys) * served.kv_heads * served.head_dim * 4 * (
            served.prompt + 7
        )


def test_split_kv_merges_chunks_exactly():
    """Several chunks + a masked tail give softmax attention over exactly the valid slots."""
    from linmu_cli.teacher_decode import DecodeShape, sdpa_masked, split_kv

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    length = torch.tensor([28])  # the current token's slot: 29 valid
    shape = DecodeShape(length, always_valid=27, chunks=4, scale=0.25)  # 4 chunks of 6, tail of 16 (5 valid)
    ref = torch.softmax((q @ k[:, :, :29].transpose(-1, -2)) * 0.25, -1) @ v[:, :, :29]
    torch.testing.assert_close(split_kv(q, k, v, shape), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_masked(q, k, v, shape), ref, atol=1e-5, rtol=1e-5)


def test_served_teacher_decoder_refuses_to_run_past_its_cache():
    from linmu_cli.teacher_decode import ServedTeacherDecoder

    teacher = build_random_model("tiny-qwen2-vl", torch.float32, "cpu")
    dec = ServedTeacherDecoder.random(teacher, batch=2, prompt=30, new_tokens=2)
    dec.step(), dec.step()
    with pytest.raises(RuntimeError, match="static KV cache full"):
        dec.step()
    with pytest.raises(linmu_cli.LinmuError, match="unknown teacher decode kernel"):
        ServedTeacherDecoder.random(teacher, batch=1, prompt=30, new_tokens=2, kernel="magic")


def test_median_of_two_repeats_is_their_mean_not_the_slower_run():
    runs = [{"total_s": t, "vision_s": t / 2, "prefill_s": t / 4, "first_step_s": t / 4, "peak_bytes": None}
            for t in (1.0, 3.0)]  # fmt: skip
    two = bench.summarize_ttft(runs)
    assert two["total_s"] == 2.0 and two["vision_s"] + two["prefill_s"] + two["first_step_s"] == 2.0
    three = bench.summarize_ttft([*runs, {**runs[0], "total_s": 2.5}])
    assert three["total_s"] == 2.5


def test_cpu_allocator_failure_is_reported_as_oom():
    assert bench.guarded(lambda: {"x": torch.empty(1 << 60, dtype=torch.uint8)}) == {"status": "OOM"}


def test_frames_beyond_the_memory_are_refused_before_anything_is_built(tmp_path):
    out = tmp_path / "sub" / "b.json"
    res = runner.invoke(app, ["bench", "--arch", "tiny-qwen2-vl", "--frames", "100000", "--device", "cpu",
                              "--json", str(out)])  # fmt: skip
    assert res.exit_code == 2 and "needs about" in res.output and "available" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "sub").exists()  # nothing written


def test_memory_estimate_refuses_8000_frames_on_a_16_gib_machine(monkeypatch):
    config = build_random_model("tiny-qwen2-vl", torch.float32, "cpu").config
    small = bench.estimate_bytes(config, 8, 448, torch.bfloat16, 0).total
    big = bench.estimate_bytes(config, 8000, 448, torch.bfloat16, 0).total
    assert big > 16 * 2**30 and 900 < big / small < 1100  # linear in frames: 8000 frames need > 16 GiB
    # the memory check reads the free memory in linmu_cli.bench.timing
    monkeypatch.setattr(bench.timing, "available_bytes", lambda _dev: 16 * 2**30)
    res = runner.invoke(app, ["bench", "--arch", "tiny-qwen2-vl", "--frames", "64,8000", "--device", "cpu"])
    assert res.exit_code == 2 and "--frames 8000" in res.output and "16.0 GiB available" in res.output
    assert "frames fit" in res.output


def test_memory_estimate_is_close_to_the_measured_7b_prefill_peak():
    """docs/benchmarks.md: 12.7 GiB teacher prefill peak above the weights at 512 frames, 7B shape, H200."""
    from linmu_cli.archs import arch_config

    est = bench.estimate_bytes(arch_config("qwen2-vl-7b"), 512, 448, torch.bfloat16, 0)
    measured = 12.7 * 2**30 + est.pixels  # the pixels were allocated before the measured peak started
    assert measured <= est.total <= 1.35 * measured  # never below what was measured, not far above it


@pytest.mark.parametrize("where", ["file_parent", "proc"])
def test_unwritable_json_fails_before_the_bench(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "b.json" if where == "file_parent" else "/proc/linmu-bench/b.json"
    res = runner.invoke(app, ["bench", "--arch", "tiny-qwen2-vl", "--frames", "8", "--device", "cpu",
                              "--json", str(target)])  # fmt: skip
    assert res.exit_code == 2 and "cannot write there" in res.output, res.output
    assert "building models" not in res.output  # refused before anything ran


def _one_row_result():
    """A one-frame-count result with every curve of the plot (values as a CPU run would give)."""
    ok = lambda v, **kw: {"status": "ok", "tokens_per_s": v, "batch": 1, **kw}  # noqa: E731
    ttft = lambda t: {"status": "ok", "total_s": t}  # noqa: E731
    row = {"frames": 8, "teacher": {"ttft": ttft(0.06), "decode": {"batch_1": ok(700.0), "equal_batch": ok(4000.0),
                                                                  "max_batch": ok(4100.0)}},
           "teacher_hf": {"decode": {"batch_1": ok(300.0), "equal_batch": ok(3000.0)}},
           "linmu": {"ttft": ttft(0.15), "floor": ttft(0.09), "ttft_over_floor": 1.6,
                     "decode": {"batch_1": ok(450.0), "equal_batch": ok(4300.0), "max_batch": ok(4400.0)}},
           "ratios": {"ttft": 0.4}}  # fmt: skip
    return {"results": [row], "config": {"equal_batch": 16, "source": "--arch tiny", "resolution": 448},
            "environment": {"device": "cpu", "dtype": "bfloat16"}, "crossover": {"frames": None}}  # fmt: skip


def test_single_frame_count_plot_has_labelled_distinct_points():
    import matplotlib.pyplot as plt

    fig = bench.make_figure(_one_row_result())
    ttft_ax, decode_ax = fig.axes
    for ax, n in ((ttft_ax, 3), (decode_ax, 7)):
        lines = ax.get_lines()
        assert len(lines) == n and all(line.get_marker() not in (None, "None", "") for line in lines)
        styles = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}
        assert len(styles) == n  # LinMU and its floor (and every decode curve) look different
        assert len(ax.texts) >= n  # each single point carries its value
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels, "log axis without tick labels"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["8"]
    plt.close(fig)


def test_tables_fit_80_columns_without_cutting_headers():
    from rich.console import Console

    result = json.loads(json.dumps(_one_row_result()))
    row = result["results"][0]
    row.update(lm_tokens=1061)
    row["teacher"]["ttft"].update(vision_s=0.05, prefill_s=0.01, achieved_tflops=0.03, of_matmul_peak=0.2)
    row["linmu"]["ttft"].update(vision_s=0.05, prefill_s=0.09, achieved_tflops=0.01, of_matmul_peak=0.1)
    row["ratios"].update(decode_batch_1=0.6, decode_equal_batch=1.1, decode_max_batch=1.1)
    for table in bench.tables(result):
        console = Console(width=80, record=True)
        console.print(table)
        text = console.export_text()
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80
        for col in table.columns:
            assert str(col.header) in text


def test_bench_runs_on_a_linmu_checkpoint_dir(tmp_path):
    """`--model DIR` of a converted checkpoint: config read without building (memory check), teacher rebuilt."""
    from linmu_cli.conversion import convert

    report = convert("tiny-qwen2-vl", tmp_path / "linmu")
    res = runner.invoke(app, ["bench", "--model", str(report.out), "--frames", "8", "--device", "cpu", "--repeats", "1",
                              "--decode-seconds", "0.01", "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert (
        "LinMU checkpoint" in data["config"]["source"]
        and data["config"]["memory_check"]["estimate_bytes"] > 0
    )
    assert data["results"][0]["ratios"]["ttft"] > 0


def test_bench_report_labels_the_teacher_by_schema():
    """benchmarks/bench_report.py: v2 results are against the served teacher, v1 files against the eager one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    result = _one_row_result()
    row = result["results"][0]
    row.update(lm_tokens=1061)
    row["ratios"].update(decode_batch_1=0.6, decode_equal_batch=1.1, decode_max_batch=1.1)
    v2 = report.markdown({**result, "schema": "linmu-bench/2"})
    assert "TTFT served teacher (s)" in v2 and "| 8 | 1,061 | 0.06 | 0.15 | 0.09 | 0.40x | 1.60x |" in v2
    assert "0.6x / 1.1x / 1.1x" in v2 and "300 / 3000" in v2  # ratios, then the transformers teacher column
    v1 = report.markdown({**result, "schema": "linmu-bench/1"})
    assert "eager teacher (linmu-bench/1)" in v1 and "served" not in v1

"""`linmu distill`: recipes, the three stages, resume after SIGKILL, errors, bad data, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

import linmu_cli  # noqa: F401
from linmu_cli.cli import app
from linmu_cli.distillation import checkpoint, distill, load_recipe
from linmu_cli.errors import LinmuError

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"
SHORT = ["stages.stage1.steps=6", "stages.stage2.steps=4", "stages.stage3.steps=4", "data.heldout=2",
         "stages.stage1.save_every=3", "stages.stage2.save_every=2", "stages.stage3.save_every=2"]  # fmt: skip


def losses(out: Path) -> list[tuple[str, int, float]]:
    return [
        (r["stage"], r["step"], r["loss"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    results = distill(RECIPE, [f"output={out}", *SHORT])
    return out, results


def test_all_three_stages_bring_the_student_closer(full_run):
    out, results = full_run
    assert list(results) == ["stage1", "stage2", "stage3"]
    for name, res in results.items():
        assert res["after"]["mean_rel_error"] < res["before"]["mean_rel_error"], name
    assert results["stage3"]["after"]["logit_kl"] < results["stage1"]["before"]["logit_kl"]
    # each stage says where it started
    assert results["stage1"]["started_from"] == "conversion of tiny-qwen2-vl"
    assert json.loads((out / "stage3" / "stage.json").read_text())["started_from"] == str(out / "stage2")
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"stage1", "stage2", "stage3"}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 4 + 4
    assert {"stage", "step", "loss", "hidden", "lr", "tokens_per_s"} <= set(records[0])
    assert "kl" in records[-1]


def test_final_is_merged_and_loads_with_auto_classes(full_run):
    out, _ = full_run
    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(final).__name__.startswith("LinMU")
    assert not any("lora" in n for n in final.state_dict())
    stage2 = weights(out / "stage2")
    mlp = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(final.state_dict()[mlp], stage2[mlp])  # LoRA merged into the MLP
    teacher = AutoModelForImageTextToText.from_pretrained(out / "stage1")  # stage outputs load too
    assert torch.equal(teacher.state_dict()[mlp], stage2[mlp])  # stages 1-2 never touch the MLPs
    assert (out / "final" / "tokenizer.json").exists() and (out / "final" / "recipe.yaml").exists()


def test_recorded_recipe_loads_back_as_the_one_that_ran(full_run):
    """recipe.yaml is a recipe again (`linmu distill OUTPUT/recipe.yaml` reruns it): the schema's dump is valid
    input, and its model section is the whole MateConfig the student was converted with."""
    out, _ = full_run
    ran = load_recipe(RECIPE, [f"output={out}", *SHORT])
    for path in (out / "recipe.yaml", out / "final" / "recipe.yaml"):
        again = load_recipe(path)
        assert again.to_dict() == ran.to_dict() and again.model == ran.mate
    assert json.loads((out / "final" / "config.json").read_text())["mate"] == ran.mate.to_dict()


def test_stage_refuses_to_start_without_its_predecessor(tmp_path, full_run):
    with pytest.raises(LinmuError, match="stage2 starts from stage1's output"):
        distill(RECIPE, [f"output={tmp_path / 'x'}", *SHORT], stage="stage2")
    src, _ = full_run
    res = distill(
        RECIPE,
        [f"output={tmp_path / 'y'}", *SHORT, f"stages.stage2.init_from={src / 'stage1'}"],
        stage="stage2",
    )
    assert res["stage2"]["started_from"] == str(src / "stage1")


def test_existing_output_needs_resume_or_force(full_run):
    out, _ = full_run
    with pytest.raises(LinmuError, match="--resume"):
        distill(RECIPE, [f"output={out}", *SHORT])


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path, full_run):
    ref_out, _ = full_run
    out = tmp_path / "killed"
    steps = ["stages.stage1.steps=40", "stages.stage1.save_every=4"]
    cmd = [sys.executable, "-m", "linmu_cli", "distill", str(RECIPE), f"output={out}", *SHORT, *steps]
    # both runs get one explicit thread count (the CLI's own policy picks fewer threads on a busy machine, and CPU
    # kernels round differently with another count)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LINMU_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpts = out / "checkpoints" / "stage1"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-0000008").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "--resume"], check=True, env=env, stdout=subprocess.DEVNULL)
    # the uninterrupted reference runs as the same kind of process with the same environment (an in-process run
    # inherits this test process's thread pools and earlier tests' state)
    reference = tmp_path / "reference"
    ref_cmd = [*cmd[:4], str(RECIPE), f"output={reference}", *SHORT, *steps]
    subprocess.run(ref_cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    resumed, uninterrupted = losses(out), losses(reference)
    assert [r[:2] for r in resumed] == [r[:2] for r in uninterrupted]  # every step logged once, none lost
    # the steps after the resume repeat the uninterrupted run bit for bit (a state restored wrongly - optimizer
    # moments, lr, data position, RNG - shows at the first of them) ...
    assert resumed[:12] == uninterrupted[:12]
    # ... and the rest to float32 rounding: once seen in CI, one ulp at step 14 (a GEMM's blocking differs between
    # processes on some hosts), which then drifts to ~1e-6
    for (stage, step, x), (_, _, y) in zip(resumed, uninterrupted, strict=True):
        assert x == pytest.approx(y, rel=1e-4), (stage, step)
    a, b = weights(out / "final"), weights(reference / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    over = [f"output={out}", *SHORT, "stages.stage1.steps=30", "stages.stage1.lr=100", "stages.stage1.max_grad_norm=1e30",
            "stages.stage1.schedule=constant", "stages.stage1.save_every=1"]  # fmt: skip
    with pytest.raises(LinmuError, match="the loss became"):
        distill(RECIPE, over)
    last = sorted((out / "checkpoints" / "stage1").glob("step-*"))[-1]
    state = checkpoint.load(last)
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_recipe_errors_name_the_key():
    with pytest.raises(LinmuError, match="did you mean 'steps'"):
        load_recipe(RECIPE, ["stages.stage1.step=3"])
    with pytest.raises(LinmuError, match="did you mean 'stage2'"):
        load_recipe(RECIPE, ["stages.stag2.steps=3"])
    with pytest.raises(LinmuError, match=r"stages.stage1.lr: expected float"):
        load_recipe(RECIPE, ["stages.stage1.lr=fast"])
    with pytest.raises(LinmuError, match="layerwise stages regress hidden states only"):
        load_recipe(RECIPE, ["stages.stage1.loss.kl=1.0"])
    with pytest.raises(LinmuError, match="recipe.model"):
        load_recipe(RECIPE, ["model.text_window=-1"])
    with pytest.raises(LinmuError, match="did you mean 'teacher'"):
        load_recipe(RECIPE, ["teachr=x"])
    recipe = load_recipe(RECIPE, ["stages.stage1.steps=7", "model.fusion_init=0.2"])
    assert recipe.stages["stage1"].steps == 7 and recipe.mate.fusion_init == 0.2
    assert recipe.stages["stage3"].lora.rank == 8


def _write_video(path: Path, frames: int = 8, size: int = 56) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.full((size, size, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_manifest_data_skips_bad_samples_and_can_raise(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    _write_video(media / "ok.mp4")
    (media / "broken.mp4").write_bytes(b"not a video")
    from PIL import Image

    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(media / "img.png")
    rows = [
        {"video": "ok.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "dark"}]},
        {"video": "missing.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"video": "broken.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "black"}]},
    ]  # fmt: skip
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"output={tmp_path / 'run'}", "data.source=manifest", f"data.manifest={manifest}", f"data.media_root={media}", "data.frames=8",
            "data.heldout=1", "stages.stage1.steps=4", "stages.stage1.batch_size=1"]  # fmt: skip
    res = distill(RECIPE, base, stage="stage1")
    skipped = res["stage1"]["skipped_samples"]  # every epoch over the 3 training rows meets both bad ones
    assert set(skipped) == {"missing file", "corrupt video"} and min(skipped.values()) >= 3
    with pytest.raises(LinmuError, match="bad sample"):
        distill(RECIPE, [*base, "data.on_error=raise"], stage="stage1", force=True)


def test_cli_distill_and_its_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app, ["distill", str(RECIPE), f"output={tmp_path / 'o'}", *SHORT, "--stage", "stage1"]
    )
    assert res.exit_code == 0, res.output
    assert "stage1: mean rel. hidden error" in res.output
    res = runner.invoke(app, ["distill", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["distill", str(RECIPE), "stages.stage1.stesp=1"])
    assert res.exit_code == 2 and "did you mean 'steps'" in res.output
    res = runner.invoke(app, ["distill", str(RECIPE), "--stage", "stage9"])
    assert res.exit_code == 2 and "stage9" in res.output


def test_two_processes_run_data_parallel(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "linmu_cli", "distill", str(RECIPE), f"output={out}", *SHORT]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = losses(out)
    assert [r[:2] for r in records] == [
        (s, i) for s, n in (("stage1", 6), ("stage2", 4), ("stage3", 4)) for i in range(1, n + 1)
    ]
    assert (out / "final" / "model.safetensors").exists()
    state = checkpoint.load(sorted((out / "checkpoints" / "stage1").glob("step-*"))[-1])
    assert len(state["data_positions"]) == 2


def test_max_pixels_downscales_images_and_frames():
    from PIL import Image

    from linmu_cli.distillation.data import fit_pixels

    assert fit_pixels(Image.new("RGB", (112, 224)), 56 * 112).size == (56, 112)
    assert fit_pixels(np.zeros((4, 112, 112, 3), np.uint8), 56 * 56).shape == (4, 56, 56, 3)
    small = np.zeros((2, 28, 28, 3), np.uint8)
    assert fit_pixels(small, 56 * 56) is small


def _torchrun(out: Path, extra: list[str], port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "linmu_cli", "distill", str(RECIPE), f"output={out}", *SHORT, *extra]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def test_fsdp_matches_ddp_and_resumes_exactly(tmp_path):
    """FSDP2 shards only the trainable modules; its losses equal DDP's, and a resumed run repeats itself. DDP with
    stages 1-2 on `per_layer` (backward inside the objective, gradients averaged by the trainer) gives DDP's
    losses bit for bit."""
    ddp, fsdp, per_layer = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "per_layer"
    _torchrun(ddp, [], 29541)
    _torchrun(
        per_layer, [f"stages.{s}.gradient_checkpointing=per_layer" for s in ("stage1", "stage2")], 29544
    )
    assert losses(per_layer) == losses(ddp)
    _torchrun(fsdp, ["distributed.strategy=fsdp"], 29542)
    a, b = losses(ddp), losses(fsdp)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert all(abs(x[2] - y[2]) <= 1e-4 * max(1.0, abs(x[2])) for x, y in zip(a, b, strict=True))
    reference = weights(fsdp / "final")
    # crash simulation: drop everything after stage1's step-3 checkpoint, then resume
    import shutil

    for d in ("stage1", "stage2", "stage3", "final", "checkpoints/stage2", "checkpoints/stage3"):
        shutil.rmtree(fsdp / d, ignore_errors=True)
    shutil.rmtree(fsdp / "checkpoints" / "stage1" / "step-0000006")
    _torchrun(fsdp, ["distributed.strategy=fsdp", "--resume"], 29543)
    assert losses(fsdp) == b
    again = weights(fsdp / "final")
    assert all(torch.equal(again[k], reference[k]) for k in reference)


BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_compare_runs_reports_loss_agreement_and_files(full_run, tmp_path):
    """benchmarks/compare_runs.py (issue 7's check of multi-GPU runs against one GPU): the run against itself,
    and against a copy whose stage-2 step-3 loss is off by 0.5 and whose tokens/s are doubled."""
    out, _ = full_run
    other = tmp_path / "other"
    other.mkdir()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r["tokens_per_s"] *= 2
        if (r["stage"], r["step"]) == ("stage2", 3):
            r["loss"] += 0.5
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (other / "checkpoints" / "stage1" / ".tmp-step-0000002-1").mkdir(parents=True)  # a leftover temp dir
    cut = tmp_path / "cut"  # killed by a time limit after its first 3 steps, all equal to REF's
    cut.mkdir()
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in json.loads(
        "[" + ",".join((out / "metrics.jsonl").read_text().splitlines()[:3]) + "]")))  # fmt: skip
    report = tmp_path / "compare.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "compare_runs.py"), str(out), str(out), str(other),
                          str(cut), "--json", str(report)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    same, changed, truncated = json.loads(report.read_text())["runs"]
    assert same["verdict"] == "identical" and changed["verdict"] == "different"
    assert truncated["verdict"] == "incomplete: 3 of 14 steps compared"
    assert {s: v["common_steps"] for s, v in same["stages"].items()} == {
        "stage1": 6,
        "stage2": 4,
        "stage3": 4,
    }
    assert all(v["max_abs_loss_diff"] == 0 and v["speedup"] == 1 for v in same["stages"].values())
    assert same["temporary"] == [] and same["stage_outputs"] == ["final", "stage1", "stage2", "stage3"]
    assert same["checkpoints"] and all(c.startswith("checkpoints/stage") for c in same["checkpoints"])
    assert changed["stages"]["stage2"]["max_abs_loss_diff"] == pytest.approx(0.5)
    assert changed["stages"]["stage1"]["max_abs_loss_diff"] == 0
    assert (
        changed["stages"]["stage2"]["first_differing_step"] == 3
    )  # of 4 common steps: the last third is step 4
    assert changed["stages"]["stage1"]["first_differing_step"] is None
    assert all(v["last_third_mean_rel_diff"] == 0 for v in same["stages"].values())
    assert all(v["speedup"] == pytest.approx(2) for v in changed["stages"].values())
    assert (
        changed["temporary"] == ["checkpoints/stage1/.tmp-step-0000002-1"] and changed["stage_outputs"] == []
    )


def test_distill_throughput_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/distill_throughput.py (the H200 numbers of docs/benchmarks.md) at tiny size, one process."""
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(BENCHMARKS / "distill_throughput.py"), "--arch", "tiny-qwen2-vl", "--frames", "8",
           "--resolution", "112", "--steps", "1", "--checkpointing", "--json", str(out)]  # fmt: skip
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BENCHMARKS.parent)),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["processes"] == 1 and data["checkpointing"] is True
    assert set(data["stages"]) == {"stage1", "stage2", "stage3"}
    assert all(s["tokens_per_s"] > 0 and s["ssd_backend"] == "torch" for s in data["stages"].values())
    assert data["stage3_over_baseline"] > 0


def test_frames_list_draws_a_length_per_sample_reproducibly():
    """data.frames: [4, 8] distills over several video lengths; sample i always gets the same length."""
    from linmu_cli.distillation.data import SampleStream
    from linmu_cli.tiny import build_tiny_processor

    recipe = load_recipe(RECIPE, ["data.frames=[4,8]", "data.tasks=[video_count]"])
    processor = build_tiny_processor("qwen2_vl")

    def lengths(stream, n):
        return [int(stream.next_batch(1)["video_grid_thw"][0, 0]) * 2 for _ in range(n)]

    first = lengths(SampleStream(recipe.data, processor, seed=0), 12)
    assert set(first) == {4, 8}
    assert lengths(SampleStream(recipe.data, processor, seed=0), 12) == first
    with pytest.raises(LinmuError, match="data.frames"):
        load_recipe(RECIPE, ["data.frames=[1,8]"])


def test_speed_options_reach_the_same_weights_and_resume_exactly(tmp_path, full_run):
    """Issue 17's exact speed-ups all on (prefetched data, checkpointing policies, foreach AdamW), stopped by an
    exception in stage 2 after its step-2 checkpoint and resumed: the same losses and final weights, bit for
    bit, as the plain run (float32 CPU)."""
    ref_out, _ = full_run
    out = tmp_path / "fast"
    fast = [f"output={out}", *SHORT, "stages.stage1.gradient_checkpointing=all",
            "stages.stage2.gradient_checkpointing=mlp_only", "stages.stage3.gradient_checkpointing=every_other",
            *(f"stages.{s}.{k}" for s in ("stage1", "stage2", "stage3") for k in ("prefetch=2", "optimizer=foreach"))]  # fmt: skip

    class Stop(Exception):
        pass

    def crash(p):
        if (p.stage, p.step) == ("stage2", 3) and p.loss is not None:
            raise Stop

    with pytest.raises(Stop):
        distill(RECIPE, fast, progress=crash)
    assert (out / "checkpoints" / "stage2" / "step-0000002").is_dir() and not (out / "stage2").exists()
    distill(RECIPE, fast, resume=True)
    assert losses(out) == losses(ref_out)
    a, b = weights(out / "final"), weights(ref_out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_learns_from_its_own_frames(tmp_path, monkeypatch):
    """`stages.stage2.frames` reaches the stage's sample stream; the other stage keeps data.frames."""
    from linmu_cli.distillation import trainer

    seen = []
    real = trainer.SampleStream

    def recording(data, *args, **kwargs):
        seen.append(data.frames)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(trainer, "SampleStream", recording)
    over = [f"output={tmp_path / 'run'}", "stages.stage1.steps=1", "stages.stage2.steps=1", "stages.stage3.steps=1",
            "data.heldout=1", "data.frames=4", "stages.stage2.frames=[6,8]"]  # fmt: skip
    distill(RECIPE, over)
    # stage 2's training stream has its own frames; the other stages' and the held-out streams data.frames
    assert seen.count([6, 8]) == 1 and all(f == 4 for f in seen if f != [6, 8]) and len(seen) > 3, seen

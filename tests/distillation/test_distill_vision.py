"""`fast_vision` / `vision_compile` (recipe): the frozen vision towers through linmu_cli.vision in distillation,
the same losses as transformers' tower (float32, CPU), a free switch on resume, one-line errors, and
benchmarks/distill_throughput.py --fast-vision."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import linmu_cli.loading
from linmu_cli.cli import app
from linmu_cli.config import MateConfig
from linmu_cli.distillation import distill, load_recipe
from linmu_cli.distillation.objectives import EndToEndObjective, run_teacher
from linmu_cli.distillation.recipe import LossConfig
from linmu_cli.distillation.trainer import set_trainable, use_recipe_vision, vision_tower
from linmu_cli.errors import LinmuError
from linmu_cli.models import convert_model
from linmu_cli.tiny import build_tiny_teacher
from linmu_cli.vision import fast_vision_info

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "recipes" / "tiny.yaml"
STAGE1 = ["stages.stage1.steps=3", "stages.stage1.save_every=1", "data.heldout=1", "data.frames=8"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stage1(out: Path, monkeypatch, *extra: str, resume: bool = False):
    """Stage 1 of the tiny recipe; returns the result and the teacher it loaded."""
    loaded = []

    def load_model(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    real = linmu_cli.loading.load_model
    monkeypatch.setattr(linmu_cli.loading, "load_model", load_model)
    try:
        result = distill(RECIPE, [f"output={out}", *STAGE1, *extra], stage="stage1", resume=resume)
    finally:
        monkeypatch.setattr(linmu_cli.loading, "load_model", real)
    return result["stage1"], loaded[0].model


def test_fast_vision_trains_stage1_like_transformers_tower(tmp_path, monkeypatch):
    """Stage 1 with fast_vision (vision_compile auto: eager on CPU) logs the losses of transformers' tower bit for
    bit, and so does its fidelity report (the student's own tower); a resume may switch the tower."""
    plain, plain_teacher = _stage1(tmp_path / "plain", monkeypatch)
    fast, fast_teacher = _stage1(tmp_path / "fast", monkeypatch, "fast_vision=true")
    assert fast_vision_info(plain_teacher) is None
    info = fast_vision_info(fast_teacher)
    assert info is not None and info.compiled == [] and info.paths.get("runs", 0) > 0  # it ran, eager
    assert plain["vision_tower"] == {"teacher": "transformers", "student": "transformers"}
    assert fast["vision_tower"] == {"teacher": "linmu fast (eager)", "student": "linmu fast (eager)"}
    assert (
        json.loads((tmp_path / "fast" / "stage1" / "stage.json").read_text())["vision_tower"]
        == fast["vision_tower"]
    )
    strip = ("tokens_per_s",)
    want = [{k: v for k, v in r.items() if k not in strip} for r in _records(tmp_path / "plain")]
    got = [{k: v for k, v in r.items() if k not in strip} for r in _records(tmp_path / "fast")]
    assert len(want) == 3 and got == want
    assert fast["before"] == plain["before"] and fast["after"] == plain["after"]
    # a kill after step 2 of the plain run, resumed with the fast tower: accepted (speed only), same losses
    out = tmp_path / "plain"
    for d in ("stage1", "checkpoints/stage1/step-0000003"):
        shutil.rmtree(out / d)
    (out / "report.json").unlink()
    resumed, teacher = _stage1(out, monkeypatch, "fast_vision=true", "vision_compile=off", resume=True)
    assert fast_vision_info(teacher).compiled == [] and resumed["resume_changes"] == []
    assert [{k: v for k, v in r.items() if k not in strip} for r in _records(out)] == want


def test_students_own_tower_is_switched_too():
    """A LinMU student's tower is a module of its own (the teacher's tensors): stage 3 without shared
    embeddings runs it, and with fast_vision it runs the fast path with the same loss and gradients."""
    teacher, processor = build_tiny_teacher("qwen2_vl", seed=0)
    teacher.requires_grad_(False)
    recipe = load_recipe(RECIPE, ["data.tasks=[video_count]", "data.frames=8", "fast_vision=true"])
    from linmu_cli.distillation.data import SampleStream

    batch = SampleStream(recipe.data, processor, seed=0).next_batch(2)
    layers = teacher.model.language_model.layers
    student = convert_model(teacher, MateConfig(vision_window=[2, 2, 2], text_window=64), seed=0)
    assert student.model.visual is not teacher.model.visual
    params = set_trainable(student, ["flex", "swin", "fusion"])
    results = []
    for fast in (False, True):
        if fast:
            use_recipe_vision(recipe, teacher)
            use_recipe_vision(recipe, student)
            assert vision_tower(teacher) == vision_tower(student) == "linmu fast (eager)"
        tp = run_teacher(teacher, layers, batch, want_logits=True, keep_inputs=False)
        out = EndToEndObjective(student, LossConfig(kl=1.0))(batch, tp, student.token_layout(**batch))
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for _, p in params]))
        student.zero_grad(set_to_none=True)
    assert fast_vision_info(student).paths["runs"] > 0  # the student's tower ran the fast path
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(map(torch.equal, ga, gb))
    info = fast_vision_info(teacher)
    use_recipe_vision(recipe, teacher)  # idempotent: the tower is switched once
    use_recipe_vision(load_recipe(RECIPE), teacher)  # fast_vision false: leaves a tower as it is
    assert fast_vision_info(teacher) is info


def test_vision_keys_are_typed(tmp_path):
    recipe = load_recipe(RECIPE)
    assert recipe.fast_vision is False and recipe.vision_compile == "auto"
    # YAML 1.1 reads a bare on / off as true / false: they mean on / off here
    assert load_recipe(RECIPE, ["vision_compile=on"]).vision_compile == "on"
    assert load_recipe(RECIPE, ["vision_compile=off"]).vision_compile == "off"
    seven_b = load_recipe(ROOT / "recipes" / "qwen2-vl-7b.yaml")
    # compiled with eager's rounding: the GPU loss curves equal transformers' tower (docs/benchmarks.md, session 17)
    assert seven_b.fast_vision is True and seven_b.vision_compile == "auto"
    assert [seven_b.stages[s].ssd_backend for s in ("stage1", "stage2", "stage3")] == ["fla", "fla", "fla"]
    policies = [seven_b.stages[s].gradient_checkpointing for s in ("stage1", "stage2", "stage3")]
    assert policies == ["per_layer", "per_layer", "every_other"]
    assert seven_b.stages["stage3"].loss.kl_backend == "auto"  # the fused kernel on CUDA
    # (bad values: tests/distillation/test_recipe.py's one-line errors; here a typo and the CLI)
    with pytest.raises(
        LinmuError, match=re.escape("unknown key recipe.fast_vison; did you mean 'fast_vision'?")
    ):
        load_recipe(RECIPE, ["fast_vison=true"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text() + "fast_vision: 3\n")
    res = CliRunner().invoke(app, ["distill", str(bad), f"output={tmp_path / 'o'}"])
    assert res.exit_code == 2 and "recipe.fast_vision: expected bool, got 3" in res.output, res.output
    res = CliRunner().invoke(
        app, ["distill", str(RECIPE), f"output={tmp_path / 'o'}", "vision_compile=maybe"]
    )
    assert res.exit_code == 2 and "recipe.vision_compile='maybe'" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()


def test_distill_throughput_records_the_fast_vision(tmp_path):
    """benchmarks/distill_throughput.py --fast-vision eager: the teacher's tower switched before the baseline
    (which runs it: its attention calls are counted), recorded in the JSON."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_throughput.py"), "--tiny", "--fast-vision", "eager",
           "--steps", "1", "--stages", "stage1", "--out", str(tmp_path), "--label", "fv"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "vision tower (--fast-vision eager): linmu fast vision" in res.stdout
    data = json.loads((tmp_path / "distill_throughput-fv.json").read_text())
    info = data["fast_vision_info"]
    assert data["fast_vision"] == "eager" and info["compiled"] == [] and info["attention_modules"] == 2
    # warm-up + 1 step of the baseline and of stage 1, 2 attention modules each (stage 1's student runs no tower)
    assert info["paths"] == {"runs": 8} and info["describe"].startswith("linmu fast vision")
    assert "tokens_per_s" in data["baseline_teacher_fwd_bwd"] and "tokens_per_s" in data["stages"]["stage1"]


def test_stage_ssd_backend_overrides_the_models(tmp_path, monkeypatch):
    """`stages.<stage>.ssd_backend` runs that stage's M-MATE blocks on its kernel, over model.ssd_backend (a
    runtime choice: recorded in stage.json, changeable on resume, checked like the model's)."""
    from linmu_cli.distillation import trainer
    from linmu_cli.layers.mate import MateAttention

    seen = []
    real = trainer.convert_model

    def convert(teacher, mate, **kwargs):
        student = real(teacher, mate, **kwargs)
        seen.append({m.mate.ssd_backend for m in student.modules() if isinstance(m, MateAttention)})
        return student

    monkeypatch.setattr(trainer, "convert_model", convert)
    result, _ = _stage1(
        tmp_path / "run", monkeypatch, "model.ssd_backend=auto", "stages.stage1.ssd_backend=torch"
    )
    assert seen and all(s == {"torch"} for s in seen)
    assert result["ssd_backend"] == "torch"
    assert json.loads((tmp_path / "run" / "stage1" / "stage.json").read_text())["ssd_backend"] == "torch"
    recipe = load_recipe(RECIPE, ["stages.stage2.ssd_backend=fla"])
    assert recipe.stages["stage2"].ssd_backend == "fla" and recipe.stages["stage1"].ssd_backend is None
    with pytest.raises(LinmuError, match=r"stages\.stage2\.ssd_backend"):
        load_recipe(RECIPE, ["stages.stage2.ssd_backend=triton"])

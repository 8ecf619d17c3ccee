"""The quality study in miniature (CI): a short distillation of the skilled teacher beats the plain conversion.

The full study (evals/study.py -> docs/quality.md) runs 700 steps per recipe and nine ablations; this runs the
same pipeline with 110 steps and 8 held-out samples per task, and checks a real signal: the distilled student
answers more held-out questions correctly, and agrees more with the teacher, than the converted model it started
from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "evals" / "teacher"
sys.path.insert(0, str(ROOT / "evals"))

pytestmark = pytest.mark.skipif(
    not (TEACHER / "model.safetensors").is_file(),
    reason=f"no trained teacher at {TEACHER}: run `python evals/train_teacher.py --out evals/teacher`",
)

SHORT = ["stages.stage1.steps=50", "stages.stage2.steps=30", "stages.stage3.steps=30", "data.heldout=2",
         *(f"stages.{s}.save_every=1000" for s in ("stage1", "stage2", "stage3"))]  # fmt: skip
N = 8


def test_short_distillation_beats_the_undistilled_conversion(tmp_path):
    import study

    from linmu_cli.distillation import load_recipe
    from linmu_cli.models import convert_model

    teacher, processor = study.load(TEACHER)
    recipe = load_recipe(study.RECIPE, [f"teacher={TEACHER}", *SHORT])
    tasks, size = list(recipe.data.tasks), recipe.data.size
    ref = study.answers(teacher, processor, tasks, N, 16, size)
    converted = study.score(
        study.answers(convert_model(teacher, recipe.mate, seed=0).eval(), processor, tasks, N, 16, size), ref
    )
    final, _ = study.load(study.run_distill(tmp_path / "run", [], None, [f"teacher={TEACHER}", *SHORT]))
    student = study.score(study.answers(final, processor, tasks, N, 16, size), ref)
    print(f"teacher {study.score(ref)}\nconverted {converted}\ndistilled {student}")
    assert student["mean"] >= converted["mean"] + 0.15, (converted, student)
    assert student["agreement"] > converted["agreement"], (converted, student)

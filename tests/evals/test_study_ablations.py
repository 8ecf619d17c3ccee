"""evals/study.py's ablations: each one's overrides are a valid recipe that changes what its name says, and a
converted tiny teacher builds with every architectural one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evals"))

import study  # noqa: E402

from linmu_cli.distillation import load_recipe  # noqa: E402
from linmu_cli.models import convert_model  # noqa: E402
from linmu_cli.tiny import build_tiny_teacher  # noqa: E402

ARCHITECTURE = [a for a in study.ABLATIONS if any(o.startswith("model.") for o in a.overrides)]


def test_ablation_names_are_unique_and_every_one_changes_the_recipe():
    names = [a.name for a in study.ABLATIONS]
    assert len(names) == len(set(names))
    base = load_recipe(study.RECIPE, [])
    for a in study.ABLATIONS:
        if a.skip is None:
            assert load_recipe(study.RECIPE, a.overrides) != base, a.name


def student_parameters(overrides: list[str]) -> int:
    """Parameters of the tiny Qwen2-VL teacher converted with the study recipe plus `overrides`."""
    teacher, _ = build_tiny_teacher("qwen2_vl", seed=0)
    student = convert_model(teacher, load_recipe(study.RECIPE, overrides).model)
    return sum(p.numel() for p in student.parameters())


@pytest.fixture(scope="module")
def default_parameters() -> int:
    return student_parameters([])


@pytest.mark.parametrize("ablation", ARCHITECTURE, ids=lambda a: a.name)
def test_architectural_ablation_builds_a_student(ablation, default_parameters):
    n, n_default = student_parameters(ablation.overrides), default_parameters
    if ablation.name in ("flex_only", "swin_only", "no_backward", "shared_projections"):  # a part fewer
        assert n < n_default, (ablation.name, n, n_default)
    else:  # the same weights, used differently
        assert n == n_default, (ablation.name, n, n_default)

"""evals/study.py --from-json A B ...: a study split over device calls merges into one, and only parts of the same
study merge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evals"))

import study  # noqa: E402


def part(rows: dict, length: dict, ablations: dict, seconds: float, frames: int = 16) -> dict:
    return {"tasks": ["grid_color"], "frames": frames, "n": 50, "rows": rows, "length": length,
            "ablations": ablations, "seconds": seconds, "command": "python evals/study.py"}  # fmt: skip


def test_parts_merge_into_one_study():
    row = {"mean": 0.9}
    pipeline = part({"teacher": row, "after stage3": row}, {"teacher @16": row}, {}, 100.0)
    first = part({"teacher": row}, {}, {"flex_only": {"mean": 0.5}, "swin_only": {"mean": 0.4}}, 50.0)
    second = part({"teacher": row}, {}, {"swin_only": {"mean": 0.45}}, 25.0)
    merged = study.merge_results([first, pipeline, second])
    assert merged["rows"] == pipeline["rows"] and merged["length"] == pipeline["length"]
    assert merged["ablations"] == {
        "flex_only": {"mean": 0.5},
        "swin_only": {"mean": 0.45},
    }  # the later part wins
    assert merged["seconds"] == 175.0 and not merged["complete"]  # most ablations have not run
    every = part({}, {}, {a.name: row for a in study.ABLATIONS}, 1.0)
    assert study.merge_results([pipeline, every])["complete"]


def test_parts_of_different_studies_are_refused():
    with pytest.raises(SystemExit, match="different studies"):
        study.merge_results([part({}, {}, {}, 1.0), part({}, {}, {}, 1.0, frames=32)])

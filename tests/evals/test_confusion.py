"""evals/confusion.py: the confusion table of a real (randomly initialised) teacher-2-sized Qwen2-VL's greedy
replies: every sample counted once, under its true answer, and the accuracy is the table's diagonal."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evals"))

import confusion  # noqa: E402

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.evaluation.answers import normalize_answer  # noqa: E402
from linmu_cli.tiny import build_tiny_teacher  # noqa: E402


def test_confusion_table_counts_every_sample_under_its_answer():
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=0, size="teacher2", num_hidden_layers=1, vision_config={"depth": 1}
    )
    res = confusion.confusion(model.eval(), processor, "grid_glyph", frames=4, count=5, batch=5)
    answers = [normalize_answer(synthetic.generate("grid_glyph", i, seed=confusion.EVAL_SEED, frames=4).answer)
               for i in range(5)]  # fmt: skip
    assert sum(sum(r.values()) for r in res["table"].values()) == 5
    assert {a: sum(r.values()) for a, r in res["table"].items()} == {
        a: answers.count(a) for a in set(answers)
    }
    right = sum(r.get(a, 0) for a, r in res["table"].items())
    assert res["accuracy"] == right / 5 and len(res["errors"]) == 5 - right
    assert all(answers[i] == a and reply != a for i, a, reply in res["errors"])


def test_grid_order_results_split_by_an_early_distractor():
    """grid_order: `early_distractor` is true for every `early=True` sample whose first named square is not in
    the first pair, and the table's samples split into the two cases."""
    for i in range(10):
        sample = synthetic.grid_order(synthetic.task_seed(0, "grid_order", i), frames=8, early=True)
        first_pair = {c for c, m in confusion.palette_masks(sample.media[0]).items() if m.sum() > 50}
        if not set(sample.choices) & first_pair:
            assert confusion.early_distractor(sample), i
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=0, size="teacher2", num_hidden_layers=1, vision_config={"depth": 1}
    )
    res = confusion.confusion(model.eval(), processor, "grid_order", frames=8, count=6, batch=6)
    assert res["early_distractor"]["samples"] + res["no_early_distractor"]["samples"] == 6

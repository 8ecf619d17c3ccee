"""evals/lookup_probe.py: the error geometry of grid_color replies and the linear probes on a look-up head's query
and keys, on a real (randomly initialised) teacher-2-sized Qwen2-VL."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evals"))

import lookup_probe  # noqa: E402

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.tiny import build_tiny_teacher  # noqa: E402


def test_square_cells_read_every_square_where_the_question_puts_it():
    for i in range(20):
        s = synthetic.generate("grid_color", i, seed=3)
        cells = lookup_probe.square_cells(s.media)
        assert cells[s.answer] == lookup_probe.asked_cell(s.question), (i, s.question, cells)
        assert 3 <= len(cells) <= 4 and len(set(cells.values())) == len(cells)


def test_probe_accuracy_reads_a_linear_signal_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    assert (
        lookup_probe.probe_accuracy(x, x[:, 3] > 0) > 0.9
    )  # 280 training points: the direction is estimated
    assert 0.3 < lookup_probe.probe_accuracy(x, torch.randn(400, generator=gen) > 0) < 0.7


def test_lookup_probe_counts_every_error_once():
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=0, size="teacher2", num_hidden_layers=2, vision_config={"depth": 1}
    )
    res = lookup_probe.lookup_probe(model.eval(), processor, count=24, layer=1, head=0)
    assert round((1 - res["accuracy"]) * 24) == sum(res["errors_by_offset"].values())
    for key in ("query_right_vs_left", "query_bottom_vs_top", "keys_right_vs_left", "keys_bottom_vs_top"):
        assert 0.0 <= res[key] <= 1.0, key

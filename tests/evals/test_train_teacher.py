"""evals/train_teacher.py: its training-only speed-ups change nothing, and a short run writes a complete teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "evals"))

import train_teacher  # noqa: E402
from device_inputs import device_batch, host_batch  # noqa: E402
from helpers import image, prompt_inputs, video  # noqa: E402

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.evaluation.greedy import greedy_answers  # noqa: E402
from linmu_cli.tiny import build_tiny_teacher  # noqa: E402


def test_batched_vision_attention_equals_transformers_loop():
    """Equal-length frame chunks run as one batch; unequal ones (images of two sizes) fall back to a loop."""
    model, processor = build_tiny_teacher("qwen2_vl", seed=0, vision_config={"embed_dim": 64, "num_heads": 2})
    batches = [
        prompt_inputs(processor, ["What color?"] * 2, videos=[video(0, frames=16), video(1, frames=6)]),
        prompt_inputs(processor, ["What color?"] * 2, images=[image(0, size=56), image(1, size=112)]),
    ]
    for inputs in batches:
        train_teacher.use_vision_attention(model, "sdpa")
        with torch.no_grad():
            ref = model(**inputs).logits
            train_teacher.use_vision_attention(model, train_teacher.VISION_ATTENTION)
            got = model(**inputs).logits
        train_teacher.use_vision_attention(model, "sdpa")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_video_parts_match_the_video_when_task():
    parts = train_teacher.LayoutProbes._parts(torch.tensor([[5, 2, 2]]))  # 5 frame pairs, 1 token each
    # video_when cuts pairs at round(5 * i / 3) = 0, 2, 3, 5
    assert parts.tolist() == [0, 0, 1, 2, 2]


def test_short_run_writes_a_loadable_documented_teacher(tmp_path):
    out = tmp_path / "teacher"
    argv = ["--out", str(out), "--steps", "3", "--layers", "2", "--heads", "2", "--vision-depth", "1",
            "--image-batch", "2", "--video-batch", "3", "--frames", "8", "--eval-count", "2", "--eval-every", "0",
            "--threads", "1"]  # fmt: skip
    assert train_teacher.main(argv) == 0
    report = json.loads((out / "train_teacher.json").read_text())
    assert report["steps"] == 3 and set(report["heldout_accuracy"]) == {"16", "32", "64"}
    assert report["command"].startswith("python evals/train_teacher.py --out evals/teacher")
    assert "--steps 3" in report["command"]
    config = json.loads((out / "config.json").read_text())
    assert "flash" not in json.dumps(config)  # the training-only attention is not saved
    assert "Held-out accuracy" in (out / "README.md").read_text()


# --- teacher 2 (--preset teacher2): the grid tasks at 224x224, device-side pixels, answer-window loss ------------

SMALL_T2 = ["--preset", "teacher2", "--size", "112", "--frames", "4,8", "--layers", "2", "--heads", "2",
            "--vision-depth", "1", "--vision-dim", "64", "--intermediate", "256", "--image-batch", "2",
            "--video-batch", "4", "--eval-count", "3", "--eval-frames", "8,16", "--log-every", "1",
            "--threads", "1", "--device", "cpu"]  # fmt: skip


def test_teacher2_short_run_writes_report_curves_and_bf16_weights(tmp_path):
    """The whole pipeline (data -> train -> held-out eval -> atomic save) in seconds; the time budget stops it."""
    out = tmp_path / "teacher2"
    assert train_teacher.main(["--out", str(out), *SMALL_T2, "--steps", "1000", "--time-budget", "2"]) == 0
    report = json.loads((out / "train_teacher.json").read_text())
    assert report["stopped_at_budget"] and 0 < report["steps"] < 1000
    assert report["command"].startswith(
        "python evals/train_teacher.py --out evals/teacher2 --preset teacher2"
    )
    assert f"--steps {report['steps']}" in report["command"] and "--time-budget" not in report["command"]
    acc = report["heldout_accuracy"]
    assert set(acc) == {"8", "16"} and set(acc["8"]) == set(synthetic.GRID_TASKS)
    assert set(acc["16"]) == {t for t in synthetic.GRID_TASKS if synthetic.KIND[t] == "video"}
    assert report["curve"] and set(report["curve"][-1]["tasks"]) == set(synthetic.GRID_TASKS)
    assert report["min_accuracy"] == min(a for f in acc.values() for a in f.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "flash" not in (out / "config.json").read_text()
    assert "Held-out accuracy" in (out / "README.md").read_text()


def test_fast_replies_equal_greedy_answers():
    """The held-out path of teacher 2 (device-side pixels, worker batches) replies exactly as greedy_answers."""
    args = train_teacher.parse_args(["--out", "x", *SMALL_T2])
    model, processor = build_tiny_teacher(
        "qwen2_vl", seed=1, size="teacher2", **train_teacher.model_config(args)
    )
    jobs = [("grid_glyph", 8), ("grid_color", 8)]
    for device_inputs in (
        True,
        False,
    ):  # False: the fallback when the processor differs (processor in workers)
        fast = train_teacher.fast_replies(
            model, processor, jobs, seed=3, count=4, size=112, batch=4, device_inputs=device_inputs
        )
        for task, frames in jobs:
            samples = [synthetic.generate(task, i, seed=3, frames=frames, size=112) for i in range(4)]
            ref = greedy_answers(model, processor, samples, batch_size=4)
            assert [r for r, _ in fast[(task, frames)]] == ref
            assert [a for _, a in fast[(task, frames)]] == [s.answer for s in samples]


def test_answer_window_loss_is_the_models_loss():
    model, processor = build_tiny_teacher(
        "qwen2_vl", size="teacher2", num_hidden_layers=1, vision_config={"depth": 1}
    )
    examples = [
        train_teacher.example(t, i, 0, 4, 1.0, 112) for i in range(2) for t in ("grid_count", "grid_glyph")
    ]
    host = host_batch(processor, examples)
    host["labels"] = train_teacher.answer_labels(host, examples, processor.tokenizer)
    inputs = device_batch(host, "cpu", processor)
    with torch.no_grad():
        ref = model(**inputs).loss
        labels = inputs.pop("labels")
        out = model(**inputs, logits_to_keep=train_teacher.answer_window(labels))
    loss, per_row, right = train_teacher.answer_loss(out.logits, labels)
    torch.testing.assert_close(loss, ref)
    assert per_row.shape == right.shape == (4,) and out.logits.shape[1] < labels.shape[1]


def test_token_colors_and_glyph_targets_read_the_pixels():
    s = synthetic.generate("grid_position", 0, seed=0)  # the red square in the cell of the answer
    colors = train_teacher.token_colors(torch.from_numpy(s.media)[None, None]).reshape(8, 8)
    red = 1 + list(synthetic.COLORS).index("red")
    rows, cols = (colors == red).nonzero(as_tuple=True)
    cell = synthetic.POSITIONS.index(s.answer)
    assert len(rows) and all(
        3 * int(r * 3 // 8) + int(c * 3 // 8) == cell for r, c in zip(rows, cols, strict=True)
    )
    g = synthetic.generate("grid_glyph", 0, seed=0, frames=8)
    colors = train_teacher.token_colors(torch.from_numpy(g.media)[None])
    targets = train_teacher.GridProbes._glyph_targets(colors, [("grid_glyph", g.answer)])
    letter = list(synthetic.GLYPHS).index(g.answer)
    assert (targets == letter).any() and set(targets.unique().tolist()) <= {letter, -100}
    assert train_teacher.GridProbes._glyph_targets(colors, [("grid_count", "3")]) is None

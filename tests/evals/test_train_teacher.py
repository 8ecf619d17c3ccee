"""evals/train_teacher.py: its training-only speed-ups change nothing, and a short run writes a complete teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "evals"))

import train_teacher  # noqa: E402
from helpers import image, prompt_inputs, video  # noqa: E402

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

"""The committed small teacher (evals/teacher, made by evals/train_teacher.py) loads offline and has real skill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from linmu_cli.data import synthetic
from linmu_cli.evaluation.greedy import greedy_answers

TEACHER = Path(__file__).resolve().parents[2] / "evals" / "teacher"
HELDOUT_SEED = 2026  # neither the training seed (0) nor the seed of the report in train_teacher.json (12345)
PER_TASK = 20
MIN_CORRECT = {"image_color": 0.7}  # see test_checkpoint_is_small_and_documented; chance is 0.25 there

pytestmark = pytest.mark.skipif(
    not (TEACHER / "model.safetensors").is_file(),
    reason=f"no trained teacher at {TEACHER}: run `python evals/train_teacher.py --out evals/teacher`",
)


@pytest.fixture(scope="module")
def teacher():
    model = AutoModelForImageTextToText.from_pretrained(TEACHER).eval()
    processor = AutoProcessor.from_pretrained(TEACHER)
    processor.tokenizer.padding_side = "left"
    return model, processor


def test_checkpoint_is_small_and_documented() -> None:
    assert (TEACHER / "model.safetensors").stat().st_size < 25 * 2**20
    report = json.loads((TEACHER / "train_teacher.json").read_text())
    assert report["command"].startswith("python evals/train_teacher.py")
    accuracy = report["heldout_accuracy"]
    # The video tasks clear a 90% bar at every length (a teacher worth distilling); image_color stays below it
    # (0.84 on the H200 that trained it, 0.74 on the CPU), as docs/quality.md says. A retrained teacher must not
    # fall below these.
    assert all(acc >= 0.9 for f in accuracy for task, acc in accuracy[f].items() if task != "image_color")
    assert accuracy["16"]["image_color"] >= 0.8
    assert (TEACHER / "README.md").is_file()


def test_teacher_is_real_qwen2_vl(teacher) -> None:
    model, _ = teacher
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    text, vision = model.config.text_config, model.config.vision_config
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.hidden_size // text.num_attention_heads >= 32
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)


@pytest.mark.parametrize("task", synthetic.TINY_TASKS)  # its own tasks (TASKS also holds the grid ones)
def test_teacher_answers_heldout_samples(teacher, task: str) -> None:
    model, processor = teacher
    samples = [synthetic.generate(task, i, seed=HELDOUT_SEED, frames=16) for i in range(PER_TASK)]
    answers = greedy_answers(model, processor, samples, batch_size=PER_TASK)
    correct = sum(a.strip().lower() == s.answer for a, s in zip(answers, samples, strict=True))
    assert correct >= MIN_CORRECT.get(task, 0.9) * PER_TASK, (
        f"{task}: {correct}/{PER_TASK}; answers {answers}"
    )
    # and it is not one constant answer that happens to be common
    assert len({a.strip().lower() for a in answers}) > 1

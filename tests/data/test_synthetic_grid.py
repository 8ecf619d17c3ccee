"""The grid tasks of `linmu_cli.data.synthetic` (teacher 2): deterministic, answerable from the pixels alone by
the structure each one names, and tokenized like the tiny tasks; the tiny tasks' samples are unchanged."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from linmu_cli.data import synthetic
from linmu_cli.distillation.data import Example
from linmu_cli.tiny import build_tiny_processor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evals"))
from device_inputs import host_batch  # noqa: E402
from train_teacher import answer_labels  # noqa: E402

PALETTE = np.array(list(synthetic.COLORS.values()), dtype=np.float64)
NAMES = list(synthetic.COLORS)


def color_masks(frame: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each palette colour: bright (the background is dark) and nearest to that colour."""
    bright = frame.max(axis=-1) > 140
    nearest = np.linalg.norm(frame[..., None, :].astype(np.float64) - PALETTE, axis=-1).argmin(axis=-1)
    return {name: bright & (nearest == i) for i, name in enumerate(NAMES)}


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return ys.mean(), xs.mean()


def cell_of(image: np.ndarray, mask: np.ndarray) -> int:
    """The 3x3 cell (row-major) that holds the centre of `mask`."""
    y, x = centroid(mask)
    edges = [image.shape[0] * i / 3 for i in range(1, 3)]
    return 3 * int(np.searchsorted(edges, y)) + int(np.searchsorted(edges, x))


def named(question: str, options) -> list[str]:
    """The options named in the question, in the order they appear."""
    found = {o: m.start() for o in options if (m := re.search(rf"\b{o}\b", question))}
    return sorted(found, key=found.get)


def solve(sample: synthetic.Sample) -> str:
    """Re-derive the answer from the pixels and the question, as a person would read the frames."""
    q, m = sample.question, sample.media
    if sample.task == "grid_position":
        return synthetic.POSITIONS[cell_of(m, color_masks(m)[named(q, NAMES)[0]])]
    if sample.task == "grid_color":
        asked = max(named(q, synthetic.POSITIONS), key=len)  # "top left" also contains "top" and "left"
        cell = synthetic.POSITIONS.index(asked)
        for color, mask in color_masks(m).items():
            if mask.any() and cell_of(m, mask) == cell:
                return color
        raise AssertionError("no square in the asked cell")
    pairs = m[::2]  # both frames of a pair are equal (checked in test_frames_come_in_pairs)
    if sample.task == "grid_motion":
        color = named(q, NAMES)[0]
        (y0, x0), (y1, x1) = (centroid(color_masks(pairs[i])[color]) for i in (0, -1))
        if abs(x1 - x0) > abs(y1 - y0):
            return "right" if x1 > x0 else "left"
        return "down" if y1 > y0 else "up"
    if sample.task == "grid_count":
        color = named(q, NAMES)[0]
        return str(sum(bool(color_masks(p)[color].any()) for p in pairs))
    if sample.task == "grid_order":
        a, b = named(q, NAMES)
        first = {c: min(i for i, p in enumerate(pairs) if color_masks(p)[c].any()) for c in (a, b)}
        return min((a, b), key=first.get)
    if sample.task == "grid_glyph":
        white = [color_masks(p)["white"] for p in pairs]
        (pair,) = [i for i, w in enumerate(white) if w.any()]
        ys, xs = np.nonzero(white[pair])
        scale = (np.ptp(ys) + 1) // 5
        box = white[pair][ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        bits = box[scale // 2 :: scale, scale // 2 :: scale]
        return next(k for k, v in synthetic.GLYPHS.items() if (synthetic.glyph_mask(k, 1) == bits).all())
    raise KeyError(sample.task)


def test_tiny_tasks_are_unchanged():
    """Adding tasks must not move the tiny teacher's samples (task_seed keeps their stream indices)."""
    h = hashlib.sha256()
    for task in sorted(synthetic.TINY_TASKS):
        for i in range(3):
            for frames in (8, 16):
                s = synthetic.generate(task, i, seed=5, frames=frames)
                h.update(s.media.tobytes())
                h.update(f"{s.question}|{s.answer}|{','.join(s.choices)}".encode())
    # sha256 of the same samples made by the generator before the grid tasks existed (commit f9503d2)
    assert h.hexdigest() == "c1c23750290530cd2f45925bf60970151f58f8774566bf13b76fa6c9bd4073d8"


@pytest.mark.parametrize("task", synthetic.GRID_TASKS)
def test_deterministic_and_varied(task: str):
    a, b = synthetic.generate(task, 7, seed=3), synthetic.generate(task, 7, seed=3)
    assert np.array_equal(a.media, b.media) and (a.question, a.answer) == (b.question, b.answer)
    assert not np.array_equal(a.media, synthetic.generate(task, 8, seed=3).media)
    assert not np.array_equal(a.media, synthetic.generate(task, 7, seed=4).media)
    assert a.media.dtype == np.uint8 and a.media.shape[-3:] == (224, 224, 3)
    assert a.answer in a.choices and synthetic.KIND[task] == a.kind


@pytest.mark.parametrize("task", synthetic.GRID_TASKS)
def test_answer_is_decidable_from_the_pixels(task: str):
    """A pixel-reading solver gets every answer, at 16 and 64 frames and at the CPU runs' 112 px."""
    cases = (
        [(16, 224, i) for i in range(12)] + [(64, 224, i) for i in range(3)] + [(8, 112, i) for i in range(4)]
    )
    answers = set()
    for frames, size, i in cases:
        s = synthetic.generate(task, i, seed=11, frames=frames, size=size)
        assert solve(s) == s.answer, (task, frames, size, i, s.question, s.answer)
        answers.add(s.answer)
    assert len(answers) > 2  # not a constant answer


@pytest.mark.parametrize("task", ["grid_motion", "grid_count", "grid_order", "grid_glyph"])
def test_frames_come_in_pairs(task: str):
    m = synthetic.generate(task, 0, seed=2, frames=16).media
    assert np.array_equal(m[0::2], m[1::2])


@pytest.mark.parametrize(
    ("task", "flip"), [("grid_motion", {"left": "right", "up": "down"}), ("grid_order", None)]
)
def test_time_order_decides(task: str, flip: dict | None):
    """Played backwards, the same frames give the opposite answer: the per-frame content alone cannot decide."""
    for i in range(6):
        s = synthetic.generate(task, i, seed=1, frames=16)
        backwards = synthetic.Sample(s.task, s.kind, s.media[::-1], s.question, s.answer, s.choices)
        if flip is not None:
            expected = {**flip, **{v: k for k, v in flip.items()}}[s.answer]
        else:
            expected = next(c for c in s.choices if c != s.answer)
        assert solve(backwards) == expected


def test_position_needs_the_layout():
    """The same colours in the same amounts, at other places, change the answer: colour statistics do not decide."""
    s = synthetic.generate("grid_position", 0, seed=0)
    rolled = synthetic.Sample(
        s.task, s.kind, np.roll(s.media, (75, 75), axis=(0, 1)), s.question, "", s.choices
    )
    assert np.array_equal(
        np.sort(rolled.media.reshape(-1, 3), axis=0), np.sort(s.media.reshape(-1, 3), axis=0)
    )
    assert solve(rolled) != s.answer


def test_counts_cover_the_range_and_glyphs_differ():
    counts = {synthetic.generate("grid_count", i, seed=0, frames=32).answer for i in range(80)}
    assert counts == {str(n) for n in range(10)}
    masks = {k: synthetic.glyph_mask(k, 1) for k in synthetic.GLYPHS}
    assert min((masks[a] != masks[b]).sum() for a in masks for b in masks if a < b) >= 4


def test_grid_tasks_reject_frames_too_small():
    with pytest.raises(ValueError, match="multiple of 28"):
        synthetic.generate("grid_position", 0, size=56)
    with pytest.raises(ValueError, match="even number of frames"):
        synthetic.generate("grid_count", 0, frames=3)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("qwen2_vl", max_pixels=224 * 224)


@pytest.mark.parametrize("task", synthetic.GRID_TASKS)
def test_every_answer_tokenizes_as_in_the_chat(processor, task: str):
    """Each choice, put in the training chat layout, is labelled as exactly its own tokens + <|im_end|>."""
    s = synthetic.generate(task, 0, seed=0, frames=4, size=112)
    tok = processor.tokenizer
    examples = [Example(s.kind, s.media, s.question, c) for c in s.choices]
    inputs = host_batch(processor, examples)
    labels = answer_labels(inputs, examples, tok)
    for row, choice in enumerate(s.choices):
        ids = labels[row][labels[row] != -100].tolist()
        assert ids == tok(choice, add_special_tokens=False).input_ids + [
            tok.convert_tokens_to_ids("<|im_end|>")
        ]
        assert tok.decode(ids[:-1]) == choice and len(ids) <= 8  # greedy_answers decodes 8 new tokens


def test_glyph_sits_on_the_half_patch_lattice():
    """At 224 px a font pixel is half a 14-px patch and the letter starts on that lattice: every patch sees a
    whole 2x2 window of font pixels, whatever the sample."""
    for i in range(20):
        s = synthetic.generate("grid_glyph", i, seed=3, frames=8)
        pair = next(p for p in range(0, 8, 2) if color_masks(s.media[p])["white"].any())
        ys, xs = np.nonzero(color_masks(s.media[pair])["white"])
        assert (np.ptp(ys) + 1, np.ptp(xs) + 1) == (35, 21)  # every letter of the font spans 3x5 font pixels
        assert ys.min() % 7 == 0 and xs.min() % 7 == 0
        assert solve(s) == s.answer


def test_grid_color_mirror_puts_a_distractor_in_the_asked_cells_mirror_image():
    """`mirror=True` (teacher 2's hard negatives): when the asked cell is in a side column, a square of another
    colour fills the same row's other side cell; the answer is still the asked square's, read from the pixels."""
    side = 0
    for i in range(40):
        sample = synthetic.grid_color(synthetic.task_seed(0, "grid_color", i), mirror=True)
        assert solve(sample) == sample.answer, (i, sample.question)
        cell = synthetic.POSITIONS.index(max(named(sample.question, synthetic.POSITIONS), key=len))
        if cell % 3 == 1:
            continue
        side += 1
        mirrored = cell + 2 - 2 * (cell % 3)
        cells = {c: cell_of(sample.media, m) for c, m in color_masks(sample.media).items() if m.any()}
        assert mirrored in cells.values(), (i, sample.question, cells)
    assert side >= 15
    plain = synthetic.grid_color(synthetic.task_seed(0, "grid_color", 3))
    assert np.array_equal(
        plain.media, synthetic.generate("grid_color", 3, seed=0).media
    )  # the default is unchanged


def test_grid_order_early_puts_a_distractor_before_the_first_named_square():
    """`early=True` (teacher 2's hard negatives): unless the first named square is in the first frame pair, a
    square of neither named colour appears before it; the answer still follows from the pixels."""
    checked = 0
    for i in range(30):
        sample = synthetic.grid_order(synthetic.task_seed(0, "grid_order", i), frames=16, early=True)
        assert solve(sample) == sample.answer, (i, sample.question)
        present = [{c for c, m in color_masks(pair).items() if m.any()} for pair in sample.media[::2]]
        first = min(k for k, colors in enumerate(present) if set(sample.choices) & colors)
        if first == 0:
            continue
        checked += 1
        assert any(colors - set(sample.choices) for colors in present[:first]), (i, present)
    assert checked >= 15

"""Procedural images and videos with questions whose answers need local detail or global context.

Everything is generated from a seed, so distillation (`data.source: synthetic`), the offline lmms-eval tasks
and the quality study all see the same samples without downloading anything. Frames come in pairs (Qwen2-VL
merges two frames into one temporal token), and each quadrant of a frame is one merged token at 56x56.

Tasks:
- `image_color` (local): "What color is the top left block?" -> a color word.
- `video_count` (global): "How many times does a red square flash?" -> a digit; flashes are in distinct
  frame pairs spread over the whole video.
- `video_order` (global, order): "Which color flashed first, A or B?" -> a color word.
- `video_when` (global, position): "When does the green square flash: beginning, middle or end?"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 50, 200),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
PARTS = ("beginning", "middle", "end")


@dataclass
class Sample:
    task: str
    kind: str  # "image" | "video"
    media: np.ndarray  # (H, W, 3) or (T, H, W, 3) uint8
    question: str
    answer: str
    choices: list[str] = field(default_factory=list)


def _background(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 60, size=(*shape, 3), dtype=np.int64).astype(np.uint8)


def _paint(frame: np.ndarray, quadrant: int, color: str, inset: int = 4) -> None:
    h, w = frame.shape[0] // 2, frame.shape[1] // 2
    top, left = (quadrant // 2) * h, (quadrant % 2) * w
    frame[top + inset : top + h - inset, left + inset : left + w - inset] = COLORS[color]


def image_color(rng: np.random.Generator, size: int = 56, **_: Any) -> Sample:
    img = _background(rng, (size, size))
    colors = rng.choice(list(COLORS), size=4, replace=False)
    for q, c in enumerate(colors):
        _paint(img, q, c)
    q = int(rng.integers(4))
    return Sample("image_color", "image", img, f"What color is the {QUADRANTS[q]} block? Answer with one word.",
                  str(colors[q]), list(COLORS))  # fmt: skip


def _flash_video(rng, frames: int, size: int, flashes: list[tuple[int, str]]) -> np.ndarray:
    """A noisy video where each (pair index, color) flash fills one random quadrant of both frames of a pair."""
    video = _background(rng, (frames, size, size))
    for pair, color in flashes:
        q = int(rng.integers(4))
        for f in (2 * pair, 2 * pair + 1):
            _paint(video[f], q, color)
    return video


def video_count(rng: np.random.Generator, frames: int = 16, size: int = 56, **_: Any) -> Sample:
    pairs = frames // 2
    n = int(rng.integers(0, min(pairs, 9) + 1))
    chosen = rng.choice(pairs, size=n, replace=False)
    distractors = [p for p in range(pairs) if p not in set(chosen.tolist())]
    flashes = [(int(p), "red") for p in chosen]
    flashes += [
        (int(p), str(rng.choice(["blue", "green"])))
        for p in rng.permutation(distractors)[: len(distractors) // 2]
    ]
    return Sample("video_count", "video", _flash_video(rng, frames, size, flashes),
                  "How many times does a red square flash? Answer with one digit.", str(n),
                  [str(i) for i in range(10)])  # fmt: skip


def video_order(rng: np.random.Generator, frames: int = 16, size: int = 56, **_: Any) -> Sample:
    a, b = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    p1, p2 = sorted(rng.choice(frames // 2, size=2, replace=False).tolist())
    first = a if rng.random() < 0.5 else b
    second = b if first == a else a
    video = _flash_video(rng, frames, size, [(p1, first), (p2, second)])
    return Sample("video_order", "video", video, f"Which color flashed first, {a} or {b}? Answer with one word.",
                  first, [a, b])  # fmt: skip


def video_when(rng: np.random.Generator, frames: int = 16, size: int = 56, **_: Any) -> Sample:
    pairs = frames // 2
    part = int(rng.integers(3))
    bounds = [round(pairs * i / 3) for i in range(4)]
    pair = int(rng.integers(bounds[part], max(bounds[part + 1], bounds[part] + 1)))
    video = _flash_video(rng, frames, size, [(pair, "green")])
    return Sample("video_when", "video", video,
                  "When does the green square flash: beginning, middle or end? Answer with one word.",
                  PARTS[part], list(PARTS))  # fmt: skip


TASKS: dict[str, Callable[..., Sample]] = {
    "image_color": image_color,
    "video_count": video_count,
    "video_order": video_order,
    "video_when": video_when,
}


def task_seed(seed: int, task: str, index: int) -> np.random.Generator:
    """Independent, reproducible stream per (seed, task, sample index): sample i never depends on i-1."""
    return np.random.default_rng([seed, sorted(TASKS).index(task), index])


def generate(task: str, index: int, seed: int = 0, frames: int = 16, size: int = 56) -> Sample:
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task](task_seed(seed, task, index), frames=frames, size=size)

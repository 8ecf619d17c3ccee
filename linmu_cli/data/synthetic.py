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

The `grid_*` tasks (`GRID_TASKS`, teacher 2: docs/quality.md, issue 15) are drawn on 224x224 frames by default:
16x16 patches of 14 px, so 8x8 merged tokens per frame pair, and every answer hinges on where something is in
that grid, when it happens or what shape it has, never on a frame's colour statistics alone:
- `grid_position` (image): "Where is the red square?" -> one of 9 cells (`POSITIONS`); other colours elsewhere.
- `grid_color` (image): "What color is the square at the top left?" -> a colour word; 2-3 squares of other
  colours in other cells (`grid_position` the other way round).
- `grid_motion` (video): "Which way does the red square move?" -> left / right / up / down; a square of another
  colour moves another way, so only the red one's first and last positions decide.
- `grid_count` (video): "How many times does a red square appear?" -> a digit (0-9, one per frame pair at a
  new position), with squares of other colours as distractors; each square lies inside one merged token
  (24 px in a 28-px cell), so the count is of objects, not of how many tokens a square happens to straddle.
The object asked about in these three is always the red square (as in `video_count`): the tasks test where and
when, not which colour word names which colour; `grid_order` and `grid_color` tie colour words to the picture.
- `grid_order` (video): "Which appears first, the red square or the blue square?" -> a colour word.
- `grid_glyph` (video): "Which letter is shown in the video?" -> a letter of `GLYPHS` (a 3x5 pixel font drawn
  at 7 px per font pixel, 21x35 px, on the half-patch lattice) in one frame pair; the OCR stand-in.
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


# ---- grid tasks (teacher 2): 224x224 frames, 8x8 merged tokens ----------------------------------------------

GRID_SIZE = 224  # default side of the grid tasks: 16x16 patches of 14 px -> 8x8 merged tokens (merge 2)
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
DIRECTIONS = ("left", "right", "up", "down")
# A 3x5 pixel font (rows top to bottom); these ten letters differ from each other in at least 4 of 15 pixels.
GLYPHS: dict[str, str] = {
    "A": "010101111101101",
    "C": "011100100100011",
    "F": "111100111100100",
    "J": "001001001101010",
    "L": "100100100100111",
    "O": "010101101101010",
    "T": "111010010010010",
    "U": "101101101101111",
    "X": "101101010101101",
    "Z": "111001010100111",
}
_OBJECT, _TOKEN_OBJECT = 28, 24  # pixels at GRID_SIZE (one merged token is 28x28)
# One font pixel of grid_glyph's letters at GRID_SIZE: half a 14-pixel patch, and the letter is placed on that
# lattice, so every patch sees a 2x2 window of font pixels (one of 16 stroke patterns). Placed freely at 8 px,
# the letter cut patches at any offset and teacher 2's tower took ~900 of 1,900 steps to leave chance on it
# (docs/quality.md, "Teacher 2: the letter on the patch lattice").
_GLYPH_SCALE = 7
TARGET = "red"  # the object asked about in grid_position / grid_motion / grid_count


def _grid_scale(size: int) -> float:
    """Object sizes follow the frame side, so smaller frames (CPU runs) keep the same layout in tokens."""
    if size < 112 or size % 28:
        raise ValueError(f"grid tasks need a frame side that is a multiple of 28 and >= 112, got {size}")
    return size / GRID_SIZE


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark, smooth random field (a 4x4 grid bilinearly upsampled): no two pixels of a row alike, yet cheap to
    draw for long videos and small as PNG / mp4."""
    coarse = rng.integers(0, 72, size=(4, 4, 3)).astype(np.float64)
    x = np.linspace(0.0, 3.0, size)
    i0 = np.minimum(x.astype(np.int64), 2)
    weights = np.zeros((size, 4))
    weights[np.arange(size), i0] = 1.0 - (x - i0)
    weights[np.arange(size), i0 + 1] += x - i0
    field = (weights @ coarse.transpose(2, 0, 1) @ weights.T).transpose(1, 2, 0)  # (size, size, 3)
    return np.round(field).astype(np.uint8)


def _jittered(rng: np.random.Generator, color: str) -> np.ndarray:
    """The palette colour +-20 per channel: colour names, not exact pixel values, carry the answer."""
    return np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8)


def _draw(frames: np.ndarray, top: int, left: int, side: int, rgb: np.ndarray) -> None:
    """A filled square in a frame (H, W, 3) or in every frame of a stack (..., H, W, 3)."""
    frames[..., top : top + side, left : left + side, :] = rgb


def glyph_mask(letter: str, scale: int) -> np.ndarray:
    """The (5 scale, 3 scale) boolean bitmap of `letter` in the 3x5 font."""
    bits = np.array([int(b) for b in GLYPHS[letter]], dtype=bool).reshape(5, 3)
    return np.kron(bits, np.ones((scale, scale), dtype=bool))


def _draw_glyph(frames: np.ndarray, top: int, left: int, letter: str, scale: int, rgb: np.ndarray) -> None:
    box = frames[..., top : top + 5 * scale, left : left + 3 * scale, :]
    box[..., glyph_mask(letter, scale), :] = rgb


def _free_spot(
    rng: np.random.Generator, size: int, h: int, w: int, taken: list[tuple[int, int, int, int]],
    area: tuple[int, int, int, int] | None = None, gap: int = 4, lattice: int = 1,
) -> tuple[int, int]:  # fmt: skip
    """Top-left corner of an h x w box inside `area` (top, left, bottom, right; default the frame) that keeps
    `gap` pixels from every box in `taken` (appended to it); both coordinates multiples of `lattice`."""
    t0, l0, b0, r0 = area or (0, 0, size, size)
    for _ in range(1000):
        top = lattice * int(rng.integers(-(-t0 // lattice), (b0 - h) // lattice + 1))
        left = lattice * int(rng.integers(-(-l0 // lattice), (r0 - w) // lattice + 1))
        if all(top + h + gap <= t or t + th + gap <= top or left + w + gap <= x or x + tw + gap <= left
               for t, x, th, tw in taken):  # fmt: skip
            taken.append((top, left, h, w))
            return top, left
    raise RuntimeError("no free spot for an object: frame too small for the objects asked for")


def _cell_area(cell: int, size: int, margin: int = 2) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of cell `cell` (row-major) of the 3x3 grid, `margin` pixels inside it."""
    row, col = divmod(cell, 3)
    edges = [round(size * i / 3) for i in range(4)]
    return edges[row] + margin, edges[col] + margin, edges[row + 1] - margin, edges[col + 1] - margin


def _cell_squares(
    rng: np.random.Generator, size: int, colors: list[str], mirror: bool = False
) -> tuple[np.ndarray, list[int]]:
    """An image with one square of each colour, each in its own random cell of the 3x3 grid; the cells. `mirror`:
    when the first square is in a side column, the second takes the mirrored cell of its row (left <-> right)."""
    side = round(_OBJECT * _grid_scale(size))
    img = _smooth_background(rng, size)
    cells = [int(c) for c in rng.choice(9, size=len(colors), replace=False)]
    mirrored = cells[0] + 2 - 2 * (cells[0] % 3)
    if mirror and cells[0] % 3 != 1 and mirrored not in cells:
        cells[1] = mirrored
    for cell, color in zip(cells, colors, strict=True):
        top, left = _free_spot(rng, size, side, side, [], area=_cell_area(cell, size))
        _draw(img, top, left, side, _jittered(rng, color))
    return img, cells


def grid_position(rng: np.random.Generator, size: int = GRID_SIZE, **_: Any) -> Sample:
    others = [c for c in COLORS if c != TARGET]
    colors = [TARGET, *(str(c) for c in rng.choice(others, size=int(rng.integers(2, 4)), replace=False))]
    img, cells = _cell_squares(rng, size, colors)
    return Sample("grid_position", "image", img, f"Where is the {TARGET} square? Answer with its position.",
                  POSITIONS[cells[0]], list(POSITIONS))  # fmt: skip


def grid_color(rng: np.random.Generator, size: int = GRID_SIZE, mirror: bool = False, **_: Any) -> Sample:
    """`mirror` (training only, evals/train_teacher.py --color-mirror): a distractor in the asked cell's mirror
    image, the one confusion a teacher made (it read "left" and "right" alike: docs/quality.md)."""
    colors = [str(c) for c in rng.choice(list(COLORS), size=int(rng.integers(3, 5)), replace=False)]
    img, cells = _cell_squares(rng, size, colors, mirror=mirror)
    return Sample("grid_color", "image", img,
                  f"What color is the square at the {POSITIONS[cells[0]]}? Answer with one word.", colors[0],
                  list(COLORS))  # fmt: skip


def _video(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    if frames < 4 or frames % 2:
        raise ValueError(f"grid video tasks need an even number of frames >= 4, got {frames}")
    return np.repeat(_smooth_background(rng, size)[None], frames, axis=0)


def _pair(video: np.ndarray, pair: int) -> np.ndarray:
    """Both frames of frame pair `pair` (one temporal token), as a view: they always show the same thing."""
    return video[2 * pair : 2 * pair + 2]


def _path(
    rng: np.random.Generator, size: int, side: int, direction: int, pairs: int
) -> list[tuple[int, int]]:
    """(top, left) per frame pair of a square crossing 45-65% of the frame in `direction` at constant speed."""
    span = size - side
    dist = int(rng.integers(round(0.45 * size), round(0.65 * size) + 1))
    start, across = int(rng.integers(0, span - dist + 1)), int(rng.integers(0, span + 1))
    steps = [round(dist * p / (pairs - 1)) for p in range(pairs)]
    along = [start + s for s in steps] if direction in (1, 3) else [start + dist - s for s in steps]
    return [(across, a) if direction < 2 else (a, across) for a in along]  # left/right move `left`


def grid_motion(rng: np.random.Generator, frames: int = 16, size: int = GRID_SIZE, **_: Any) -> Sample:
    side, pairs = round(_OBJECT * _grid_scale(size)), frames // 2
    video = _video(rng, frames, size)
    color, other = TARGET, str(rng.choice([c for c in COLORS if c != TARGET]))
    direction = int(rng.integers(4))
    other_direction = int(rng.choice([d for d in range(4) if d != direction]))
    for _ in range(1000):  # two paths that never overlap, so the named square is always fully visible
        ours, theirs = (
            _path(rng, size, side, direction, pairs),
            _path(rng, size, side, other_direction, pairs),
        )
        if all(
            abs(a[0] - b[0]) >= side + 2 or abs(a[1] - b[1]) >= side + 2
            for a, b in zip(ours, theirs, strict=True)
        ):
            break
    else:
        raise RuntimeError("grid_motion: no two disjoint paths found")
    rgb, other_rgb = _jittered(rng, color), _jittered(rng, other)
    for p in range(pairs):
        _draw(_pair(video, p), *theirs[p], side, other_rgb)
        _draw(_pair(video, p), *ours[p], side, rgb)
    return Sample("grid_motion", "video", video,
                  f"Which way does the {color} square move: left, right, up or down? Answer with one word.",
                  DIRECTIONS[direction], list(DIRECTIONS))  # fmt: skip


def _scatter(
    rng: np.random.Generator,
    video: np.ndarray,
    side: int,
    items: list[tuple[int, str]],
    on_tokens: bool = False,
) -> None:
    """Draw a square of each (pair, colour) at a random free spot of that pair; `on_tokens`: inside one random
    free cell of the merged-token grid (28 px at 224), so that each square is exactly one visual token."""
    taken: dict[int, list[tuple[int, int, int, int]]] = {}
    size = video.shape[1]
    cell = round(28 * _grid_scale(size))
    for pair, color in items:
        if on_tokens:
            used = taken.setdefault(pair, [])
            free = [c for c in range((size // cell) ** 2) if c not in used]
            row, col = divmod(int(rng.choice(free)), size // cell)
            used.append(row * (size // cell) + col)
            top, left = (
                row * cell + int(rng.integers(0, cell - side + 1)),
                col * cell + int(rng.integers(0, cell - side + 1)),
            )
        else:
            top, left = _free_spot(rng, size, side, side, taken.setdefault(pair, []))
        _draw(_pair(video, pair), top, left, side, _jittered(rng, color))


def grid_count(rng: np.random.Generator, frames: int = 16, size: int = GRID_SIZE, **_: Any) -> Sample:
    side, pairs = round(_TOKEN_OBJECT * _grid_scale(size)), frames // 2
    video = _video(rng, frames, size)
    color = TARGET
    others = [c for c in COLORS if c != color]
    n = int(rng.integers(0, min(pairs, 9) + 1))
    chosen = sorted(rng.choice(pairs, size=n, replace=False).tolist())
    items = [(int(p), color) for p in chosen]
    items += [(p, str(rng.choice(others))) for p in range(pairs) if rng.random() < 0.5]  # distractors
    _scatter(rng, video, side, items, on_tokens=True)  # one token per square: a count of objects, not tokens
    return Sample("grid_count", "video", video,
                  f"How many times does a {color} square appear? Answer with one digit.", str(n),
                  [str(i) for i in range(10)])  # fmt: skip


def grid_order(
    rng: np.random.Generator, frames: int = 16, size: int = GRID_SIZE, early: bool = False, **_: Any
) -> Sample:
    """`early` (training only, evals/train_teacher.py --order-early): when the first named square is not in the
    first frame pair, a distractor appears before it, the case a teacher answered with the distractor's colour
    (docs/quality.md)."""
    side, pairs = round(_OBJECT * _grid_scale(size)), frames // 2
    video = _video(rng, frames, size)
    a, b, *others = (str(c) for c in rng.permutation(list(COLORS)))
    p1, p2 = sorted(rng.choice(pairs, size=2, replace=False).tolist())
    first = a if rng.random() < 0.5 else b
    second = b if first == a else a
    items = [(int(p1), first), (int(p2), second)]
    rest = [p for p in range(pairs) if p not in (p1, p2)]
    items += [(int(p), str(rng.choice(others))) for p in rng.permutation(rest)[: int(rng.integers(0, 3))]]
    if early and p1 > 0 and all(p >= p1 for p, _ in items):
        items.append((int(rng.integers(0, p1)), str(rng.choice(others))))
    _scatter(rng, video, side, items)
    return Sample("grid_order", "video", video,
                  f"Which appears first, the {a} square or the {b} square? Answer with one word.", first,
                  [a, b])  # fmt: skip


def grid_glyph(rng: np.random.Generator, frames: int = 16, size: int = GRID_SIZE, **_: Any) -> Sample:
    scale = max(2, round(_GLYPH_SCALE * _grid_scale(size)))
    side, pairs = round(_OBJECT * _grid_scale(size)), frames // 2
    video = _video(rng, frames, size)
    letter = str(rng.choice(list(GLYPHS)))
    pair = int(rng.integers(pairs))
    taken: list[tuple[int, int, int, int]] = []
    top, left = _free_spot(rng, size, 5 * scale, 3 * scale, taken, lattice=scale)
    _draw_glyph(_pair(video, pair), top, left, letter, scale, _jittered(rng, "white"))
    colored = [c for c in COLORS if c not in ("white", "yellow")]  # no distractor looks like the letter
    _scatter(rng, video, side, [(p, str(rng.choice(colored))) for p in range(pairs) if p != pair
                                and rng.random() < 0.5])  # fmt: skip
    return Sample("grid_glyph", "video", video, "Which letter is shown in the video? Answer with one letter.",
                  letter, list(GLYPHS))  # fmt: skip


TINY_TASKS = ("image_color", "video_count", "video_order", "video_when")  # the tiny teacher's (evals/teacher)
GRID_TASKS = ("grid_position", "grid_color", "grid_motion", "grid_count", "grid_order", "grid_glyph")
TASKS: dict[str, Callable[..., Sample]] = {
    "image_color": image_color,
    "video_count": video_count,
    "video_order": video_order,
    "video_when": video_when,
    "grid_position": grid_position,
    "grid_color": grid_color,
    "grid_motion": grid_motion,
    "grid_count": grid_count,
    "grid_order": grid_order,
    "grid_glyph": grid_glyph,
}
KIND = {t: "image" for t in ("image_color", "grid_position", "grid_color")} | {
    t: "video" for t in TASKS if t not in ("image_color", "grid_position", "grid_color")
}
DEFAULT_SIZE = {t: 56 for t in TINY_TASKS} | {t: GRID_SIZE for t in GRID_TASKS}
# The stream index of each task in `task_seed`: the tiny tasks keep the index they had when TASKS held only them
# (sorted order), so their samples never change; new tasks are appended.
_SEED_INDEX = {t: i for i, t in enumerate((*sorted(TINY_TASKS), *GRID_TASKS))}


def task_seed(seed: int, task: str, index: int) -> np.random.Generator:
    """Independent, reproducible stream per (seed, task, sample index): sample i never depends on i-1."""
    return np.random.default_rng([seed, _SEED_INDEX[task], index])


def generate(task: str, index: int, seed: int = 0, frames: int = 16, size: int | None = None) -> Sample:
    """Sample `index` of `task`; `size` (frame side) defaults to the task's own (`DEFAULT_SIZE`)."""
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    size = DEFAULT_SIZE[task] if size is None else size
    return TASKS[task](task_seed(seed, task, index), frames=frames, size=size)

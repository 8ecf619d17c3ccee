"""Which answers does a teacher confuse? The confusion table of one synthetic task: held-out samples (the trainer's
evaluation seed, so the same samples as its report), greedy replies, rows = the true answer, columns = the reply.
For reading a teacher's errors (teacher 2's glyph at ~0.80: which letters) before changing its training.

    python evals/confusion.py CHECKPOINT grid_glyph --frames 16 --count 100 [--json out.json]

CHECKPOINT is a directory `linmu` can load (e.g. teacher 2's, extracted from `benchmarks/h200_teacher2.sh`'s tar).
CPU by default (`--device`); a 16M-parameter teacher 2 at 16 frames takes ~1 s per sample on two cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.evaluation.answers import normalize_answer  # noqa: E402
from linmu_cli.evaluation.greedy import greedy_answers  # noqa: E402
from linmu_cli.loading import load_model  # noqa: E402

EVAL_SEED = 12345  # evals/train_teacher.py's --eval-seed default: the samples of its held-out report
PALETTE = np.array(list(synthetic.COLORS.values()), dtype=np.float64)


def palette_masks(frame: np.ndarray) -> dict[str, np.ndarray]:
    """{colour: its pixels} of a grid frame (H, W, 3): bright pixels (the background is dark) nearest to it."""
    bright = frame.max(axis=-1) > 140
    nearest = np.linalg.norm(frame[..., None, :].astype(np.float64) - PALETTE, axis=-1).argmin(axis=-1)
    return {name: bright & (nearest == i) for i, name in enumerate(synthetic.COLORS)}


def early_distractor(sample: synthetic.Sample) -> bool:
    """grid_order: does a square of neither named colour appear before the first named square? (Session 14's
    teacher answered most of those with the distractor's colour.)"""
    present = [{c for c, m in palette_masks(pair).items() if m.sum() > 50} for pair in sample.media[::2]]
    first = min(k for k, colors in enumerate(present) if set(sample.choices) & colors)
    return any(colors - set(sample.choices) for colors in present[:first])


def confusion(
    model, processor, task: str, frames: int, count: int, seed: int = EVAL_SEED, batch: int = 20
) -> dict:
    """{"accuracy", "table": {answer: {reply: n}}, "errors": [(sample index, answer, reply)]}."""
    samples = [synthetic.generate(task, i, seed=seed, frames=frames) for i in range(count)]
    replies = [normalize_answer(r) for r in greedy_answers(model, processor, samples, batch_size=batch)]
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    errors = []
    for i, (sample, reply) in enumerate(zip(samples, replies, strict=True)):
        answer = normalize_answer(sample.answer)
        table[answer][reply] += 1
        if reply != answer:
            errors.append((i, answer, reply))
    right = sum(table[a][a] for a in table)
    res = {"task": task, "frames": frames, "count": count, "seed": seed, "accuracy": right / count,
           "table": {a: dict(c.most_common()) for a, c in sorted(table.items())}, "errors": errors}  # fmt: skip
    if task == "grid_order":  # accuracy with and without a distractor before the first named square
        early = [early_distractor(s) for s in samples]
        wrong = {i for i, _, _ in errors}
        for name, keep in (("early_distractor", True), ("no_early_distractor", False)):
            rows = [i for i in range(count) if early[i] == keep]
            res[name] = {
                "samples": len(rows),
                "accuracy": 1 - len(wrong.intersection(rows)) / max(1, len(rows)),
            }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("task", choices=sorted(synthetic.TASKS))
    p.add_argument("--frames", type=int, default=16, help="frames per video (image tasks: ignored)")
    p.add_argument("--count", type=int, default=100, help="held-out samples")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.checkpoint, require_processor=True, device=args.device)
    res = confusion(loaded.model, loaded.processor, args.task, args.frames, args.count, args.seed)
    print(
        f"{args.task} at {args.frames} frames, {args.count} samples (seed {args.seed}): accuracy {res['accuracy']:.3f}"
    )
    for answer, replies in res["table"].items():
        total = sum(replies.values())
        wrong = ", ".join(f"{r!r} x{n}" for r, n in replies.items() if r != answer) or "-"
        print(f"  {answer!r:>6}: {replies.get(answer, 0)}/{total} right; wrong replies: {wrong}")
    for name in ("early_distractor", "no_early_distractor"):
        if name in res:
            print(
                f"  {name.replace('_', ' ')}: {res[name]['samples']} samples, accuracy {res[name]['accuracy']:.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

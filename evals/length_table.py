"""Markdown tables from `evals/study.py --length-only` results (docs/quality.md, "Length generalization").

    python evals/length_table.py evals/results/length/*.json            # one row per run and frame count
    python evals/length_table.py --counts evals/results/length/X.json   # video_count: answers vs truth

Every cell is an accuracy on the run's held-out samples +- its binomial standard error (the JSON's "se").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def rows(path: Path, student_only: bool) -> list[str]:
    res = json.loads(path.read_text())
    tasks = res["tasks"]
    out = []
    for name, row in res["rows"].items():
        if student_only and name.startswith("teacher"):
            continue
        se = res["se"][name]
        cells = [f"{row[t]:.2f}" for t in tasks] + [f"{row['mean']:.2f} ± {se['mean']:.2f}"]
        cells.append(f"{row['agreement']:.2f}" if "agreement" in row else "-")
        out.append("| " + " | ".join([f"{res['name']}: {name}", *cells, f"`{res['command']}`"]) + " |")
    return out


def compact(paths: list[Path], labels: list[str]) -> None:
    """One row per run: the student's mean +- SE and video_count at each frame count, and the run's command."""
    frames = json.loads(paths[0].read_text())["rows"]
    ks = [name.split("@")[1] for name in frames if name.startswith("LinMU")]
    head = [
        "run",
        *(f"mean @{k}" for k in ks),
        *(f"video_count @{k}" for k in ks),
        "agreement @" + ks[0],
        "command",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path, label in zip(paths, labels, strict=True):
        res = json.loads(path.read_text())
        rows, se = res["rows"], res["se"]
        cells = [
            f"{rows[f'LinMU final @{k}']['mean']:.2f} ± {se[f'LinMU final @{k}']['mean']:.2f}" for k in ks
        ]
        cells += [f"{rows[f'LinMU final @{k}']['video_count']:.2f}" for k in ks]
        cells.append(f"{rows[f'LinMU final @{ks[0]}']['agreement']:.2f}")
        print("| " + " | ".join([label, *cells, f"`{res['command']}`"]) + " |")


def counts(path: Path) -> None:
    """For each frame count: how often each (truth -> answer) of video_count occurs, and the mean answer per truth."""
    res = json.loads(path.read_text())
    for name, got in res["answers"].items():
        pairs = got["video_count"]
        by_truth: dict[str, Counter] = {}
        for pred, truth in pairs:
            by_truth.setdefault(truth, Counter())[pred] += 1
        cells = [
            f"{t}->{'/'.join(f'{p}x{c}' for p, c in sorted(by_truth[t].items()))}" for t in sorted(by_truth)
        ]
        print(f"{name}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--counts", action="store_true", help="video_count answer-vs-truth breakdown instead")
    ap.add_argument("--compact", action="store_true", help="one row per file")
    ap.add_argument("--labels", default=None, help="with --compact: row labels, ';'-separated, in file order")
    ap.add_argument("--student-only", action="store_true", help="leave the teacher rows out")
    args = ap.parse_args()
    if args.counts:
        for f in args.files:
            print(f"## {f}")
            counts(f)
        return
    if args.compact:
        names = [json.loads(f.read_text())["name"] for f in args.files]
        compact(args.files, args.labels.split(";") if args.labels else names)
        return
    tasks = json.loads(args.files[0].read_text())["tasks"]
    head = ["run: model", *tasks, "mean ± SE", "agreement", "command"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in args.files:
        print("\n".join(rows(f, args.student_only)))


if __name__ == "__main__":
    main()

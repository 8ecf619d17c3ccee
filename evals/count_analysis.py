"""Which flashes does a student count on a long video? Splits each video_count sample's red flashes into the last
16 frames (the distillation length) and the rest, and compares the student's answer with the total, with
the last-16-frames count and with the density estimate total * 16 / frames, and fits (least squares)
answer ~ a * (flashes before the last 16 frames) + b * (flashes in the last 16 frames) + c.
Counting: a = b = 1; density: a = b = 16 / frames; only what the last 16 frames show: a = 0, b = 1.

    python evals/count_analysis.py evals/results/length/default.json [...]

Reads the answers an `evals/study.py --length-only` JSON keeps; regenerates the same samples (seed 12345).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linmu_cli.data import synthetic  # noqa: E402

RED = np.array(synthetic.COLORS["red"])


def red_pairs(media: np.ndarray) -> list[int]:
    """Pair indices whose first frame has a red quadrant (a flash paints both frames of a pair)."""
    size = media.shape[1]
    out = []
    for p in range(media.shape[0] // 2):
        f = media[2 * p]
        quads = [f[(q // 2) * size // 2 + size // 4, (q % 2) * size // 2 + size // 4] for q in range(4)]
        if any((q == RED).all() for q in quads):
            out.append(p)
    return out


def main() -> None:
    for path in sys.argv[1:]:
        res = json.loads(Path(path).read_text())
        base = res["frames"]
        print(f"## {path} ({res['name']})")
        for name, got in res["answers"].items():
            if not name.startswith("LinMU"):
                continue
            frames = int(name.split("@")[1])
            pairs = got["video_count"]
            hits = {"total": 0, f"last {base} frames": 0, f"density (total*{base}/{frames})": 0}
            n = 0
            rows, answers_ = [], []
            for i, (pred, truth) in enumerate(pairs):
                s = synthetic.generate("video_count", i, res["eval_seed"], frames, 56)
                red = red_pairs(s.media)
                assert len(red) == int(truth), (i, red, truth)
                if not pred.isdigit():
                    continue
                n += 1
                last = sum(p >= frames // 2 - base // 2 for p in red)
                rows.append([len(red) - last, last, 1.0])
                answers_.append(float(pred))
                hits["total"] += int(pred) == len(red)
                hits[f"last {base} frames"] += int(pred) == last
                hits[f"density (total*{base}/{frames})"] += abs(int(pred) - len(red) * base / frames) <= 0.5
            print(f"{name}: {len(pairs)} samples ({n} digit answers); answer equals: "
                  + ", ".join(f"{k} {v / len(pairs):.2f}" for k, v in hits.items()))  # fmt: skip
            if frames > base:
                x, y = np.array(rows), np.array(answers_)
                coef, *_ = np.linalg.lstsq(x, y, rcond=None)
                resid = y - x @ coef
                cov = resid @ resid / (len(y) - 3) * np.linalg.inv(x.T @ x)  # OLS standard errors
                (a, b, c), (sa, sb, sc) = coef, np.sqrt(np.diag(cov))
                print(
                    f"    fit: answer ~ ({a:.2f} ± {sa:.2f}) * earlier + ({b:.2f} ± {sb:.2f}) * last {base} frames"
                    f" + ({c:.2f} ± {sc:.2f})"
                )


if __name__ == "__main__":
    main()

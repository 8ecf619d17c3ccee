"""Which flashes does a student count on a long video? Splits each video_count sample's red flashes into the last
16 frames (the distillation length) and the rest, and compares the student's answer with the total, with
the last-16-frames count and with the density estimate total * 16 / frames.

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
            for i, (pred, truth) in enumerate(pairs):
                s = synthetic.generate("video_count", i, res["eval_seed"], frames, 56)
                red = red_pairs(s.media)
                assert len(red) == int(truth), (i, red, truth)
                if not pred.isdigit():
                    continue
                n += 1
                last = sum(p >= frames // 2 - base // 2 for p in red)
                hits["total"] += int(pred) == len(red)
                hits[f"last {base} frames"] += int(pred) == last
                hits[f"density (total*{base}/{frames})"] += abs(int(pred) - len(red) * base / frames) <= 0.5
            print(f"{name}: {len(pairs)} samples ({n} digit answers); answer equals: "
                  + ", ".join(f"{k} {v / len(pairs):.2f}" for k, v in hits.items()))  # fmt: skip


if __name__ == "__main__":
    main()

"""The offline lmms-eval tasks in `evals/`: where they live and the generator that writes their data.

Every `linmu_*` task reads `evals/data/<dataset>/test.jsonl` (question, answer, choices, media path) and the
PNG images / mp4 videos beside it. Everything is generated from a seed by `linmu_cli.data.synthetic`, so CI and
machines without internet evaluate the same samples:

    python -m linmu_cli.evaluation.tasks                 # all datasets, seed 12345, 100 samples each
    python -m linmu_cli.evaluation.tasks video_count --seed 1 --count 200 --frames 32 --force

`linmu eval` (and the first load of a `linmu_*` task in plain lmms-eval) generates missing datasets with the
defaults below; existing data is kept (whatever seed or size it was written with) unless asked (`--force`) or
written by an older generator version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from linmu_cli.data import synthetic
from linmu_cli.errors import LinmuError
from linmu_cli.io import atomic_directory

DATA_VERSION = 1
VIDEO_FPS = 2.0  # one frame pair (one temporal token) per second
# Not 0: `linmu distill` trains on the synthetic stream of its recipe seed (default 0) and holds out seed + 7919,
# so the evaluation samples come from a stream no default recipe trains on.
EVAL_SEED = 12345


@dataclass(frozen=True)
class SyntheticDataset:
    """One generated dataset; several lmms-eval tasks (generation, multiple choice) may read it."""

    name: str  # directory under evals/data
    source: str  # linmu_cli.data.synthetic task
    frames: int = 16
    size: int | None = None  # None: the task's own (`synthetic.DEFAULT_SIZE`: 56, or 224 for the grid tasks)
    count: int = 100


DATASETS: dict[str, SyntheticDataset] = {
    d.name: d
    for d in (
        SyntheticDataset("image_color", "image_color"),
        SyntheticDataset("video_count", "video_count"),
        SyntheticDataset("video_order", "video_order"),
        SyntheticDataset("video_when", "video_when"),
        # Long videos: 64 frames = 32 temporal tokens; answers still hinge on one or a few frame pairs.
        SyntheticDataset("long_video_count", "video_count", frames=64),
        SyntheticDataset("long_video_order", "video_order", frames=64),
        SyntheticDataset("long_video_when", "video_when", frames=64),
        # Teacher 2's grid tasks (issue 15): 224x224 frames, 8x8 merged tokens per frame pair.
        *(SyntheticDataset(t, t) for t in synthetic.GRID_TASKS),
        *(
            SyntheticDataset(f"long_{t}", t, frames=64)
            for t in synthetic.GRID_TASKS
            if synthetic.KIND[t] == "video"
        ),
    )
}


def repo_evals_dir() -> Path:
    """`evals/` of the source checkout this package runs from (editable installs and CI)."""
    return Path(__file__).resolve().parents[2] / "evals"


def evals_dir() -> Path | None:
    """Where the linmu task YAMLs are: $LINMU_EVALS_DIR, else the checkout's `evals/`; None if neither exists."""
    env = os.environ.get("LINMU_EVALS_DIR", "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise LinmuError(f"LINMU_EVALS_DIR={env} is not a directory")
        return path.resolve()
    path = repo_evals_dir()
    return path if path.is_dir() else None


def data_root(evals: Path) -> Path:
    return Path(evals) / "data"


def dataset_ready(root: Path, name: str) -> bool:
    """Written completely (the directory appears atomically) by this generator version."""
    try:
        meta = json.loads((Path(root) / name / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("version") == DATA_VERSION and (Path(root) / name / "test.jsonl").is_file()


def generate_dataset(
    name: str,
    root: str | Path,
    *,
    seed: int = EVAL_SEED,
    count: int | None = None,
    frames: int | None = None,
    size: int | None = None,
    force: bool = True,
    on_sample: Callable[[], None] | None = None,
) -> Path:
    """Write `root/name/`: media files, `test.jsonl` and `meta.json` (atomically: all or nothing)."""
    if name not in DATASETS:
        raise LinmuError(f"unknown synthetic dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    count = spec.count if count is None else int(count)
    frames = spec.frames if frames is None else int(frames)
    size = (spec.size or synthetic.DEFAULT_SIZE[spec.source]) if size is None else int(size)
    if count < 1:
        raise LinmuError(f"--count must be at least 1, got {count}")
    if frames < 2 or frames % 2:
        raise LinmuError(f"--frames must be an even number >= 2 (frames come in pairs), got {frames}")
    if size < 56 or size % 28:
        raise LinmuError(f"--size must be a multiple of 28 and at least 56, got {size}")
    from linmu_cli.media import write_video

    out = Path(root) / name
    with atomic_directory(out, force=force) as tmp:
        rows = []
        for i in range(count):
            sample = synthetic.generate(spec.source, i, seed=seed, frames=frames, size=size)
            if sample.kind == "image":
                media = f"{name}/{i:05d}.png"
                Image.fromarray(sample.media).save(tmp / f"{i:05d}.png")
            else:
                media = f"{name}/{i:05d}.mp4"
                write_video(tmp / f"{i:05d}.mp4", sample.media, fps=VIDEO_FPS)
            rows.append(
                {
                    "id": f"{name}-{i:05d}",
                    "kind": sample.kind,
                    "media": media,  # relative to evals/data
                    "question": sample.question,
                    "answer": sample.answer,
                    "choices": sample.choices,
                    "answer_index": sample.choices.index(sample.answer),
                    "frames": int(sample.media.shape[0]) if sample.kind == "video" else 1,
                    "fps": VIDEO_FPS if sample.kind == "video" else None,
                }
            )
            if on_sample is not None:
                on_sample()
        meta = {**asdict(spec), "count": count, "frames": frames, "size": size, "seed": seed,
                "fps": VIDEO_FPS, "version": DATA_VERSION}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        with (tmp / "test.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return out


def ensure_datasets(
    evals: str | Path,
    names: list[str] | None = None,
    seed: int = EVAL_SEED,
    on_sample: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Generate (with the defaults) every dataset in `names` (default: all) that is missing; return those made.

    `on_sample(done, total)` follows the samples written over all missing datasets (the first run writes 700
    PNGs / mp4s, ~100 MB, 1,700 with the grid tasks: a progress bar, not a silent minute)."""
    root = data_root(Path(evals))
    missing = [n for n in (names if names is not None else list(DATASETS)) if not dataset_ready(root, n)]
    total = sum(DATASETS[n].count for n in missing if n in DATASETS)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_sample is not None:
            on_sample(done, total)

    for name in missing:
        generate_dataset(name, root, seed=seed, on_sample=step)
    return missing


def dataset_meta(evals: str | Path, name: str) -> dict | None:
    try:
        return json.loads((data_root(Path(evals)) / name / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linmu_cli.evaluation.tasks",
        description="Write the data of linmu's synthetic lmms-eval tasks (evals/data) from a seed.",
    )
    parser.add_argument("datasets", nargs="*", help=f"which ones (default: all): {', '.join(DATASETS)}")
    parser.add_argument(
        "--evals-dir", type=Path, default=None, help="the evals/ directory (default: the checkout's)"
    )
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--count", type=int, default=None, help="samples per dataset (default: 100)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: 16; long_*: 64)")
    parser.add_argument(
        "--size", type=int, default=None, help="frame / image side in pixels (default: 56; grid_*: 224)"
    )
    parser.add_argument("--force", action="store_true", help="replace datasets that already exist")
    args = parser.parse_args(argv)
    try:
        evals = args.evals_dir or evals_dir()
        if evals is None:
            raise LinmuError("no evals/ directory found: pass --evals-dir or set LINMU_EVALS_DIR")
        root = data_root(evals)
        for name in args.datasets or list(DATASETS):
            if dataset_ready(root, name) and not args.force:
                print(f"{name}: exists ({root / name}); --force replaces it")
                continue
            out = generate_dataset(name, root, seed=args.seed, count=args.count, frames=args.frames,
                                   size=args.size, force=True)  # fmt: skip
            meta = json.loads((out / "meta.json").read_text())
            print(f"{name}: {meta['count']} samples, {meta['frames']} frames at {meta['size']}px -> {out}")
    except LinmuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

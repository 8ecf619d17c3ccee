"""Compare `linmu distill` runs step by step: losses, tokens/s, checkpoints written (issue 7's multi-GPU checks).

    python benchmarks/compare_runs.py REF RUN [RUN ...] [--json out.json]

REF is usually the 1-GPU run with the same global batch (grad_accum x processes). For each stage: the largest
absolute and relative loss difference to REF over the common steps, the median logged tokens/s and its ratio to
REF, and the step checkpoints and stage outputs found on disk (written once, by rank 0, with no temporary
directories left behind).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def metrics(run: Path) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["stage"], {})[rec["step"]] = rec  # a resumed step overwrites the killed one
    return out


def files(run: Path) -> dict[str, list[str]]:
    ckpt = run / "checkpoints"
    return {
        "checkpoints": sorted(str(p.relative_to(run)) for p in ckpt.glob("*/step-*"))
        if ckpt.is_dir()
        else [],
        "temporary": sorted(str(p.relative_to(run)) for p in run.rglob(".tmp*")),
        "stage_outputs": sorted(p.name for p in run.iterdir() if (p / "config.json").is_file()),
    }


def compare(ref: Path, run: Path) -> dict:
    a, b = metrics(ref), metrics(run)
    stages = {}
    for stage in a:
        steps = sorted(set(a[stage]) & set(b.get(stage, {})))
        if not steps:
            stages[stage] = {"common_steps": 0}
            continue
        diffs = [abs(a[stage][s]["loss"] - b[stage][s]["loss"]) for s in steps]
        rels = [d / max(abs(a[stage][s]["loss"]), 1e-12) for d, s in zip(diffs, steps, strict=True)]
        rate_a = statistics.median(a[stage][s]["tokens_per_s"] for s in steps[1:] or steps)
        rate_b = statistics.median(b[stage][s]["tokens_per_s"] for s in steps[1:] or steps)
        stages[stage] = {"common_steps": len(steps), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rels),
                         "ref_losses": [a[stage][s]["loss"] for s in steps],
                         "losses": [b[stage][s]["loss"] for s in steps],
                         "tokens_per_s": rate_b, "tokens_per_s_ref": rate_a, "speedup": rate_b / rate_a}  # fmt: skip
    return {"run": str(run), "stages": stages, **files(run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {
        "ref": str(args.ref),
        "ref_files": files(args.ref),
        "runs": [compare(args.ref, r) for r in args.runs],
    }
    for r in report["runs"]:
        print(r["run"])
        for stage, s in r["stages"].items():
            if s["common_steps"]:
                print(f"  {stage}: {s['common_steps']} steps, max |dloss| {s['max_abs_loss_diff']:.3g} "
                      f"(rel {s['max_rel_loss_diff']:.3g}), {s['tokens_per_s']:,.0f} tok/s = "
                      f"{s['speedup']:.2f}x ref")  # fmt: skip
        print(f"  checkpoints {r['checkpoints']}, temporary {r['temporary']}, outputs {r['stage_outputs']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

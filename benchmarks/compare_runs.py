"""Compare `linmu distill` runs step by step: losses, tokens/s, checkpoints written (issue 7's multi-GPU checks,
issue 17's before / after checks of each speed-up).

    python benchmarks/compare_runs.py REF RUN [RUN ...] [--rtol 1e-3] [--noise NOISE_RUN] [--json out.json]

REF is the run before a change (or the 1-GPU run with the same global batch). For each stage: the largest
absolute and the largest and mean relative loss difference to REF over the common steps, a verdict, the median
logged tokens/s and its ratio to REF, and the step checkpoints and stage outputs found on disk (written once, by
rank 0, with no temporary directories left behind).

Verdict per stage: "identical" (every common step's loss equal to the last bit), "same within noise" (largest
relative difference <= the stage's tolerance) or "different". A run that stopped early (killed by a time limit)
is "incomplete" overall unless a common step already differs: agreement on its first steps says nothing of the
rest (session 15's `vision` curve: 3 of 130 steps). The tolerance is rtol (default 1e-3), or, with
`--noise NOISE_RUN`, the larger of rtol and 2x the largest relative difference between REF and NOISE_RUN in that
stage: NOISE_RUN is REF's recipe run again with only floating-point rounding changed (another CPU thread count,
or simply a second run on a GPU), so the tolerance is the measured noise of the run, not a guess. Over a run's
steps a rounding difference grows (each step's update feeds the next); a change of the loss (e.g. another
loss.hidden_layers) moves the tiny recipe's losses by 1e-2 and more from the first affected step. Also reported
per stage (not part of the verdict): the first step whose loss differs, and the relative difference of the last
third's mean loss, where a bias shows and a step-to-step wobble averages out.
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


def verdict(max_rel: float, max_abs: float, rtol: float) -> str:
    if max_abs == 0:
        return "identical"
    return "same within noise" if max_rel <= rtol else "different"


def max_rel(ref: Path, run: Path) -> dict[str, float]:
    """Per stage, the largest relative loss difference of `run` to `ref` over their common steps."""
    stages = compare(ref, run)["stages"]
    return {stage: s["max_rel_loss_diff"] for stage, s in stages.items() if s["common_steps"]}


def compare(ref: Path, run: Path, rtol: float = 1e-3, noise: dict[str, float] | None = None) -> dict:
    a, b = metrics(ref), metrics(run)
    stages = {}
    for stage in a:
        steps = sorted(set(a[stage]) & set(b.get(stage, {})))
        if not steps:
            stages[stage] = {"common_steps": 0, "ref_steps": len(a[stage])}
            continue
        diffs = [abs(a[stage][s]["loss"] - b[stage][s]["loss"]) for s in steps]
        rels = [d / max(abs(a[stage][s]["loss"]), 1e-12) for d, s in zip(diffs, steps, strict=True)]
        tol = max(rtol, 2 * (noise or {}).get(stage, 0.0))
        first = next((s for s in steps if a[stage][s]["loss"] != b[stage][s]["loss"]), None)
        tail = steps[
            -max(1, len(steps) // 3) :
        ]  # where the curves settle: a bias shows here, a wobble averages out
        tail_ref = statistics.fmean(a[stage][s]["loss"] for s in tail)
        tail_rel = (statistics.fmean(b[stage][s]["loss"] for s in tail) - tail_ref) / max(
            abs(tail_ref), 1e-12
        )
        rate_a = statistics.median(a[stage][s]["tokens_per_s"] for s in steps[1:] or steps)
        rate_b = statistics.median(b[stage][s]["tokens_per_s"] for s in steps[1:] or steps)
        stages[stage] = {"common_steps": len(steps), "ref_steps": len(a[stage]), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rels),
                         "mean_rel_loss_diff": sum(rels) / len(rels), "first_differing_step": first,
                         "last_third_mean_rel_diff": tail_rel,
                         "tolerance": tol, "verdict": verdict(max(rels), max(diffs), tol),
                         "ref_losses": [a[stage][s]["loss"] for s in steps],
                         "losses": [b[stage][s]["loss"] for s in steps],
                         "tokens_per_s": rate_b, "tokens_per_s_ref": rate_a, "speedup": rate_b / rate_a}  # fmt: skip
    verdicts = [s["verdict"] for s in stages.values() if s["common_steps"]]
    compared, expected = (sum(s[k] for s in stages.values()) for k in ("common_steps", "ref_steps"))
    overall = ("different" if "different" in verdicts or not verdicts
               else f"incomplete: {compared} of {expected} steps compared" if compared < expected
               else "identical" if all(v == "identical" for v in verdicts) else "same within noise")  # fmt: skip
    return {"run": str(run), "rtol": rtol, "verdict": overall, "stages": stages, **files(run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--rtol", type=float, default=1e-3, help="largest relative loss difference called noise")
    ap.add_argument(
        "--noise", type=Path, help="REF's recipe again with only rounding changed: sets the tolerance"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    noise = max_rel(args.ref, args.noise) if args.noise else None
    report = {
        "ref": str(args.ref),
        "ref_files": files(args.ref),
        "rtol": args.rtol,
        "noise_run": str(args.noise) if args.noise else None,
        "noise_max_rel_loss_diff": noise,
        "runs": [compare(args.ref, r, args.rtol, noise) for r in args.runs],
    }
    if noise:
        print(
            "noise (max rel. loss difference REF vs NOISE_RUN): "
            + ", ".join(f"{k} {v:.3g}" for k, v in noise.items())
        )
    for r in report["runs"]:
        print(r["run"])
        for stage, s in r["stages"].items():
            if s["common_steps"]:
                print(f"  {stage}: {s['common_steps']} steps, max |dloss| {s['max_abs_loss_diff']:.3g} "
                      f"(rel max {s['max_rel_loss_diff']:.3g}, mean {s['mean_rel_loss_diff']:.3g}): "
                      f"{s['verdict']} (tol {s['tolerance']:.3g}); first differing step {s['first_differing_step']}, "
                      f"last third's mean loss {s['last_third_mean_rel_diff']:+.2%}; "
                      f"{s['tokens_per_s']:,.0f} tok/s = {s['speedup']:.2f}x ref")  # fmt: skip
        print(f"  verdict (rtol {r['rtol']:g}): {r['verdict']}")
        print(f"  checkpoints {r['checkpoints']}, temporary {r['temporary']}, outputs {r['stage_outputs']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

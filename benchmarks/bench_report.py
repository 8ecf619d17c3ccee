"""Summarize a `linmu bench --json` result: tables, the plot, a markdown table and the H200 targets.

    python benchmarks/bench_report.py bench.json --plot bench.png --markdown bench.md [--vision vision.json]

Works on a partial JSON too (the bench rewrites it after every frame count), so a run cut short by a timeout
still gets its tables and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linmu_cli.bench import lookup, save_plot, tables  # noqa: E402

# Targets on one H200 (Qwen2-VL-7B shape, bf16, 448x448 frames), against the served teacher.
TTFT_RATIO_MIN = {64: 1.0, 512: 1.45, 1024: 2.1, 2048: 3.5}  # with LinMU's restructured prefill
SERVED_BANDWIDTH_MIN = {"equal_batch": 1 / 1.3, "batch_1": 1 / 2.0}  # of copy bandwidth at 512 frames
VISION_SPEEDUP_MIN = 1.6  # fast tower vs transformers', 512 frames


def teacher_label(result: dict) -> str:
    """linmu-bench/1 files measured the eager teacher (transformers + DynamicCache), /2 the served one."""
    return "eager teacher (linmu-bench/1)" if result.get("schema") == "linmu-bench/1" else "served teacher"


def _row(result: dict, frames: int) -> dict | None:
    return next((r for r in result["results"] if r["frames"] == frames), None)


def check_targets(result: dict, vision: dict | None = None) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows."""
    out = []
    who = teacher_label(result)

    def add(name, value, ok, fmt="{:.2f}x"):
        shown = "not measured" if value is None else fmt.format(value)
        out.append((name, shown, "-" if value is None else ("met" if ok(value) else "MISSED")))

    for f, lim in TTFT_RATIO_MIN.items():
        add(f"TTFT {who}/LinMU >= {lim}x at {f} frames", lookup(_row(result, f) or {}, "ratios", "ttft"),
            lambda v, lim=lim: v >= lim)  # fmt: skip
    for key, lim in SERVED_BANDWIDTH_MIN.items():
        entry = lookup(_row(result, 512) or {}, "teacher", "decode", key) or {}
        b = entry.get("batch", "?")
        add(f"{who} decode at batch {b}, 512 frames, within {1 / lim:.1f}x of its bandwidth floor",
            entry.get("of_copy_bandwidth"), lambda v, lim=lim: v >= lim, "{:.0%} of copy bandwidth")  # fmt: skip
    if vision:
        for alias, fam in vision.get("families", {}).items():
            fast = fam["variants"].get("fast+compile") or {}
            eager = fam["variants"].get("fast") or {}
            best = max((v for v in (fast, eager) if v.get("status") == "ok"), key=lambda v: v.get("speedup", 0),
                       default={})  # fmt: skip
            add(f"{alias} vision tower >= {VISION_SPEEDUP_MIN}x transformers' at {vision['frames']} frames",
                best.get("speedup"), lambda v: v >= VISION_SPEEDUP_MIN)  # fmt: skip
    for f in [r["frames"] for r in result["results"]]:
        r = _row(result, f) or {}
        vals = [lookup(r, "ratios", k) for k in ("decode_batch_1", "decode_equal_batch", "decode_max_batch")]
        shown = " / ".join("-" if v is None else f"{v:.1f}x" for v in vals)
        out.append((f"decode LinMU/{who} at batch 1 / {result['config']['equal_batch']} / largest, {f} frames",
                    shown, "reported"))  # fmt: skip
    per_seq = {r["frames"]: lookup(r, "linmu", "decode", "batch_1", "prefill_cache_storage_bytes")
               for r in result["results"]}  # fmt: skip
    values = {v for v in per_seq.values() if v is not None}
    out.append(("LinMU decode memory per sequence independent of frames (prefill cache storage)",
                ", ".join(f"{f}: {v / 2**20:.1f} MiB" for f, v in per_seq.items() if v is not None) or "not measured",
                "-" if not values else ("met" if len(values) == 1 else "MISSED")))  # fmt: skip
    out.append(("TTFT crossover (frames)", result.get("crossover", {}).get("text", "-"), "reported"))
    return out


def markdown(result: dict, vision: dict | None = None) -> str:
    """One markdown table row per frame count, then the targets: what docs/benchmarks.md quotes."""
    eq = result["config"]["equal_batch"]
    lines = [
        f"| frames | LM tokens | TTFT {teacher_label(result)} (s) | TTFT LinMU (s) | floor (s) | teacher/LinMU | LinMU/floor | "
        f"decode b=1 T / L (tok/s) | b={eq} T / L | largest batch T (b) / L (b) | x at b=1 / {eq} / largest | "
        f"teacher_hf b=1 / b={eq} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def v(x, spec):
        return format(x, spec) if isinstance(x, int | float) else "-"

    def d(r, m, key):
        e = lookup(r, m, "decode", key) or {}
        return v(e.get("tokens_per_s"), ".0f") if e.get("status") == "ok" else e.get("status", "-")

    def mx(r, m):
        e = lookup(r, m, "decode", "max_batch") or {}
        return (
            f"{v(e.get('tokens_per_s'), '.0f')} ({e['batch']})"
            if e.get("status") == "ok"
            else e.get("status", "-")
        )

    for r in result["results"]:
        if r.get("status") == "OOM":
            lines.append(f"| {r['frames']} | OOM |" + " |" * 10)
            continue
        ra = r["ratios"]
        x = " / ".join(
            v(ra.get(k), ".1f") + "x" for k in ("decode_batch_1", "decode_equal_batch", "decode_max_batch")
        )
        lines.append(
            f"| {r['frames']} | {r['lm_tokens']:,} | {v(lookup(r, 'teacher', 'ttft', 'total_s'), '.2f')} | "
            f"{v(lookup(r, 'linmu', 'ttft', 'total_s'), '.2f')} | {v(lookup(r, 'linmu', 'floor', 'total_s'), '.2f')} | "
            f"{v(ra.get('ttft'), '.2f')}x | {v(r['linmu']['ttft_over_floor'], '.2f')}x | "
            f"{d(r, 'teacher', 'batch_1')} / {d(r, 'linmu', 'batch_1')} | "
            f"{d(r, 'teacher', 'equal_batch')} / {d(r, 'linmu', 'equal_batch')} | "
            f"{mx(r, 'teacher')} / {mx(r, 'linmu')} | {x} | "
            f"{d(r, 'teacher_hf', 'batch_1')} / {d(r, 'teacher_hf', 'equal_batch')} |"
        )
    lines += ["", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in check_targets(result, vision)]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print the tables and the targets of a bench JSON; write the plot and the markdown when asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--vision", type=Path, default=None, help="vision.json of benchmarks/vision_profile.py")
    args = ap.parse_args()
    result = json.loads(args.json.read_text())
    vision = json.loads(args.vision.read_text()) if args.vision and args.vision.is_file() else None
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    env = result["environment"]
    console.print(f"{result['config']['source']} on {env.get('gpu', env['device'])}: torch {env['torch']}, "
                  f"transformers {env['transformers']}, kernels {env.get('kernels')}", highlight=False)  # fmt: skip
    for table in tables(result):
        console.print(table)
    targets = Table(title="H200 targets (against the served teacher)", title_justify="left")
    for col in ("target", "measured", "verdict"):
        targets.add_column(col)
    for row in check_targets(result, vision):
        targets.add_row(*row)
    console.print(targets)
    if args.plot:
        save_plot(result, args.plot)
    if args.markdown:
        args.markdown.write_text(markdown(result, vision))


if __name__ == "__main__":
    main()

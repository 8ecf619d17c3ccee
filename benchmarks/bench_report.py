"""Summarize a `linmu bench --json` result: tables, the plot, a markdown table and the issue-5 targets.

    python benchmarks/bench_report.py bench.json --plot bench.png --markdown bench.md

Works on a partial JSON too (the bench rewrites it after every frame count), so a run cut short by a timeout
still gets its tables and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linmu_cli.bench import _get, save_plot, tables  # noqa: E402

# Issue 5 targets (one H200, Qwen2-VL-7B shape, bf16, 448x448 frames).
TTFT_OVER_FLOOR_MAX = {512: 1.15}
TTFT_RATIO_MIN = {512: 1.5, 1024: 1.9, 2048: 2.7}
DECODE_MAX_BATCH_RATIO_MIN = {512: 10.0}
DECODE_EQUAL_BATCH_RATIO_MIN = {512: 3.0}


def _row(result: dict, frames: int) -> dict | None:
    return next((r for r in result["results"] if r["frames"] == frames), None)


def check_targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows."""
    out = []

    def add(name, value, ok, fmt="{:.2f}x"):
        shown = "not measured" if value is None else fmt.format(value)
        out.append((name, shown, "-" if value is None else ("met" if ok(value) else "MISSED")))

    for f, lim in TTFT_OVER_FLOOR_MAX.items():
        add(f"LinMU TTFT <= {lim}x its floor at {f} frames", _get(_row(result, f) or {}, "linmu", "ttft_over_floor"),
            lambda v, lim=lim: v <= lim)  # fmt: skip
    for f, lim in TTFT_RATIO_MIN.items():
        add(f"TTFT teacher/LinMU >= {lim}x at {f} frames", _get(_row(result, f) or {}, "ratios", "ttft"),
            lambda v, lim=lim: v >= lim)  # fmt: skip
    for f, lim in DECODE_MAX_BATCH_RATIO_MIN.items():
        add(f"decode LinMU/teacher >= {lim}x at each one's largest batch, {f} frames",
            _get(_row(result, f) or {}, "ratios", "decode_max_batch"), lambda v, lim=lim: v >= lim)  # fmt: skip
    for f, lim in DECODE_EQUAL_BATCH_RATIO_MIN.items():
        eq = result["config"]["equal_batch"]
        add(f"decode LinMU/teacher >= {lim}x at equal batch {eq}, {f} frames",
            _get(_row(result, f) or {}, "ratios", "decode_equal_batch"), lambda v, lim=lim: v >= lim)  # fmt: skip
    # what the prefill's LinMUCache really keeps alive (storage bytes), per frame count
    per_seq = {r["frames"]: _get(r, "linmu", "decode", "batch_1", "prefill_cache_storage_bytes")
               for r in result["results"]}  # fmt: skip
    values = {v for v in per_seq.values() if v is not None}
    out.append(("LinMU decode memory per sequence independent of frames (prefill cache storage)",
                ", ".join(f"{f}: {v / 2**20:.1f} MiB" for f, v in per_seq.items() if v is not None) or "not measured",
                "-" if not values else ("met" if len(values) == 1 else "MISSED")))  # fmt: skip
    out.append(("TTFT crossover (frames)", result.get("crossover", {}).get("text", "-"), "reported"))
    return out


def markdown(result: dict) -> str:
    eq = result["config"]["equal_batch"]
    lines = [
        f"| frames | LM tokens | TTFT teacher (s) | TTFT LinMU (s) | floor (s) | teacher/LinMU | LinMU/floor | "
        f"decode b=1 T / L (tok/s) | b={eq} T / L | largest batch T (b) / L (b) | x at largest |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def v(x, spec):
        return format(x, spec) if isinstance(x, int | float) else "-"

    def d(r, m, key):
        e = _get(r, m, "decode", key) or {}
        return v(e.get("tokens_per_s"), ".0f") if e.get("status") == "ok" else e.get("status", "-")

    def mx(r, m):
        e = _get(r, m, "decode", "max_batch") or {}
        return (
            f"{v(e.get('tokens_per_s'), '.0f')} ({e['batch']})"
            if e.get("status") == "ok"
            else e.get("status", "-")
        )

    for r in result["results"]:
        lines.append(
            f"| {r['frames']} | {r['lm_tokens']:,} | {v(_get(r, 'teacher', 'ttft', 'total_s'), '.2f')} | "
            f"{v(_get(r, 'linmu', 'ttft', 'total_s'), '.2f')} | {v(_get(r, 'linmu', 'floor', 'total_s'), '.2f')} | "
            f"{v(r['ratios']['ttft'], '.2f')}x | {v(r['linmu']['ttft_over_floor'], '.2f')}x | "
            f"{d(r, 'teacher', 'batch_1')} / {d(r, 'linmu', 'batch_1')} | "
            f"{d(r, 'teacher', 'equal_batch')} / {d(r, 'linmu', 'equal_batch')} | "
            f"{mx(r, 'teacher')} / {mx(r, 'linmu')} | {v(r['ratios']['decode_max_batch'], '.1f')}x |"
        )
    lines += ["", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in check_targets(result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    result = json.loads(args.json.read_text())
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    env = result["environment"]
    console.print(f"{result['config']['source']} on {env.get('gpu', env['device'])}: torch {env['torch']}, "
                  f"transformers {env['transformers']}, kernels {env.get('kernels')}", highlight=False)  # fmt: skip
    for table in tables(result):
        console.print(table)
    targets = Table(title="issue 5 targets", title_justify="left")
    for col in ("target", "measured", "verdict"):
        targets.add_column(col)
    for row in check_targets(result):
        targets.add_row(*row)
    console.print(targets)
    if args.plot:
        save_plot(result, args.plot)
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()

"""What a bench run reports: the terminal tables, the figure, the JSON file and the notes it carries.

Everything here reads the result dict (schema `linmu-bench/2`, docs/benchmarks.md), so
`benchmarks/bench_report.py` redraws the tables and the plot from a saved JSON, a partial one included.
Files of schema `linmu-bench/1` were measured against transformers' eager decode and are labelled so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.table import Table

SCHEMA = "linmu-bench/2"

NOTES = [
    "TTFT = vision tower + LM prefill (to the first token's logits) + the first decode step; median of the "
    "repeats. The floor is LinMU with its scans and window attention skipped (projections, gates, norms, MLPs "
    "and the vision tower still run).",
    "Decode: teacher = the served teacher (static KV cache pre-allocated to prompt + new tokens, q_len=1 decode "
    "attention chosen by timing, one CUDA graph on CUDA: linmu_cli.teacher_decode); teacher_hf = transformers "
    "forward + DynamicCache (what generate() runs); LinMU = fast_decode over its LinMUCache (one CUDA graph on "
    "CUDA: generate(cache_implementation='static')); 'batch_1_hf' = the same step and cache through "
    "transformers' forward, eager (generate()'s default). cache_fill 'random' = caches of the real shapes filled "
    "with random values instead of prefilling every sequence (decode cost does not depend on the values).",
    "Roofline: TTFT achieved_tflops = analytic matrix FLOPs (linears, patch embedding, softmax attention; not "
    "LinMU's scans) / TTFT, of_matmul_peak against the measured matmul rate; decode achieved_bytes_per_s = "
    "bytes a step must move (decoder weights + LM head + KV cache read, or LinMU's state read and written) / "
    "step time, of_copy_bandwidth against the measured copy bandwidth (environment.ceilings).",
    "Vision: both models run the same vision tower code (environment.kernels.vision). Before the runs of each "
    "frame count the tower runs once untimed (vision_warmup_s), so that shape's one-time costs land in neither "
    "model's TTFT (from 512 frames on each model runs once, the teacher first).",
    "Memory figures are bytes above what was allocated before the measurement (weights excluded).",
]


def crossover(results: list[dict]) -> dict:
    """Smallest frame count where LinMU's TTFT drops below the teacher's (log-frames interpolation)."""
    pts = [(r["frames"], r["ratios"]["ttft"]) for r in results if r["ratios"].get("ttft")]
    if not pts:
        return {"frames": None, "text": "not measured"}
    for i, (f, ratio) in enumerate(pts):
        if ratio >= 1.0:
            if i == 0:
                return {"frames": None, "bracket": [None, f], "text": f"LinMU is faster at every measured count "
                        f"(crossover at or below {f} frames)"}  # fmt: skip
            f0, r0 = pts[i - 1]
            x = math.log2(f0) + (1.0 - r0) / (ratio - r0) * (math.log2(f) - math.log2(f0))
            value = round(2**x)
            return {"frames": value, "bracket": [f0, f],
                    "text": f"~{value} frames (TTFT ratio {r0:.2f} at {f0}, {ratio:.2f} at {f})"}  # fmt: skip
    return {"frames": None, "bracket": [pts[-1][0], None], "text": f"not reached up to {pts[-1][0]} frames"}


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a temporary file, then a rename): a run killed mid-write leaves the previous JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def lookup(d: dict, *keys: str, default: Any = None) -> Any:
    """`d[k0][k1]...`, or `default` where a key or a level is missing (partial and failed entries)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


PLOT_CURVES = {
    "ttft": [("teacher (served)", ("teacher", "ttft", "total_s"), "o", "-", "tab:blue"),
             ("LinMU", ("linmu", "ttft", "total_s"), "s", "-", "tab:orange"),
             ("LinMU floor (no scans / window attention)", ("linmu", "floor", "total_s"), "^", "--", "tab:gray")],
    "decode": [("teacher (served), largest batch", ("teacher", "decode", "max_batch", "tokens_per_s"), "o", "-",
                "tab:blue"),
               ("teacher (served), batch {eq}", ("teacher", "decode", "equal_batch", "tokens_per_s"), "o", "--",
                "tab:blue"),
               ("teacher (served), batch 1", ("teacher", "decode", "batch_1", "tokens_per_s"), "o", ":", "tab:blue"),
               ("LinMU, largest batch", ("linmu", "decode", "max_batch", "tokens_per_s"), "s", "-", "tab:orange"),
               ("LinMU, batch {eq}", ("linmu", "decode", "equal_batch", "tokens_per_s"), "s", "--", "tab:orange"),
               ("LinMU, batch 1", ("linmu", "decode", "batch_1", "tokens_per_s"), "s", ":", "tab:orange"),
               ("teacher (transformers generate), batch {eq}",
                ("teacher_hf", "decode", "equal_batch", "tokens_per_s"), "x", ":", "tab:gray")],
}  # fmt: skip


def make_figure(result: dict) -> Figure:
    """The bench figure: TTFT (teacher, LinMU, floor; crossover marked) and decode tokens/s at batch 1, the
    equal batch and the largest batch for both, against frames. Every curve has its own marker / line style,
    every y axis readable tick labels; a single frame count gets labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, NullLocator

    rows = [r for r in result["results"] if r.get("status") != "OOM"]
    eq = result["config"]["equal_batch"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.4))
    frames = sorted({r["frames"] for r in rows})
    single = len(frames) == 1
    for ax, key in ((ax1, "ttft"), (ax2, "decode")):
        for label, keys, marker, style, color in PLOT_CURVES[key]:
            pts = [(r["frames"], lookup(r, *keys)) for r in rows]
            pts = [(f, v) for f, v in pts if isinstance(v, int | float)]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            if result.get("schema") == "linmu-bench/1":  # measured against transformers' eager decode
                label = label.replace("(served)", "(eager)")
            ax.plot(
                x, y, marker=marker, linestyle=style, color=color, label=label.format(eq=eq), markersize=6
            )
            if single:
                text = f"{y[0]:,.0f}" if y[0] >= 100 else f"{y[0]:.3g}"
                ax.annotate(text, (x[0], y[0]), textcoords="offset points", xytext=(8, 0), fontsize=7, va="center",
                            color=color)  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        if single:
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.set_xlim(frames[0] * 0.8, frames[0] * 1.3)
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.25)
    cross = result.get("crossover", {})
    if cross.get("frames"):
        ax1.axvline(cross["frames"], color="tab:green", linestyle="-.", linewidth=1)
        ax1.text(cross["frames"], ax1.get_ylim()[1], f" TTFT crossover ~{cross['frames']} frames", fontsize=7,
                 color="tab:green", va="top")  # fmt: skip
    ax1.set(xlabel="frames", ylabel="TTFT (s)", title="Time to first token (lower is better)")
    ax2.set(xlabel="frames", ylabel="tokens / s", title="Decode throughput (higher is better)")
    for ax in (ax1, ax2):
        if ax.get_lines():
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        else:
            ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", color="tab:gray")
    env = result["environment"]
    fig.suptitle(f"{result['config']['source']} - {env.get('gpu', env['device'])}, {env['dtype']}, "
                 f"{result['config']['resolution']}px frames; vision: "
                 f"{'linmu fast tower' if result['config'].get('fast_vision') else 'transformers'} (both)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


def save_plot(result: dict, path: Path) -> None:
    """Write `make_figure(result)` as a PNG."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise LinmuError("--plot needs matplotlib: pip install 'linmu[bench]'") from None
    fig = make_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, spec=".3f", unit="") -> str:
    return f"{v:{spec}}{unit}" if isinstance(v, int | float) else "-"


def _cell(entry: dict | None, key: str, spec: str) -> str:
    if not entry:
        return "-"
    if entry.get("status") != "ok":
        return str(entry.get("status"))
    return _fmt(entry.get(key), spec)


def human_bytes(v: float | None) -> str:
    """GiB from 1 GiB on, MiB below; "-" for a missing value."""
    if not isinstance(v, int | float):
        return "-"
    return f"{v / 2**30:.1f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"


def _per_seq(decode: dict):
    return lookup(decode, "equal_batch", "cache_bytes_per_seq") or lookup(
        decode, "batch_1", "cache_bytes_per_seq"
    )


def tables(result: dict) -> list[Table]:
    """rich Tables for the terminal, each narrow enough for 80 columns: TTFT, its split and roofline, decode
    against the served teacher, largest batches, the transformers teacher, memory (all numbers are in the JSON)."""
    from rich.table import Table

    def table(title: str, cols: list[str]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right", no_wrap=True)
        return t

    def mx(e: dict | None) -> str:
        return (
            f"{_cell(e, 'tokens_per_s', '.0f')} ({e['batch']})"
            if e and e.get("status") == "ok"
            else _cell(e, "", "")
        )

    def pct(e: dict | None, key: str) -> str:
        return _fmt(100 * e[key], ".0f", "%") if e and e.get("status") == "ok" and key in e else "-"

    eq = result["config"]["equal_batch"]
    t1 = table("TTFT in s (vision + prefill + first step)", ["frames", "tokens", "teacher", "LinMU", "floor", "T/L",
                                                              "L/floor"])  # fmt: skip
    t2 = table("TTFT split (s)", ["frames", "T vision", "L vision", "T prefill", "L prefill"])
    t2b = table("TTFT matrix rate: TFLOP/s (of the measured peak)", ["frames", "teacher", "LinMU", "floor"])
    who = (
        "the eager teacher (linmu-bench/1)"
        if result.get("schema") == "linmu-bench/1"
        else "the served teacher"
    )
    t3 = table(f"Decode tok/s: LinMU vs {who}", ["frames", "T b=1", "L b=1", "x", f"T b={eq}", f"L b={eq}",
                                                              "x"])  # fmt: skip
    t4 = table(
        "Decode at the largest batch (b) and of copy bandwidth",
        ["frames", "T (b)", "L (b)", "x", "T BW", "L BW"],
    )
    t5 = table("transformers teacher (generate() path) tok/s", ["frames", "HF b=1", f"HF b={eq}", "L/HF b=1",
                                                                  f"L/HF b={eq}", "served/HF"])  # fmt: skip
    t6 = table("Memory (above weights)", ["frames", "T prefill", "L prefill", "T dec b=1", "L dec b=1", "T /seq",
                                          "L /seq"])  # fmt: skip
    for r in result["results"]:
        f = str(r["frames"])
        if r.get("status") == "OOM":
            for t in (t1, t2, t2b, t3, t4, t5, t6):
                t.add_row(f, *["OOM"] * (len(t.columns) - 1))
            continue
        t, lm, fl, ra = r["teacher"]["ttft"], r["linmu"]["ttft"], r["linmu"]["floor"], r["ratios"]
        td, ld, hd = (
            r["teacher"]["decode"],
            r["linmu"]["decode"],
            lookup(r, "teacher_hf", "decode", default={}),
        )
        t1.add_row(f, f"{r['lm_tokens']:,}", _cell(t, "total_s", ".3f"), _cell(lm, "total_s", ".3f"),
                   _cell(fl, "total_s", ".3f"), _fmt(ra.get("ttft"), ".2f", "x"),
                   _fmt(r["linmu"]["ttft_over_floor"], ".2f", "x"))  # fmt: skip
        rate = lambda e: f"{_cell(e, 'achieved_tflops', '.3g')} ({pct(e, 'of_matmul_peak')})"  # noqa: E731
        t2.add_row(f, _cell(t, "vision_s", ".3f"), _cell(lm, "vision_s", ".3f"), _cell(t, "prefill_s", ".3f"),
                   _cell(lm, "prefill_s", ".3f"))  # fmt: skip
        t2b.add_row(f, rate(t), rate(lm), rate(fl))
        t3.add_row(f, _cell(td.get("batch_1"), "tokens_per_s", ".1f"), _cell(ld.get("batch_1"), "tokens_per_s", ".1f"),
                   _fmt(ra.get("decode_batch_1"), ".1f", "x"), _cell(td.get("equal_batch"), "tokens_per_s", ".0f"),
                   _cell(ld.get("equal_batch"), "tokens_per_s", ".0f"), _fmt(ra.get("decode_equal_batch"), ".1f", "x"))  # fmt: skip
        t4.add_row(f, mx(td.get("max_batch")), mx(ld.get("max_batch")), _fmt(ra.get("decode_max_batch"), ".1f", "x"),
                   pct(td.get("max_batch"), "of_copy_bandwidth"), pct(ld.get("max_batch"), "of_copy_bandwidth"))  # fmt: skip
        t5.add_row(f, _cell(hd.get("batch_1"), "tokens_per_s", ".1f"), _cell(hd.get("equal_batch"), "tokens_per_s", ".0f"),
                   _fmt(ra.get("decode_batch_1_vs_teacher_hf"), ".1f", "x"),
                   _fmt(ra.get("decode_equal_batch_vs_teacher_hf"), ".1f", "x"),
                   _fmt(ra.get("teacher_served_over_hf_batch_1"), ".1f", "x"))  # fmt: skip
        t6.add_row(f, human_bytes(lookup(t, "prefill_peak_bytes")), human_bytes(lookup(lm, "prefill_peak_bytes")),
                   human_bytes(lookup(td, "batch_1", "peak_bytes")), human_bytes(lookup(ld, "batch_1", "peak_bytes")),
                   human_bytes(_per_seq(td)), human_bytes(_per_seq(ld)))  # fmt: skip
    return [t1, t2, t2b, t3, t4, t5, t6]


__all__ = [
    "NOTES",
    "SCHEMA",
    "crossover",
    "human_bytes",
    "lookup",
    "make_figure",
    "save_plot",
    "tables",
    "write_json",
]

"""The `linmu` command: thin typer wrappers over the Python API (`linmu_cli.convert`, ...)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from linmu_cli.errors import LinmuError

app = typer.Typer(
    name="linmu",
    help="Turn a pretrained vision-language model into a linear-complexity one (LinMU / M-MATE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Bad input ends with one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LinmuError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def mate_overrides(
    window: str | None, text_window: int | None, scan_orders: str | None, fusion_init: float | None,
    fusion: str | None, flex: bool | None, swin: bool | None, bidirectional: bool | None, ssd_backend: str | None,
    sets: list[str] | None,
) -> dict:  # fmt: skip
    """Collect the M-MATE fields given on the command line into a dict for MateConfig.from_dict."""
    fields: dict = {}
    if window is not None:
        try:
            fields["vision_window"] = [int(v) for v in window.split(",")]
        except ValueError:
            raise LinmuError(f"--window {window!r}: give three integers like 2,8,8") from None
    if scan_orders is not None:
        fields["scan_orders"] = [s.strip() for s in scan_orders.split(",") if s.strip()]
    named = {"text_window": text_window, "fusion_init": fusion_init, "fusion": fusion, "use_flex": flex,
             "use_swin": swin, "bidirectional": bidirectional, "ssd_backend": ssd_backend}  # fmt: skip
    fields.update({k: v for k, v in named.items() if v is not None})
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise LinmuError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set dt_max=0.05")
        fields[key.strip()] = _parse_value(value)
    return fields


@app.command()
@user_errors
def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="Local checkpoint dir, hub id in the HF cache, or alias "
            "(qwen2-vl-7b, qwen2.5-vl-7b, tiny-qwen2-vl, ...)."
        ),
    ],  # fmt: skip
    out: Annotated[Path, typer.Argument(help="Output directory (written atomically).")],
    window: Annotated[
        str | None, typer.Option(help="Local-Swin 3D vision window wt,wh,ww [default 2,8,8].")
    ] = None,
    text_window: Annotated[
        int | None, typer.Option(help="Keys a text token attends to [default 512].")
    ] = None,
    scan_orders: Annotated[
        str | None, typer.Option(help="Rotary Major-Scan cycle [default thw,twh,hwt].")
    ] = None,
    fusion_init: Annotated[
        float | None, typer.Option(help="Initial Flex-MA weight in (0,1) [default 0.5].")
    ] = None,
    fusion: Annotated[str | None, typer.Option(help="Fusion weight per 'token' or per 'head'.")] = None,
    flex: Annotated[bool | None, typer.Option("--flex/--no-flex", help="Keep the Flex-MA branch.")] = None,
    swin: Annotated[bool | None, typer.Option("--swin/--no-swin", help="Keep the Local-Swin branch.")] = None,
    bidirectional: Annotated[
        bool | None,
        typer.Option("--bidirectional/--no-bidirectional", help="Backward scan in visual segments."),
    ] = None,
    ssd_backend: Annotated[str | None, typer.Option(help="auto | torch | fla | mamba.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any other M-MATE field, FIELD=VALUE (repeatable).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (checkpoint's) | float32 | bfloat16 | float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Where to convert: cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists and is not empty.")] = False,
    save_teacher: Annotated[
        Path | None, typer.Option(help="Also write the teacher that was converted.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the new parameters (and tiny teachers).")] = 0,
) -> None:
    """Swap every decoder self-attention layer for an M-MATE block initialized from it.

    The result loads with transformers' AutoModelForImageTextToText after `import linmu_cli`. Examples:

      linmu convert tiny-qwen2-vl out/ --save-teacher teacher/

      linmu convert /ckpt/Qwen2-VL-7B-Instruct out/ --dtype bfloat16 --window 2,8,8 --text-window 1024
    """
    from linmu_cli.config import MateConfig
    from linmu_cli.convert import convert as run_convert

    fields = mate_overrides(window, text_window, scan_orders, fusion_init, fusion, flex, swin, bidirectional,
                            ssd_backend, set_)  # fmt: skip
    mate = MateConfig.from_dict(fields)
    with console.status(f"converting {source} ..."):
        report = run_convert(source, out, mate=mate, dtype=dtype, device=device, force=force,
                             save_teacher=save_teacher, seed=seed)  # fmt: skip
    table = Table(title=f"linmu convert: {source} -> {report.out}", show_header=False)
    table.add_row("family", report.family)
    table.add_row("layers converted", f"{report.layers} self-attention -> M-MATE")
    table.add_row("parameters", f"{report.params_teacher:,} -> {report.params_student:,}")
    table.add_row("Flex-MA kernel", f"{report.ssd_backend} (on {device})")
    m = report.mate
    table.add_row(
        "branches",
        ", ".join(b for b, on in (("Flex-MA", m["use_flex"]), ("Local-Swin", m["use_swin"])) if on),
    )
    table.add_row("windows", f"vision {tuple(m['vision_window'])}, text {m['text_window']}")
    table.add_row("scan orders", ", ".join(m["scan_orders"]))
    if report.teacher_out is not None:
        table.add_row("teacher written to", str(report.teacher_out))
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)


def _not_yet(name: str, issue: str) -> None:
    err_console.print(f"[yellow]linmu {name} is not implemented yet[/] ({issue}).")
    raise typer.Exit(2)


@app.command()
@user_errors
def distill(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/tiny.yaml.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Overrides key.sub=value, e.g. stages.stage1.steps=50 output=runs/x."),
    ] = None,
    stage: Annotated[str | None, typer.Option(help="Run only this stage (stage1, stage2 or stage3).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last step checkpoint.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Delete OUTPUT and start over.")] = False,
) -> None:
    """Three-stage distillation of a LinMU student from its frozen teacher (DESIGN.md §1, §7).

    Stage 1 trains Flex-MA alone and stage 2 adds Local-Swin (both teacher-forced, layer by layer); stage 3
    runs end to end with LoRA on the decoder MLPs. Each stage writes OUTPUT/<stage>/ (a loadable checkpoint
    with the recipe it ran), step checkpoints under OUTPUT/checkpoints/, OUTPUT/metrics.jsonl and
    OUTPUT/report.json; the run ends with OUTPUT/final/ (LoRA merged). Examples:

      linmu distill recipes/tiny.yaml

      linmu distill recipes/qwen2-vl-7b.yaml teacher=/ckpt/Qwen2-VL-7B-Instruct data.manifest=/data/train.jsonl

      linmu distill recipes/tiny.yaml --resume                         # after a crash

      accelerate launch --num_processes 2 -m linmu_cli distill recipes/tiny.yaml   # data parallel
    """
    from transformers.utils import logging as hf_logging

    from linmu_cli.distill import distill as run_distill

    hf_logging.disable_progress_bar()
    results = run_distill(recipe, overrides or [], stage=stage, resume=resume, force=force, console=console)
    for name, res in results.items():
        if res.get("after"):
            console.print(f"{name}: mean rel. hidden error {res['before']['mean_rel_error']:.4f} -> "
                          f"{res['after']['mean_rel_error']:.4f}, logit KL {res['before']['logit_kl']:.4f} -> "
                          f"{res['after']['logit_kl']:.4f}")  # fmt: skip


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_(ctx: typer.Context) -> None:
    """Scores through lmms-eval, teacher beside student (not yet: tracked in the eval issue)."""
    _not_yet("eval", "lmms-eval integration lands with the `linmu eval` issue")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """TTFT, decode throughput and memory, teacher vs LinMU (not yet: tracked in the bench issue)."""
    _not_yet("bench", "benchmarks land with the `linmu bench` issue")


@app.command()
@user_errors
def doctor() -> None:
    """Versions, CUDA, and which Flex-MA kernel paths import and run here."""
    from linmu_cli.doctor import collect

    info = collect()
    table = Table(title="linmu doctor", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]

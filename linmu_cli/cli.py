"""The `linmu` command: thin typer wrappers over the Python API (`linmu_cli.convert`, ...)."""

from __future__ import annotations

import errno
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from linmu_cli.errors import LinmuError

# Start-up stays light: torch, transformers and lmms-eval are imported inside the command bodies, so `--help`,
# `--version` and argument errors answer in well under a second (tests/test_cli_errors.py::test_help_and_version_answer_without_torch).
app = typer.Typer(
    name="linmu",
    help="Turn a pretrained vision-language model into a linear-complexity one (LinMU / M-MATE).\n\n"
    "On CPU, torch gets one thread per core that is not busy when the command starts; LINMU_NUM_THREADS (or "
    "OMP_NUM_THREADS) sets another count, `linmu doctor` shows the choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# Errors of the machine rather than of linmu: reported as one line with what to do, not a traceback.
_DISK_ERRNOS = {errno.ENOSPC: "free some space or write somewhere else",
                errno.EDQUOT: "free some space or write somewhere else",
                errno.EROFS: "choose a writable place", errno.EACCES: "choose a place you may write to",
                errno.EPERM: "choose a place you may write to"}  # fmt: skip


def error_line(message: str) -> None:
    """The one red line every bad input ends with."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LinmuError as exc:
            error_line(_escape(str(exc)))
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            error_line(_escape(f"cannot write{where}: {exc.strerror or exc}; {_DISK_ERRNOS[exc.errno]}"))
            raise typer.Exit(2) from None

    return wrapper


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def cpu_threads() -> tuple[int, str]:
    """(threads, why) for torch's CPU ops: the cores this process may use that nothing else runs on.

    torch's default (one thread per core) thrashes on a shared machine (one distillation step ran 4.7x
    slower on 2 busy cores); $LINMU_NUM_THREADS overrides, and an OMP_NUM_THREADS already set is left alone.
    """
    explicit = os.environ.get("LINMU_NUM_THREADS", "").strip()
    if explicit:
        try:
            n = int(explicit)
        except ValueError:
            raise LinmuError(f"LINMU_NUM_THREADS={explicit!r}: give a positive integer") from None
        if n < 1:
            raise LinmuError(f"LINMU_NUM_THREADS={explicit!r}: give a positive integer")
        return n, "LINMU_NUM_THREADS"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # cgroup v2 CPU quota (containers): "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            usable = min(usable, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    try:  # tasks running right now (4th field "running/total"), this process included
        busy = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        busy = 0
    n = max(1, usable - max(0, busy))
    return n, f"{usable} usable core(s), {max(0, busy)} busy at start"


_THREADS: tuple[int, str] | None = None  # what apply_cpu_threads chose, for `linmu doctor`


def apply_cpu_threads() -> tuple[int, str]:
    """Set the thread count before torch starts its pools (env for this process and its children)."""
    global _THREADS
    n, why = _THREADS = cpu_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    if "torch" in sys.modules:  # in-process callers (tests, notebooks) that imported torch already
        import torch

        if torch.get_num_threads() != n and why == "LINMU_NUM_THREADS":
            torch.set_num_threads(n)
    return n, why


def _version_callback(value: bool) -> None:
    if value:
        from linmu_cli import __version__

        console.print(f"linmu {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Runs before every command: the CPU thread policy (cheap: environment only, torch is not imported)."""
    try:
        apply_cpu_threads()
    except LinmuError as exc:
        error_line(_escape(str(exc)))
        raise typer.Exit(2) from None


def quick_device_check(device: str) -> None:
    """`--device banana` answers before torch is imported (whether CUDA is there is checked later, with torch)."""
    import re

    if not re.fullmatch(r"(cpu|mps|(cuda|xpu)(:\d+)?)", device.strip()):
        raise LinmuError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def mate_overrides(
    window: str | None, text_window: int | None, scan_orders: str | None, fusion_init: float | None,
    fusion: str | None, flex: bool | None, swin: bool | None, bidirectional: bool | None, ssd_backend: str | None,
    sets: list[str] | None,
) -> dict:  # fmt: skip
    """Collect the M-MATE fields given on the command line into a dict for MateConfig.from_dict."""
    from linmu_cli.config import MateTypeError, check_types
    from linmu_cli.overrides import parse_overrides

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
    form = {"flag": "--set", "expected": "FIELD=VALUE, e.g. --set dt_max=0.05"}
    fields.update(parse_overrides(sets or [], **form))
    raw = parse_overrides(sets or [], **form, typed=str)  # the text as given, for the error
    try:
        check_types(fields)  # a wrong type is named before MateConfig compares it
    except MateTypeError as exc:
        given = raw.get(exc.name, repr(exc.value))
        raise LinmuError(f"--set {exc.name}={given}: {exc.name} takes {exc.takes}, "
                         f"e.g. --set {exc.name}={exc.example}") from None  # fmt: skip
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
        str | None, typer.Option(help="Local-Swin 3D vision window wt,wh,ww (default 2,8,8).")
    ] = None,
    text_window: Annotated[
        int | None, typer.Option(help="Keys a text token attends to (default 512).")
    ] = None,
    scan_orders: Annotated[
        str | None, typer.Option(help="Rotary Major-Scan cycle (default thw,twh,hwt).")
    ] = None,
    fusion_init: Annotated[
        float | None, typer.Option(help="Initial Flex-MA weight in (0,1) (default 0.5).")
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
    fields = mate_overrides(window, text_window, scan_orders, fusion_init, fusion, flex, swin, bidirectional,
                            ssd_backend, set_)  # fmt: skip
    quick_device_check(device)
    from transformers.utils import logging as hf_logging

    from linmu_cli.config import MateConfig
    from linmu_cli.conversion import convert as run_convert

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars: the status line says what happens
    hf_logging.set_verbosity_error()
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


@app.command()
@user_errors
def distill(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/tiny.yaml.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Overrides key.sub=value, e.g. stages.stage1.steps=50 output=runs/x."),
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="Run only this stage (stage1, stage2 or stage3; stage2/3 need the previous one)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue an interrupted run from its last intact step checkpoint."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Replace OUTPUT's run (with --stage: that stage and what follows), after checks."),
    ] = False,
) -> None:
    """Three-stage distillation of a LinMU student from its frozen teacher (docs/design.md §1, §7).

    Stage 1 trains Flex-MA alone and stage 2 adds Local-Swin (both teacher-forced, layer by layer); stage 3
    runs end to end with LoRA on the decoder MLPs. Each stage writes OUTPUT/<stage>/ (a loadable checkpoint
    with the recipe it ran), step checkpoints under OUTPUT/checkpoints/, OUTPUT/metrics.jsonl and
    OUTPUT/report.json; the run ends with OUTPUT/final/ (LoRA merged). Examples:

      linmu distill recipes/tiny.yaml

      linmu distill recipes/qwen2-vl-7b.yaml teacher=/ckpt/Qwen2-VL-7B-Instruct data.manifest=/data/train.jsonl

      linmu distill recipes/tiny.yaml --resume                         # after a crash

      linmu distill recipes/tiny.yaml --stage stage2 --force           # retrain stage 2 (removes stage3, final)

      accelerate launch --num_processes 2 -m linmu_cli distill recipes/qwen2-vl-7b.yaml   # data parallel, GPUs

      torchrun --nproc_per_node 2 -m linmu_cli distill recipes/tiny.yaml   # data parallel, CPU too

      linmu distill recipes/qwen2-vl-7b.yaml teacher=random:qwen2-vl-7b data.source=synthetic data.size=448

    (the last: the real 7B shape with random weights, for speed and scaling tests without a checkpoint)
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers.utils import logging as hf_logging

    from linmu_cli.distillation import distill as run_distill

    hf_logging.disable_progress_bar()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=console, disable=os.environ.get("RANK", "0") != "0") as bars:
        tasks: dict[str, Any] = {}

        def draw(p) -> None:  # a trainer.StepProgress, rank 0 only
            if p.stage not in tasks:
                tasks[p.stage] = bars.add_task(p.stage, total=p.steps, completed=p.step, info="")
            info = "" if p.loss is None else f"loss {p.loss:.4f}  {p.tokens_per_s:,.0f} tok/s"
            bars.update(tasks[p.stage], total=p.steps, completed=p.step, info=info)

        results = run_distill(recipe, overrides or [], stage=stage, resume=resume, force=force,
                              console=console, progress=draw)  # fmt: skip
    for name, res in results.items():
        if res.get("after"):
            console.print(f"{name}: mean rel. hidden error {res['before']['mean_rel_error']:.4f} -> "
                          f"{res['after']['mean_rel_error']:.4f}, logit KL {res['before']['logit_kl']:.4f} -> "
                          f"{res['after']['logit_kl']:.4f}")  # fmt: skip


@app.command(name="eval")
@user_errors
def eval_(
    model: Annotated[
        str, typer.Argument(help="Checkpoint to score: a LinMU dir, its teacher, a hub id or alias.")
    ],
    tasks: Annotated[
        str,
        typer.Option(
            help="lmms-eval tasks or groups, comma-separated: linmu_video_count, mmmu_val, videomme, ..."
        ),
    ],
    teacher: Annotated[
        str | None, typer.Option(help="Also score this checkpoint and show teacher | student | delta.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most N samples per task (smoke runs).")] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option("--include-path", help="More lmms-eval task YAML dirs (repeatable).")
    ] = None,
    model_args: Annotated[
        str | None,
        typer.Option(
            help="k=v,... for the linmu lmms-eval model: max_num_frames, fps, max_pixels, min_pixels, "
            "dtype, batch_size, device, max_new_tokens, system_prompt."
        ),
    ] = None,  # fmt: skip
    output: Annotated[Path | None, typer.Option(help="Where results go (default: runs/eval-<time>).")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Requests per forward, left-padded (plain lmms-eval: its own --batch_size N)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if available).")
    ] = None,
    log_samples: Annotated[
        bool, typer.Option("--log-samples/--no-log-samples", help="Write every response per task.")
    ] = True,
    verbose: Annotated[bool, typer.Option(help="Show lmms-eval's own logs and progress bars.")] = False,
    force: Annotated[
        bool, typer.Option(help="Replace an --output that already holds an evaluation (refused without it).")
    ] = False,
) -> None:
    """Score MODEL (and --teacher) with lmms-eval; print each task's main metric side by side.

    The synthetic offline tasks in evals/ (linmu_image_color, linmu_video_count, linmu_video_order,
    linmu_video_when, linmu_long_video_*, their *_mc log-likelihood variants; groups linmu_synthetic,
    linmu_synthetic_mc, linmu_long_video, linmu_long_video_mc) are found without --include-path; their data is
    generated on first use. docs/eval.md: running the real benchmarks (mmmu_val, videomme, ...) offline.

      linmu eval out/ --tasks linmu_video_when,linmu_video_when_mc --teacher teacher/ --limit 20

      linmu eval /ckpt/linmu-7b --tasks mmmu_val,videomme --teacher /ckpt/Qwen2-VL-7B-Instruct --model-args max_num_frames=64

    Data parallel (one replica per GPU, requests sharded by lmms-eval, scores gathered on rank 0):

      accelerate launch --num_processes 2 -m linmu_cli eval out/ --tasks linmu_synthetic
    """
    from linmu_cli.evaluation.run import check_output, merge_model_args, quiet_lmms_eval, require_lmms_eval

    # cheap checks first (no torch, no lmms-eval): a typo answers in a second
    if limit is not None and limit < 1:
        raise LinmuError(f"--limit must be at least 1, got {limit}")
    if device is not None:
        quick_device_check(device)
    if batch_size is not None and batch_size < 1:
        raise LinmuError(f"--batch-size must be at least 1, got {batch_size}")
    args = merge_model_args(model_args, batch_size=batch_size, device=device)
    check_output(output, force)
    require_lmms_eval()
    if not verbose:
        quiet_lmms_eval()
    summary = _run_eval_with_progress(model, tasks, teacher, limit, include_path, args, output, log_samples,
                                      force)  # fmt: skip
    if not summary:  # a non-zero rank of `accelerate launch -m linmu_cli eval` / torchrun: rank 0 reports
        return
    console.print(eval_table(summary, model, teacher))
    console.print(f"results: {summary['output']}/summary.json (raw lmms-eval results under student/"
                  f"{', teacher/' if teacher else ''})", highlight=False, soft_wrap=True)  # fmt: skip


def _run_eval_with_progress(model, tasks, teacher, limit, include_path, args, output, log_samples,
                            force=False) -> dict:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from linmu_cli.evaluation.run import evaluate

    names = {"student": model, "teacher": teacher}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bars = Progress(*columns, console=err_console, transient=False)
    ids: dict = {}

    def on_progress(role: str, phase: str, done: int, total: int) -> None:
        if phase == "loading":
            what = f"{role}: loading {names.get(role)}"
            (bars.console if bars.live.is_started else err_console).print(what, highlight=False)
            return
        if not bars.live.is_started:
            bars.start()
        key = (role, phase)
        if key not in ids:  # role "data": the synthetic tasks' samples, written once on first use
            ids[key] = bars.add_task(phase if role == "data" else f"{role} {phase}", total=total)
        bars.update(ids[key], completed=done, total=total)

    rank0 = int(os.environ.get("RANK", "0")) == 0  # data-parallel launches: one set of bars
    try:
        return evaluate(model, tasks, teacher, limit=limit, include_path=include_path, model_args=args,
                        output=output, log_samples=log_samples, progress=on_progress if rank0 else None,
                        force=force)  # fmt: skip
    finally:
        if bars.live.is_started:
            bars.stop()


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def eval_table(summary: dict, model: str, teacher: str | None) -> Table:
    """Each task's main metric: teacher | student | delta (student - teacher) when a teacher was scored."""
    limit = summary.get("limit")
    title = f"linmu eval: {model}" + (f" vs teacher {teacher}" if teacher else "")
    title += f" (limit {limit})" if limit else ""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("n", justify="right")
    if teacher:
        table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    if teacher:
        table.add_column("delta", justify="right")
    for row in summary["tasks"]:
        cells = [row["task"] + (" (group)" if row.get("group") else ""), row["metric"] or "-",
                 str(row["n"]) if row.get("n") is not None else "-"]  # fmt: skip
        if teacher:
            cells += [_fmt(row.get("teacher")), _fmt(row.get("student")), _fmt(row.get("delta"), signed=True)]
        else:
            cells.append(_fmt(row.get("student")))
        table.add_row(*cells)
    return table


@app.command()
@user_errors
def bench(
    frames: Annotated[
        list[str], typer.Option(help="Frame counts, comma-separated or repeated: --frames 64,128,256.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Checkpoint directory: a source VLM (converted here) or a LinMU one.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Real-shape random weights, no checkpoint: qwen2-vl-7b, qwen2.5-vl-7b, tiny-qwen2-vl, ..."
        ),
    ] = None,
    resolution: Annotated[int, typer.Option(help="Frame height = width in pixels (multiple of 28).")] = 448,
    batch: Annotated[str, typer.Option(help="Largest decode batch: auto (search until OOM) or N.")] = "auto",
    new_tokens: Annotated[int, typer.Option(help="Most decode steps timed per measurement.")] = 128,
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32.")] = "bf16",
    device: Annotated[str, typer.Option(help="cuda or cpu.")] = "cuda",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write raw numbers + environment here.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of TTFT and throughput vs frames.")] = None,
    repeats: Annotated[int, typer.Option(help="TTFT runs per model and frame count (median).")] = 2,
    equal_batch: Annotated[
        int, typer.Option(help="The batch both models decode at for a like-for-like ratio.")
    ] = 16,
    max_batch: Annotated[
        int | None, typer.Option(help="Cap of the batch search (default 4096 on CUDA, 4 on CPU).")
    ] = None,
    graphs: Annotated[
        bool, typer.Option("--graphs/--no-graphs", help="LinMU decode as a CUDA graph.")
    ] = True,
    ssd_backend: Annotated[
        str | None, typer.Option(help="Flex-MA prefill kernel (default: fla on CUDA when it imports).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="M-MATE field of the conversion, FIELD=VALUE (repeatable)."),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="Seconds; measurements past it are reported as skipped.")
    ] = None,
    decode_seconds: Annotated[
        float | None, typer.Option(help="Seconds of timing per decode measurement (default 1 on CUDA).")
    ] = None,
    fast_vision: Annotated[
        bool,
        typer.Option(
            "--fast-vision/--hf-vision", help="Both models' vision towers through linmu_cli.vision."
        ),
    ] = True,
    vision_compile: Annotated[
        str,
        typer.Option(help="Fuse the tower's rotary / activation with torch.compile: auto (CUDA) | on | off."),
    ] = "auto",
    teacher_kernel: Annotated[
        str,
        typer.Option(
            help="Served teacher's decode attention: auto (fastest measured), split_kv, sdpa_masked, matmul, "
            "triton_split_kv."
        ),
    ] = "auto",
) -> None:
    """TTFT, decode throughput and memory of a teacher and its LinMU conversion on a synthetic video.

    Both models run the same video (the processor's token layout: frames/2 x H/28 x W/28 LM tokens) in one
    process, alternately, after a warm-up. Examples:

      linmu bench --arch tiny-qwen2-vl --frames 8 --device cpu --json bench.json

      linmu bench --arch qwen2-vl-7b --frames 64,128,256,512,1024 --json bench.json --plot bench.png
    """
    from linmu_cli.bench import parse_batch, run_bench, tables

    fields = mate_overrides(None, None, None, None, None, None, None, None, ssd_backend, set_)
    result = run_bench(
        model=model, arch=arch, frames=frames, resolution=resolution, batch=parse_batch(batch),
        new_tokens=new_tokens, dtype=dtype, device=device, json_path=json_out, plot_path=plot, repeats=repeats,
        equal_batch=equal_batch, max_batch=max_batch, mate=fields, graphs=graphs, time_budget=time_budget,
        decode_seconds=decode_seconds, fast_vision=fast_vision, teacher_kernel=teacher_kernel,
        vision_compile={"auto": "auto", "on": True, "off": False}.get(vision_compile, vision_compile),
        progress=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
    )  # fmt: skip
    for table in tables(result):
        console.print(table)
    console.print(f"TTFT crossover: {result['crossover']['text']}", highlight=False)
    for path in (json_out, plot):
        if path is not None:
            console.print(f"wrote {path}", highlight=False)


@app.command()
@user_errors
def doctor() -> None:
    """Versions, CUDA, and which Flex-MA kernel paths import and run here."""
    import torch

    from linmu_cli.doctor import collect

    info = collect()
    n, why = _THREADS or cpu_threads()
    info["cpu threads"] = f"{n} ({why}); torch uses {torch.get_num_threads()}"
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

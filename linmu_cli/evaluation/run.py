"""`linmu eval`: lmms-eval's `simple_evaluate` on a student and (optionally) its teacher, side by side.

    from linmu_cli.evaluation import evaluate
    summary = evaluate("out/", ["linmu_video_count"], teacher="teacher/", limit=20, output="runs/eval")

writes `<output>/student/results.json` (lmms-eval's raw results), `<output>/student/samples_<task>.jsonl` (every
prompt's response and score), the same under `teacher/`, and `<output>/summary.json` (the table: each task's main
metric for teacher, student and student - teacher).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import gc
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from linmu_cli.errors import LinmuError
from linmu_cli.versions import package_version

Progress = Callable[[str, str, int, int], None]  # (role, phase, done, total)


def require_lmms_eval() -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        raise LinmuError(
            "linmu eval needs lmms-eval: pip install 'linmu[eval]' (lmms-eval==0.7.3 with filelock<4) "
            f"[{type(exc).__name__}: {exc}]"
        ) from None


def parse_model_args(model_args: str | dict | None) -> dict[str, Any]:
    """`k=v,k2=v2` (values typed like lmms-eval does, then checked against each arg's type) -> dict; unknown keys,
    `pretrained` and values of the wrong type are errors. Needs neither lmms-eval nor torch (fast errors)."""
    from linmu_cli.evaluation.manifest import MODEL_ARGS, coerce_model_args, parse_arg_string

    if model_args is None or model_args == "":
        return {}
    if isinstance(model_args, dict):
        args = dict(model_args)
    else:
        bad = [item for item in str(model_args).split(",") if item.strip() and "=" not in item]
        if bad:
            raise LinmuError(f"--model-args {model_args!r}: expected KEY=VALUE pairs separated by commas "
                             f"(e.g. max_num_frames=32,fps=1), got {bad[0]!r}")  # fmt: skip
        args = parse_arg_string(str(model_args))
    if "pretrained" in args:
        raise LinmuError("--model-args: give the checkpoint as MODEL (and --teacher), not pretrained=")
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise LinmuError(f"--model-args: unknown key(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(a for a in MODEL_ARGS if a != 'pretrained')}")  # fmt: skip
    try:
        return coerce_model_args(args, error=LinmuError)
    except LinmuError as exc:
        raise LinmuError(str(exc).replace("model arg ", "--model-args ", 1)) from None


def merge_model_args(model_args: str | dict | None, **options: Any) -> dict[str, Any]:
    """--model-args plus the convenience options (--batch-size, --device); a key given both ways is an error."""
    args = parse_model_args(model_args)
    for key, value in options.items():
        if value is None:
            continue
        if key in args:
            raise LinmuError(f"{key} given twice: as --{key.replace('_', '-')} and in --model-args")
        args[key] = value
    from linmu_cli.evaluation.manifest import coerce_model_args

    return coerce_model_args(args, error=LinmuError)


def check_output(output: str | Path | None, force: bool) -> None:
    """An --output that already holds an evaluation is refused without --force (nothing is overwritten)."""
    if output is None:
        return
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise LinmuError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an earlier evaluation (summary.json)" if (out / "summary.json").exists() else "files"
        raise LinmuError(f"--output {out} already holds {what}; pass --force to replace it, or choose another "
                         "--output (the default is a new runs/eval-<time>)")  # fmt: skip
    from linmu_cli.io import check_writable

    check_writable(out)


def quiet_lmms_eval() -> None:
    """CLI runs: lmms-eval / transformers / datasets print only errors (to stderr), no progress bars of theirs."""
    import sys

    import datasets
    import lmms_eval.api.task
    import lmms_eval.evaluator  # noqa: F401  (its imports configure loguru; reconfigure after them)
    import tqdm
    import transformers
    from loguru import logger

    # lmms-eval's "Building contexts" / "Postprocessing" bars (the modules' own `tqdm` names): linmu draws its own
    def silent(*args: Any, **kwargs: Any):
        return tqdm.tqdm(*args, **{**kwargs, "disable": True})  # they pass disable=(RANK != 0) themselves

    for module in (lmms_eval.api.task, lmms_eval.evaluator):
        if getattr(module, "tqdm", None) is tqdm.tqdm:
            module.tqdm = silent
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _split_tasks(tasks: str | list[str]) -> list[str]:
    items = (
        tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    )
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise LinmuError("--tasks: give at least one lmms-eval task, e.g. --tasks linmu_video_count,mmmu_val")
    return list(dict.fromkeys(names))


def task_manager(include_path: list[str | Path] | None = None) -> Any:
    """lmms-eval's TaskManager over its own tasks, linmu's `evals/` and any --include-path directories."""
    from lmms_eval.tasks import TaskManager

    from linmu_cli.evaluation.tasks import evals_dir

    paths = []
    for p in include_path or []:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise LinmuError(f"--include-path {p}: not a directory")
        paths.append(str(path.resolve()))
    evals = evals_dir()
    if evals is not None:
        paths.insert(0, str(evals))
    return TaskManager("ERROR", include_path=paths or None), evals


def leaf_tasks(tm: Any, name: str) -> list[str]:
    """The tasks a task / group / tag name runs (groups and tags expanded recursively)."""
    from lmms_eval import utils

    entry = tm.task_index[name]
    if entry["type"] in ("task", "python_task"):
        return [name]
    subtasks = entry.get("task")
    if entry["type"] == "group" or not isinstance(subtasks, list):
        subtasks = utils.load_yaml_config(entry["yaml_path"], mode="simple").get("task", [])
    leaves = []
    for sub in subtasks:
        sub_name = sub.get("task") if isinstance(sub, dict) else sub
        if isinstance(sub_name, str) and sub_name in tm.task_index:
            leaves.extend(leaf_tasks(tm, sub_name))
    return list(dict.fromkeys(leaves))


def resolve_tasks(tm: Any, names: list[str]) -> dict[str, list[str]]:
    """{requested name: leaf tasks}; unknown names are one LinmuError with close matches."""
    resolved = {}
    for name in names:
        if name not in tm.task_index:
            close = difflib.get_close_matches(name, tm.all_tasks, n=4, cutoff=0.6)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; `lmms-eval tasks list` shows them all"
            )
            raise LinmuError(f"unknown task {name!r}{hint}")
        resolved[name] = leaf_tasks(tm, name)
    return resolved


def main_metric(results: dict, task: str) -> tuple[str | None, float | None]:
    """(metric, value) of a task or group: the first metric its config lists, with the `none` filter."""
    values = results.get("results", {}).get(task) or results.get("groups", {}).get(task) or {}
    preferred = [m.get("metric") for m in results.get("configs", {}).get(task, {}).get("metric_list", [])]
    candidates = [f"{m},none" for m in preferred if isinstance(m, str)]
    candidates += [k for k in values if "," in k and "_stderr" not in k and k not in candidates]
    for key in candidates:
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None, None


def _n_samples(results: dict, task: str) -> int | None:
    n = results.get("n-samples", {}).get(task, {})
    return n.get("effective") if isinstance(n, dict) else None


def _write_raw(results: dict, out: Path) -> None:
    from lmms_eval.utils import handle_non_serializable

    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    for task, rows in samples.items():
        with (out / f"samples_{task}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    if samples:
        results["samples"] = samples


def _failed_task(exc: BaseException) -> str | None:
    """The task an lmms-eval failure belongs to: marked by the linmu model (requests), else the `task_name` /
    `task_output` of the innermost lmms-eval frame that had one (metrics, aggregation)."""
    task = getattr(exc, "linmu_task", None)
    if task:
        return str(task)
    tb, found = exc.__traceback__, None
    while tb is not None:
        local = tb.tb_frame.f_locals
        name = local.get("task_name")
        output = local.get("task_output") or (local.get("self") if type(local.get("self")).__name__ == "TaskOutput"
                                              else None)  # fmt: skip
        if isinstance(name, str):
            found = name
        elif output is not None and isinstance(getattr(output, "task_name", None), str):
            found = output.task_name
        tb = tb.tb_next
    return found


def run_one(
    role: str,
    model: str,
    tasks: list[str],
    tm: Any,
    *,
    limit: int | float | None,
    model_args: dict,
    log_samples: bool,
    offline: bool,
    progress: Progress | None,
) -> tuple[dict | None, dict]:
    """Evaluate one model with lmms-eval; (lmms-eval results, model stats). A failure inside lmms-eval or a task's
    code (an assertion, a missing file, `sys.exit`) is one LinmuError naming the model and the task."""
    from lmms_eval import evaluator

    from linmu_cli.evaluation.availability import offline_hub
    from linmu_cli.evaluation.plugin import LinMU

    report = (lambda phase, done, total: progress(role, phase, done, total)) if progress else None
    start = time.perf_counter()
    if report:
        report("loading", 0, 1)
    try:
        lm = LinMU(pretrained=model, progress=report, **model_args)
    except ValueError as exc:  # the model's own argument checks (device, types)
        raise LinmuError(str(exc).removeprefix("linmu: ")) from None
    loaded = time.perf_counter() - start
    try:
        with offline_hub() if offline else nullcontext():
            results = evaluator.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm,
                                                log_samples=log_samples, verbosity="ERROR", bootstrap_iters=0)  # fmt: skip
    except (LinmuError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:
        task = _failed_task(exc)
        where = f"task {task}" if task else f"one of the tasks ({', '.join(tasks)})"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        kind = "exited" if isinstance(exc, SystemExit) else f"failed with {type(exc).__name__}"
        hint = (" (MME scores question pairs: use an even --limit or none)"
                if "pairwise" in detail else "; --verbose shows lmms-eval's log")  # fmt: skip
        raise LinmuError(f"{role} {model}: {where} {kind}: {detail}{hint}") from None
    stats = dict(lm.stats, load_seconds=round(loaded, 3), seconds=round(time.perf_counter() - start, 3),
                 pretrained=str(model), processes=lm.world_size)  # fmt: skip
    lm.clean()
    del lm
    gc.collect()
    if results is not None:
        missing = [t for t in _leaves_of(tm, tasks) if t not in results.get("results", {})]
        if missing:
            raise LinmuError(f"{role} {model}: lmms-eval returned no results for task(s) {', '.join(missing)}; "
                             "--verbose shows why")  # fmt: skip
    return results, stats


def _leaves_of(tm, names: list[str]) -> list[str]:
    return list(dict.fromkeys(t for name in names for t in leaf_tasks(tm, name)))


def evaluate(
    model: str | Path,
    tasks: str | list[str],
    teacher: str | Path | None = None,
    *,
    limit: int | float | None = None,
    include_path: list[str | Path] | None = None,
    model_args: str | dict | None = None,
    output: str | Path | None = None,
    log_samples: bool = True,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score MODEL (and TEACHER) on lmms-eval TASKS; write raw results + summary under OUTPUT; return the summary.

    Everything is checked before a model loads (tasks, datasets, every media file the tasks reference, OUTPUT);
    OUTPUT appears only when both models were scored (written beside it, then renamed); an OUTPUT that already
    holds files needs `force=True`."""
    names = _split_tasks(tasks)
    if limit is not None and (
        limit <= 0 or (isinstance(limit, float) and limit >= 1 and not limit.is_integer())
    ):
        raise LinmuError(f"--limit must be a positive number of samples per task, got {limit}")
    args = parse_model_args(model_args)
    check_output(output, force)
    require_lmms_eval()
    from linmu_cli.evaluation.availability import check_available, check_media
    from linmu_cli.evaluation.tasks import DATASETS, data_root, dataset_meta, dataset_ready, ensure_datasets
    from linmu_cli.sources import check_device, read_model_type, resolve_source

    if args.get("device") not in (None, "", "auto"):
        check_device(str(args["device"]))
    models = {"student": str(model)} | ({"teacher": str(teacher)} if teacher is not None else {})
    for role, path in models.items():
        try:
            kind, where = resolve_source(path)
            if kind == "dir":
                read_model_type(Path(where))  # a damaged config.json fails here, before data or models load
        except LinmuError as exc:
            raise LinmuError(f"{'MODEL' if role == 'student' else '--teacher'}: {exc}") from None

    tm, evals = task_manager(include_path)
    resolved = resolve_tasks(tm, names)
    leaves = list(dict.fromkeys(t for ts in resolved.values() for t in ts))
    synthetic = [
        t for t in leaves if evals is not None and str(tm.task_index[t]["yaml_path"]).startswith(str(evals))
    ]
    generated = []
    if synthetic and not all(dataset_ready(data_root(evals), name) for name in DATASETS):
        on_sample = (
            (lambda done, total: progress("data", "writing synthetic task data", done, total))
            if progress
            else None
        )
        generated = ensure_datasets(evals, on_sample=on_sample)
    offline = check_available(tm, leaves)
    check_media(tm, leaves, limit, offline)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(output) if output is not None else Path("runs") / f"eval-{stamp}"

    raw: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for role, path in models.items():
        raw[role], stats[role] = run_one(role, path, names, tm, limit=limit, model_args=args,
                                         log_samples=log_samples, offline=offline, progress=progress)  # fmt: skip
    if any(r is None for r in raw.values()):  # a non-zero rank of a data-parallel launch: rank 0 writes
        return {}

    rows = []
    for name in names:
        members = resolved[name]
        entries = members + ([name] if members != [name] else [])
        for task in entries:
            if any(r["task"] == task for r in rows):
                continue
            metric, student = main_metric(raw["student"], task)
            row = {"task": task, "metric": metric, "n": _n_samples(raw["student"], task), "student": student,
                   "group": task not in leaves}  # fmt: skip
            if "teacher" in raw:
                t_metric, t_value = main_metric(raw["teacher"], task)
                row["teacher"] = t_value
                row["delta"] = None if student is None or t_value is None else student - t_value
            rows.append(row)

    summary = {
        "tasks": rows,
        "limit": limit,
        "model_args": args,
        "models": stats,
        "synthetic_data": {t: dataset_meta(evals, Path(_data_file(tm, t)).parent.name) for t in synthetic}
        if synthetic
        else {},
        "generated_datasets": generated,
        "output": str(out),
        "lmms_eval_version": package_version("lmms_eval"),
        "created": stamp,
    }
    from linmu_cli.io import atomic_directory

    with atomic_directory(out, force=True) as tmp:  # emptiness / --force were checked before any model loaded
        for role, results in raw.items():
            _write_raw(results, tmp / role)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _data_file(tm, task: str) -> str:
    from lmms_eval import utils

    config = utils.load_yaml_config(tm.task_index[task]["yaml_path"], mode="simple")
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return next(iter(files.values())) if isinstance(files, dict) else str(files)

"""What a `linmu distill` invocation may do to OUTPUT, decided before anything is written (issue 14 items 3-5,
7, 16, 22, 23; docs/design.md §7).

`make_plan` only reads: it says which stages run, which old stage outputs a `--force` replaces, which recipe
fields a `--resume` applies, and refuses (LinmuError naming the field or stage) whatever would lose a run or
make the recorded recipe disagree with what ran. `prepare` executes the plan under the OUTPUT lock, right
before training writes; `repair` finishes a stage whose outputs a kill left half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linmu_cli.distillation import checkpoint
from linmu_cli.distillation.recipe import STAGES, Recipe
from linmu_cli.errors import LinmuError
from linmu_cli.io import remove_stale_temporaries

LOCK = ".linmu.lock"
GLOBAL_KEYS = ("teacher", "seed", "dtype", "data", "model")  # fixed for every stage of one OUTPUT
# The other top-level keys (output, device, distributed, fast_vision, vision_compile) say where and how fast a
# run computes, not what it learns: they are never compared, so a resume or a later stage may change them.
RESUMABLE = (
    "lr",
    "weight_decay",
    "max_grad_norm",
    "steps",
    "schedule",
    "warmup_steps",
    "save_every",
    "log_every",
    "gradient_checkpointing",
    "grad_accum",
    "optimizer",
    "prefetch",
    "ssd_backend",
    "loss.kl_backend",
)  # fmt: skip  (a resume applies these to a running stage; grad_accum keeps the global batch on another world)


def stage_state(out: Path, name: str) -> str:
    """'complete' (its output exists), 'started' (step checkpoints exist) or 'absent'."""
    if (out / name / "stage.json").is_file():
        return "complete"
    if checkpoint.step_dirs(out / "checkpoints" / name):
        return "started"
    return "absent"


def holds_run(out: Path) -> bool:
    """Whether OUTPUT holds anything a run promised to keep (a stage output, a step checkpoint, final/)."""
    return out.is_dir() and ((out / "final").exists() or any(stage_state(out, s) != "absent" for s in STAGES))


def final_complete(out: Path) -> bool:
    return (out / "final" / "stage.json").is_file() and (out / "final" / "model.safetensors").is_file()


def recipe_diff(recorded: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Fields whose values differ; keys only one side knows (older / newer linmu) are not differences."""
    if isinstance(recorded, dict) and isinstance(new, dict):
        return [
            d
            for k in recorded
            if k in new
            for d in recipe_diff(recorded[k], new[k], f"{path}.{k}" if path else k)
        ]
    return [] if recorded == new else [(path, recorded, new)]  # fmt: skip


def _scope(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of a recipe that a stage's result depends on: the global keys and its own section."""
    scoped = {k: recipe[k] for k in GLOBAL_KEYS if k in recipe}
    scoped["stages"] = {stage: (recipe.get("stages") or {}).get(stage) or {}}
    return scoped


def _recorded_recipe(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Plan:
    """What this invocation trains and replaces; filled by make_plan, executed by prepare."""

    train: list[str]  # stages to train, in order
    kept: list[str] = field(default_factory=list)  # complete stages left as they are
    replace: list[str] = field(default_factory=list)  # stage outputs deleted first (--force)
    wipe: bool = False  # --force without --stage: the whole previous run goes
    fresh: bool = False  # OUTPUT holds no run: leftovers of a failed one (recipe.yaml, metrics) are cleared
    changes: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)  # applied on resume
    found: dict[str, checkpoint.Found] = field(default_factory=dict)  # verified checkpoints (verify=True)


def without_states(plan: Plan) -> Plan:
    """The plan with the chosen checkpoints' paths but not their tensors (what other ranks are sent)."""
    found = {k: checkpoint.Found(v.path, None) for k, v in plan.found.items()}
    return dataclasses.replace(plan, found=found)


def _fields(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)


def make_plan(out: Path, recipe: Recipe, stage: str | None, resume: bool, force: bool,
              verify: bool = False) -> Plan:  # fmt: skip
    """Decide (reading only) what runs; raise LinmuError for every combination that would lose work."""
    if resume and force:
        raise LinmuError("--resume continues a run and --force deletes it: pass one of them")
    if out.exists() and not out.is_dir():
        raise LinmuError(f"output={out} is a file, not a run directory: choose another output")
    states = {s: stage_state(out, s) for s in STAGES}
    has_run = holds_run(out)
    if stage is None:
        if force:
            return Plan(list(STAGES), wipe=out.is_dir())
        if has_run and not resume:
            raise LinmuError(
                f"{out} already holds a run: pass --resume to continue it or --force to start over"
            )
        plan = Plan(
            [s for s in STAGES if states[s] != "complete"],
            kept=[s for s in STAGES if states[s] == "complete"],
        )
    else:
        idx = STAGES.index(stage)
        later = [s for s in STAGES[idx + 1 :] if states[s] != "absent"]
        init_from = recipe.stages[stage].init_from
        if idx > 0 and not init_from and states[STAGES[idx - 1]] != "complete":
            prev = STAGES[idx - 1]
            raise LinmuError(f"{stage} starts from {prev}'s output {out / prev}, which does not exist: run "
                             f"`linmu distill RECIPE --stage {prev}` first, or set stages.{stage}.init_from=DIR")  # fmt: skip
        before = [s for s in STAGES[:idx] if states[s] == "complete"]
        if force:  # this stage and everything built on it (later stages, final/) go; earlier ones stay
            gone = [s for s in STAGES[idx:] if states[s] != "absent"]
            plan = Plan([stage], kept=before, replace=gone)
        elif not resume and (states[stage] != "absent" or later):
            what = ", ".join(s for s in (stage, *later) if states[s] != "absent")
            raise LinmuError(f"{out} already holds {what}: pass --resume to continue {stage}, or --force to "
                             f"retrain {stage} (replacing {', '.join([stage, *STAGES[idx + 1:]])})")  # fmt: skip
        else:
            done = states[stage] == "complete"
            plan = Plan([] if done else [stage], kept=before + ([stage] if done else []))
    plan.fresh = not has_run
    new = recipe.to_dict()
    for s in plan.kept:  # a finished stage is never silently re-described
        recorded = _recorded_recipe(out / s / "recipe.yaml")
        diffs = recipe_diff(_scope(recorded, s), _scope(new, s)) if recorded else []
        if diffs:
            hint = (
                f"--stage {s} --force"
                if any(k.startswith(f"stages.{s}.") for k, _, _ in diffs)
                else "--force"
            )
            raise LinmuError(f"{out / s} was trained with a different recipe ({_fields(diffs)}); the finished "
                             f"stages kept in OUTPUT must match it: drop the override, or pass `{hint}` to retrain")  # fmt: skip
    running = next((s for s in plan.train if states[s] == "started" and s not in plan.replace), None)
    if running is not None:
        root = out / "checkpoints" / running
        found = checkpoint.find_intact(root) if verify else None
        if found is not None and found.path is None:
            why = "; ".join(f"{p.name}: {r}" for p, r in found.broken)
            raise LinmuError(f"{root} holds no intact step checkpoint ({why}): restart the stage with "
                             f"`linmu distill RECIPE --stage {running} --force`")  # fmt: skip
        meta = found.state if found is not None else (checkpoint.newest_meta(root) or (None, None))[1]
        if meta is not None:
            plan.changes[running] = _resume_changes(meta, new, running, root)
        if found is not None:
            plan.found[running] = found
    return plan


def _resume_changes(state: dict[str, Any], new: dict[str, Any], stage: str, root: Path) -> list:
    """The recipe fields in which a resume differs from the checkpoint: the RESUMABLE ones are applied,
    any other is refused (issue 14 item 7: the restored scheduler silently kept the old lr)."""
    recorded = state.get("recipe")
    if not isinstance(recorded, dict):
        return []
    diffs = recipe_diff(_scope(recorded, stage), _scope(new, stage))
    fixed = [d for d in diffs if d[0].removeprefix(f"stages.{stage}.") not in RESUMABLE]
    if fixed:
        raise LinmuError(f"{root} was trained with a different recipe ({_fields(fixed)}); a resume can change "
                         f"only {', '.join(RESUMABLE)} of the running stage: drop the override, or restart the "
                         f"stage with `--stage {stage} --force`")  # fmt: skip
    step = int(state.get("step", 0))
    for key, _, value in diffs:
        if key == f"stages.{stage}.steps" and value < step:
            raise LinmuError(
                f"stages.{stage}.steps={value}: the checkpoint in {root} is already at step {step}"
            )
    return diffs


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Temp file beside `path`, fsync, rename: readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def update_report(out: Path, set_: dict[str, Any] | None = None, drop: list[str] | None = None) -> None:
    path = out / "report.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        data = {}  # a torn report is rebuilt from the stages' own stage.json by repair()
    data = data if isinstance(data, dict) else {}
    for key in drop or []:
        data.pop(key, None)
    data.update(set_ or {})
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def prepare(out: Path, plan: Plan) -> list[str]:
    """Execute the plan (rank 0, holding the lock): clear stale temporaries, replace what --force replaces,
    set broken checkpoints aside. Returns lines to print."""
    notes = []
    stale = remove_stale_temporaries(out, any_pid=True)
    for s in STAGES:
        stale += remove_stale_temporaries(out / "checkpoints" / s, any_pid=True)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) left by an interrupted run: "
                     f"{', '.join(str(p.relative_to(out)) for p in stale[:4])}{' ...' if len(stale) > 4 else ''}")  # fmt: skip
    if plan.wipe:
        for entry in out.iterdir():
            if entry.name != LOCK:
                _remove(entry)
        notes.append(f"--force: removed the previous run in {out}")
    elif plan.replace:
        for s in plan.replace:
            _remove(out / s)
            _remove(out / "checkpoints" / s)
        final = (out / "final").exists()
        _remove(out / "final")  # built on every stage
        update_report(out, drop=plan.replace)
        notes.append(f"--force: removed {', '.join(plan.replace)}{' and final' if final else ''} from {out}")
    if plan.fresh:
        for name in ("recipe.yaml", "metrics.jsonl", "report.json"):
            _remove(out / name)
    for found in plan.found.values():
        for path, why in found.broken:
            aside = checkpoint.set_aside(path, "corrupt")
            notes.append(
                f"{path} is unusable ({why}): moved to {aside.name}; resuming from {found.path.name}"
            )
    return notes


def repair(out: Path, stage: str, write_final: Callable[[], None]) -> bool:
    """Finish a complete stage whose report entry or final/ a kill prevented (issue 14 item 4); True if any
    repair was needed. Judged by what a run promises to leave, not by the stage directory alone."""
    try:
        result = json.loads((out / stage / "stage.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise LinmuError(
            f"{out / stage}/stage.json is unreadable: retrain with `--stage {stage} --force`"
        ) from None
    repaired = False
    report = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        report = json.loads((out / "report.json").read_text())
    if not isinstance(report, dict) or stage not in report:
        update_report(out, set_={stage: {"before": result.get("before"), "after": result.get("after")}})
        repaired = True
    if stage == STAGES[-1] and not final_complete(out):
        write_final()
        repaired = True
    return repaired


def clean_failed(out: Path, created: bool) -> None:
    """After a failure that left no checkpoint or stage output: remove what this run wrote, and OUTPUT itself
    when this run created it (issue 14 item 16: an empty OUTPUT or a lone recipe.yaml refused the corrected
    rerun)."""
    if holds_run(out):
        return
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "checkpoints"):
        _remove(out / name)
    remove_stale_temporaries(out, any_pid=True)
    if created:
        _remove(out / LOCK)
        with contextlib.suppress(OSError):
            out.rmdir()

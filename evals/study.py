"""The quality study: does distillation keep a skilled teacher's accuracy, and what does each part buy?

    python evals/study.py --teacher evals/teacher --out runs/study --markdown docs/quality.md

Runs `linmu distill recipes/synthetic.yaml` once in full and once per ablation (same data, same total number of
optimizer steps), then scores the teacher, the converted-but-undistilled model, each stage and every ablation on
held-out synthetic samples by greedy generation (exact match after `normalize_answer`, the rule of the lmms-eval
tasks), plus top-1 agreement with the teacher's answers.
Length generalization: the final model and the teacher again at 2x and 4x the distillation frame count.
Every row of the written tables names the command that reproduces it.

    python evals/study.py --length-only NAME --out runs/length --set model.text_window=16 --json X.json

distills once (the recipe plus every --set) and scores that student and the teacher at 1x/2x/4x frames, keeping
the raw answers (docs/quality.md, "Length generalization: which suspect ..."; tables by evals/length_table.py,
count fits by evals/count_analysis.py). `--from-json X.json --markdown docs/quality.md` rewrites the tables from a
(possibly partial) --json of a full study run.

    python evals/study.py --teacher evals/teacher2 --tasks grid --set data.size=224 --device cuda --out runs/s2

runs the same study on teacher 2 (issue 15) and its grid tasks (`--tasks grid` = `synthetic.GRID_TASKS`, or a
comma-separated list of task names), with every model scored on the GPU; distillation follows the recipe's
`device` (set to `--device` too).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import linmu_cli  # noqa: E402
from linmu_cli.bench.report import write_json  # noqa: E402
from linmu_cli.data import synthetic  # noqa: E402
from linmu_cli.distillation import distill, load_recipe  # noqa: E402
from linmu_cli.distillation.recipe import STAGES  # noqa: E402
from linmu_cli.evaluation.answers import normalize_answer  # noqa: E402
from linmu_cli.evaluation.greedy import greedy_answers  # noqa: E402
from linmu_cli.loading import load_model  # noqa: E402
from linmu_cli.models import convert_model  # noqa: E402

EVAL_SEED = 12345  # never used for training (distillation uses the recipe seed and seed + 7919)
RECIPE = ROOT / "recipes" / "synthetic.yaml"
# Where models are scored and how many samples go through one greedy batch (set from --device in main()).
RUN: dict[str, Any] = {"device": "cpu", "batch": 8}
NOTES_MARKER = "<!-- everything below this line is kept when evals/study.py rewrites the tables above -->"


@dataclass
class Ablation:
    name: str
    what: str
    overrides: list[str] = field(default_factory=list)
    skip: str | None = None  # a stage whose steps go to the next stage (or the previous one for stage3)


ABLATIONS = [
    Ablation("flex_only", "Flex-MA only (no Local-Swin)", ["model.use_swin=false"]),
    Ablation("swin_only", "Local-Swin only (no Flex-MA)", ["model.use_flex=false"], skip="stage1"),
    Ablation("no_backward", "no backward scan in visual segments", ["model.bidirectional=false"]),
    Ablation("single_order", "one scan order (no Rotary Major-Scan)", ["model.scan_orders=[thw]"]),
    Ablation("no_shift", "no shifted windows (Local-Swin)", ["model.shift_windows=false"]),
    Ablation("shared_projections", "one set of Q/K/V/O for both branches", ["model.shared_projections=true"]),
    Ablation("skip_stage1", "stage 1 skipped", skip="stage1"),
    Ablation("skip_stage2", "stage 2 skipped", skip="stage2"),
    Ablation("skip_stage3", "stage 3 skipped", skip="stage3"),
    Ablation("hidden_only", "hidden-state loss only (no logit KL in stage 3)", ["stages.stage3.loss.kl=0.0"]),
    Ablation("logit_only", "logit loss only (every stage end to end, KL only)",
             [f"stages.{s}.{k}" for s in STAGES for k in ("mode=end_to_end", "loss.hidden=0.0", "loss.kl=1.0")]),
]  # fmt: skip


def load(path: Path) -> tuple[Any, Any]:
    """(model, processor) of a teacher or LinMU checkpoint, through the loader every linmu command uses."""
    loaded = load_model(path, require_processor=True, device=RUN["device"])
    return loaded.model, loaded.processor


def answers(
    model: Any, processor: Any, tasks: list[str], n: int, frames: int, size: int, batch: int | None = None
) -> dict[str, list]:
    """Greedy one-word answers to `n` held-out samples of each task (same samples for every model):
    {task: [(normalized reply, answer)]}."""
    out: dict[str, list] = {}
    for task in tasks:
        samples = [synthetic.generate(task, i, EVAL_SEED, frames, size) for i in range(n)]
        replies = greedy_answers(model, processor, samples, batch_size=batch or RUN["batch"])
        out[task] = [
            (normalize_answer(r), normalize_answer(s.answer)) for r, s in zip(replies, samples, strict=True)
        ]
    return out


def score(result: dict[str, list], reference: dict[str, list] | None = None) -> dict[str, float]:
    row = {task: sum(p == a for p, a in pairs) / len(pairs) for task, pairs in result.items()}
    row["mean"] = sum(row.values()) / len(result)
    if reference is not None:
        same = [p == q for t in result for (p, _), (q, _) in zip(result[t], reference[t], strict=True)]
        row["agreement"] = sum(same) / len(same)
    return row


def stderr(row: dict[str, float], tasks: list[str], n: int) -> dict[str, float]:
    """Binomial standard errors of each task's accuracy (n answers) and of their unweighted mean."""
    se = {t: math.sqrt(row[t] * (1 - row[t]) / n) for t in tasks}
    se["mean"] = math.sqrt(sum(se[t] ** 2 for t in tasks)) / len(tasks)
    return se


def teacher_answers(path: Path, teacher, processor, tasks, n: int, frames: list[int], size: int) -> dict:
    """The teacher's answers at each frame count, cached in `path` (they depend only on the teacher)."""
    key = {"tasks": tasks, "n": n, "size": size, "eval_seed": EVAL_SEED}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "answers": {}}
    for f in frames:
        if str(f) not in cache["answers"]:
            cache["answers"][str(f)] = answers(teacher, processor, tasks, n, f, size)
            write_json(path, cache)
    return {f: {t: [tuple(p) for p in v] for t, v in cache["answers"][str(f)].items()} for f in frames}


def length_only(args, base: list[str], tasks: list[str], size: int, cmd: str) -> None:
    """`--length-only NAME`: one distillation (the recipe plus every --set) into OUT/NAME, its final model and
    the teacher scored at 1x, 2x and 4x the distillation frame count; raw answers kept for error analysis."""
    out = Path(args.out)
    t0 = time.time()
    teacher, processor = load(Path(args.teacher))
    mults = (1, 2, 4)
    frames = [m * args.frames for m in mults]
    ref = teacher_answers(out / "teacher_answers.json", teacher, processor, tasks, args.n, frames, size)
    del teacher
    path = out / args.length_only
    if args.reuse and (path / "final").is_dir():
        final_path = path / "final"
    else:
        final_path = run_distill(path, [], None, base)
    model, _ = load(final_path)
    res: dict = {"name": args.length_only, "command": cmd, "overrides": base, "tasks": tasks, "n": args.n,
                 "frames": args.frames, "eval_seed": EVAL_SEED, "rows": {}, "se": {}, "answers": {}}  # fmt: skip
    for f in frames:
        for label, got, reference in (("teacher", ref[f], None), ("LinMU final", None, ref[f])):
            if got is None:
                got = answers(model, processor, tasks, args.n, f, size)
                res["answers"][f"LinMU final @{f}"] = got
            name = f"{label} @{f}"
            res["rows"][name] = score(got, reference)
            res["se"][name] = stderr(res["rows"][name], tasks, args.n)
            print(f"{name}: {res['rows'][name]}", flush=True)
        res["answers"][f"teacher @{f}"] = ref[f]
        res["seconds"] = time.time() - t0
        if args.json:
            write_json(Path(args.json), res)


def run_distill(out: Path, extra: list[str], skip: str | None, base: list[str]) -> Path:
    """Distill into `out` (skipped stage: its steps move to a neighbour, so the budget stays equal)."""
    recipe = load_recipe(RECIPE, [*base, f"output={out}", *extra])
    if out.exists():
        shutil.rmtree(out)
    if skip is None:
        distill(recipe)
        return out / "final"
    keep = [s for s in STAGES if s != skip]
    heir = "stage2" if skip == "stage1" else "stage3" if skip == "stage2" else "stage2"
    recipe.stages[heir].steps += recipe.stages[skip].steps
    first = keep[0]
    if first != "stage1":  # start from the plain conversion, written as a LinMU checkpoint
        conv = out / "conversion"
        linmu_cli.convert(str(recipe.teacher), conv, mate=recipe.mate, seed=recipe.seed)
        recipe.stages[first].init_from = str(conv)
    if skip == "stage2":
        recipe.stages["stage3"].init_from = str(out / "stage1")
    for stage in keep:
        distill(recipe, stage=stage, resume=(out / stage).parent.exists())
    return out / keep[-1]


def table(
    rows: list[tuple[str, dict | None, str]], tasks: list[str], n: int, with_agreement: bool = True
) -> str:
    """Markdown rows; the mean carries its binomial standard error; a row of None is 'not re-run'."""
    head = ["model", *tasks, "mean ± SE"] + (["agreement"] if with_agreement else []) + ["command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row, cmd in rows:
        if row is None:
            cells = ["not re-run"] * (len(tasks) + 1 + with_agreement)
        else:
            se = stderr(row, tasks, n)["mean"]
            cells = [f"{row[t]:.2f}" for t in tasks] + [f"{row['mean']:.2f} ± {se:.2f}"]
            if with_agreement:
                cells.append(f"{row['agreement']:.2f}" if "agreement" in row else "-")
        lines.append("| " + " | ".join([name, *cells, f"`{cmd}`"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "evals" / "teacher"))
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--n", type=int, default=50, help="held-out samples per task")
    ap.add_argument("--frames", type=int, default=16, help="frames used in distillation (recipe data.frames)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    ap.add_argument(
        "--tasks",
        default=None,
        help="synthetic tasks (default: the recipe's): 'grid' or a comma-separated list",
    )
    ap.add_argument(
        "--device", default="cpu", help="where models are scored and distilled: cpu | cuda | cuda:N | auto"
    )
    ap.add_argument("--only", nargs="*", default=None, help="ablations to run (default all; 'none' for none)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument(
        "--length-only",
        default=None,
        metavar="NAME",
        help="only distill once into OUT/NAME and score it and the teacher at 1x/2x/4x frames",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="with --length-only: score OUT/NAME/final if it exists"
    )
    ap.add_argument(
        "--ablations-only",
        action="store_true",
        help="score the teacher, then run only the --only ablations (no conversion, full run or length rows): "
        "a study split over several device calls, merged by --from-json",
    )
    ap.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="only rewrite --markdown from one or more (possibly partial) --json files, merged (rows and length "
        "from the first that has them, ablations from all)",
    )
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.from_json:
        res = merge_results([json.loads(Path(f).read_text()) for f in args.from_json])
        write_markdown(Path(args.markdown), res, res.get("command", "python evals/study.py"))
        return
    out = Path(args.out)
    import torch

    RUN["device"] = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    RUN["batch"] = 8 if RUN["device"] == "cpu" else 50
    task_list = list(synthetic.GRID_TASKS) if args.tasks == "grid" else (args.tasks or "").split(",")
    unknown = [t for t in task_list if t and t not in synthetic.TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; known: grid, {', '.join(synthetic.TASKS)}")
    base = [f"teacher={args.teacher}", f"data.frames={args.frames}", f"device={RUN['device']}"]
    base += [f"data.tasks=[{','.join(task_list)}]"] if args.tasks else []
    base += args.set
    recipe = load_recipe(RECIPE, base)
    tasks = list(recipe.data.tasks)
    size = recipe.data.size
    flags = [f"--teacher {args.teacher}"] if args.teacher != ap.get_default("teacher") else []
    flags += [f"--frames {args.frames}"] if args.frames != 16 else []
    flags += [f"--tasks {args.tasks}"] if args.tasks else []
    flags += [f"--device {args.device}"] if args.device != "cpu" else []
    cmd_base = " ".join(["python evals/study.py", *flags, *(f"--set {s}" for s in args.set)])
    if args.length_only:
        cmd = " ".join(
            [cmd_base.strip(), f"--out {args.out}", f"--length-only {args.length_only}"]
            + (["--reuse"] if args.reuse else [])
        )
        length_only(args, base, tasks, size, cmd + (f" --json {args.json}" if args.json else ""))
        return
    t0 = time.time()
    results: dict = {
        "tasks": tasks,
        "frames": args.frames,
        "n": args.n,
        "rows": {},
        "length": {},
        "ablations": {},
        "command": cmd_base.strip(),
    }

    def dump() -> None:  # after every row, so a run cut short still leaves its raw numbers
        if args.json:
            results["seconds"] = time.time() - t0
            write_json(Path(args.json), results)

    teacher, processor = load(Path(args.teacher))
    lengths = (1,) if args.ablations_only else (1, 2, 4)  # the length rows are the pipeline's
    ref = {
        m * args.frames: answers(teacher, processor, tasks, args.n, m * args.frames, size) for m in lengths
    }
    results["rows"]["teacher"] = score(ref[args.frames])
    print(f"teacher: {results['rows']['teacher']}", flush=True)
    dump()
    if not args.ablations_only:
        pipeline(args, results, teacher, processor, recipe, tasks, size, ref, out, base, dump)
    chosen = ABLATIONS if args.only is None else [a for a in ABLATIONS if a.name in args.only]
    for ab in chosen:
        path = run_distill(out / ab.name, ab.overrides, ab.skip, base)
        model, _ = load(path)
        results["ablations"][ab.name] = {"what": ab.what, "overrides": ab.overrides, "skip": ab.skip,
                                         **score(answers(model, processor, tasks, args.n, args.frames, size), ref[args.frames])}  # fmt: skip
        print(f"{ab.name}: {results['ablations'][ab.name]}", flush=True)
        dump()
    results["seconds"] = time.time() - t0
    results["complete"] = not args.ablations_only
    dump()
    if args.markdown:
        write_markdown(Path(args.markdown), results, cmd_base.strip())


def pipeline(args, results, teacher, processor, recipe, tasks, size, ref, out, base, dump) -> None:
    """The study's first part: the undistilled conversion, the full run after each stage, its length rows."""
    converted = convert_model(teacher, recipe.mate, seed=recipe.seed).eval()
    results["rows"]["converted (no distillation)"] = score(
        answers(converted, processor, tasks, args.n, args.frames, size), ref[args.frames]
    )
    del converted

    full = run_distill(out / "full", [], None, base)
    for stage in STAGES:
        model, _ = load(out / "full" / stage)
        results["rows"][f"after {stage}"] = score(
            answers(model, processor, tasks, args.n, args.frames, size), ref[args.frames]
        )
        print(f"after {stage}: {results['rows'][f'after {stage}']}", flush=True)
        dump()
    final, _ = load(full)
    for mult in (1, 2, 4):
        f = mult * args.frames
        results["length"][f"teacher @{f}"] = score(ref[f])
        results["length"][f"LinMU final @{f}"] = score(
            answers(final, processor, tasks, args.n, f, size), ref[f]
        )
    print(f"length: {results['length']}", flush=True)
    dump()


def merge_results(parts: list[dict]) -> dict:
    """One study from several partial --json files of the same study (the same tasks, frames and n): the
    pipeline and length rows of the first part that has them, the ablations of every part (a later one wins)."""
    keys = {(tuple(p["tasks"]), p["frames"], p["n"]) for p in parts}
    if len(keys) > 1:
        raise SystemExit(
            f"--from-json: the files are of different studies (tasks, frames, n): {sorted(keys)}"
        )
    merged = {**parts[0], "rows": {}, "length": {}, "ablations": {}}
    for part in parts:
        for key in ("rows", "length"):
            if len(part[key]) > len(merged[key]):
                merged[key] = part[key]
        merged["ablations"].update(part["ablations"])
    merged["seconds"] = sum(p.get("seconds", 0.0) for p in parts)
    names = {a.name for a in ABLATIONS}
    merged["complete"] = "after stage3" in merged["rows"] and names <= set(merged["ablations"])
    return merged


def write_markdown(path: Path, res: dict, cmd: str) -> None:
    tasks, n = res["tasks"], res["n"]
    rows = [(name, row, cmd) for name, row in res["rows"].items()]
    length = [(name, row, cmd) for name, row in res["length"].items()]
    abl = [(a.what, res["ablations"].get(a.name), f"{cmd} --only {a.name}") for a in ABLATIONS
           if a.name in res["ablations"] or not res.get("complete")]  # fmt: skip
    partial = [] if res.get("complete") else [
        "",
        f"**Partial run:** the command was stopped after {res['seconds'] / 60:.0f} minutes on the shared CPU; rows marked",
        "'not re-run' were not measured again (see the notes below).",
    ]  # fmt: skip
    text = [
        "# Quality study (generated by evals/study.py)",
        "",
        f"Held-out synthetic samples: {n} per task (seed {EVAL_SEED}), greedy exact match; agreement = share of",
        f"answers identical to the teacher's; SE = binomial standard error of the mean over {len(tasks)} x {n} answers.",
        f"Distillation at {res['frames']} frames. Wall time {res['seconds'] / 60:.1f} min.",
        *partial,
        "",
        "## Pipeline",
        "",
        table(rows, tasks, n),
        "",
        "## Length generalization",
        "",
        table(length, tasks, n),
        "",
        "## Ablations (same data, same total steps)",
        "",
        table(abl, tasks, n),
        "",
    ]
    # hand-written analysis below the marker survives a regeneration of the tables
    notes = path.read_text().partition(NOTES_MARKER)[2] if path.is_file() else ""
    path.write_text("\n".join(text) + "\n" + NOTES_MARKER + (notes or "\n"))


if __name__ == "__main__":
    main()

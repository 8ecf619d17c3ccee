"""`linmu distill`: three-stage distillation of a LinMU student from its frozen teacher.

    from linmu_cli.distillation import distill
    distill("recipes/tiny.yaml", ["stages.stage1.steps=20"])

Launch with `accelerate launch -m linmu_cli distill RECIPE` or `torchrun -m linmu_cli distill RECIPE` for
data-parallel training (DDP, or FSDP2 of the trainable modules with `distributed.strategy=fsdp`); rank 0 logs
and writes checkpoints, which hold full tensors: `--resume` may use another number of processes or strategy
(`checkpoint.place_rank` says how the data order continues).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.console import Console

from linmu_cli.distillation.recipe import STAGES, Recipe, dump_recipe, load_recipe
from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from linmu_cli.distillation.trainer import StepProgress

__all__ = ["STAGES", "Recipe", "distill", "load_recipe"]


def _init_distributed(recipe: Recipe) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = recipe.device.startswith("cuda") or (recipe.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise LinmuError("recipe.device is cuda but no CUDA device is visible")
    if not want_cuda:
        device = torch.device("cpu")
    else:
        device = torch.device(f"cuda:{local}" if recipe.device in ("auto", "cuda") else recipe.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # disk full, read-only


def check_launcher() -> None:
    """`accelerate launch --num_processes N` on a machine without GPUs starts one process (its simple launcher)
    and sets no WORLD_SIZE: refuse instead of silently training on one process (issue 14 item 24)."""
    env = os.environ
    if "WORLD_SIZE" in env or "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env:
        return
    raise LinmuError(
        "accelerate launch started a single process (without GPUs it does not start several), so this run "
        "would not be data parallel: on CPU run `torchrun --nproc_per_node N -m linmu_cli distill RECIPE ...`, "
        "or drop --num_processes"
    )


def _check_per_layer(recipe: Recipe, stages: list[str], world: int) -> None:
    """`gradient_checkpointing: per_layer` runs backward once per layer inside the objective's forward. Under DDP
    the trainer averages those gradients itself; FSDP reduces each sharded module's gradients in its own backward
    hooks, which one backward per layer inside a forward does not fit."""
    if world == 1 or recipe.distributed.strategy != "fsdp":
        return
    for name in stages:
        if recipe.stages[name].gradient_checkpointing == "per_layer":
            raise LinmuError(
                f"stages.{name}.gradient_checkpointing=per_layer does not run under FSDP: set "
                f"distributed.strategy=ddp, or stages.{name}.gradient_checkpointing=every_other"
            )


def _on_main(rank: int, world: int, fn) -> Any:
    """Run `fn` on rank 0 and give every rank its LinmuError (so all ranks stop, none waits at a barrier)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except LinmuError as exc:
            error = str(exc)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise LinmuError(error)
    return result


def _check_inputs(recipe: Recipe, plan, processor) -> None:
    """Everything a run reads, checked before OUTPUT is touched (issue 14 item 3): the manifest and every row's
    media path, the synthetic tasks, each stage's init_from."""
    from linmu_cli.distillation.data import SampleStream

    SampleStream(recipe.data, processor, recipe.seed)
    SampleStream(recipe.data, processor, recipe.seed, heldout=True)
    for name in plan.train:
        if recipe.stages[name].frames is not None:
            SampleStream(recipe.stages[name].data(recipe.data), processor, recipe.seed)
        src = recipe.stages[name].init_from
        if src and not (Path(src) / "config.json").is_file():
            raise LinmuError(
                f"stages.{name}.init_from={src}: not a LinMU checkpoint directory (no config.json)"
            )


def distill(
    recipe: str | Path | Recipe | None,
    overrides: list[str] | None = None,
    *,
    stage: str | None = None,
    resume: bool = False,
    force: bool = False,
    console: Console | None = None,
    progress: Callable[[StepProgress], None] | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order (or only `stage`); returns each stage's summary and report.

    Quiet unless asked: messages go to `console` (else the `linmu_cli.distillation` logger) and every
    optimizer step to `progress` (a `trainer.StepProgress`, rank 0 only), which the CLI draws as bars.

    Order (issue 14): recipe, plan (what runs, what a --force replaces: read only), teacher and data are all
    checked before OUTPUT is written; then OUTPUT is locked, the plan re-checked under the lock and executed,
    and training writes. A failure that left no checkpoint removes what it wrote."""
    from linmu_cli.distillation import outputs
    from linmu_cli.distillation.trainer import Run, train_stage, use_recipe_vision, vision_tower, write_final
    from linmu_cli.io import check_writable, exclusive_lock
    from linmu_cli.loading import load_model

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if stage is not None and stage not in STAGES:
        raise LinmuError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    check_launcher()
    out = Path(recipe.output)
    plan = outputs.make_plan(out, recipe, stage, resume, force)
    check_writable(out / outputs.LOCK)  # a read-only place fails now, not after the teacher loaded
    rank, world, device = _init_distributed(recipe)
    _check_per_layer(recipe, plan.train, world)
    dtype = torch.bfloat16 if recipe.dtype == "auto" and device.type == "cuda" else None
    dtype_name = (
        {None: "float32", torch.bfloat16: "bfloat16"}[dtype] if recipe.dtype == "auto" else recipe.dtype
    )
    torch.manual_seed(recipe.seed)
    # the teacher's processor encodes every sample: a bare weights directory is refused here, not at step 1
    teacher = load_model(recipe.teacher, dtype=dtype_name, device=device, seed=recipe.seed, teacher_only=True,
                         require_processor=True)  # fmt: skip
    teacher.model.requires_grad_(False)
    _check_inputs(recipe, plan, teacher.processor)
    model_dtype = next(teacher.model.parameters()).dtype
    run = Run(recipe, out, teacher, device, model_dtype, rank, world, console, progress)
    use_recipe_vision(recipe, teacher.model)  # on its device: vision_compile auto means compiled on CUDA
    run.print(f"teacher vision tower: {vision_tower(teacher.model)}", markup=False, highlight=False)
    created = not out.exists()
    with contextlib.ExitStack() as stack:

        def lock_and_prepare():
            out.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(exclusive_lock(out / outputs.LOCK, f"output={out}"))
            except LinmuError:  # another run owns OUTPUT: touch nothing (only the directory we made)
                if created:
                    with contextlib.suppress(OSError):
                        out.rmdir()
                raise
            try:
                again = outputs.make_plan(out, recipe, stage, resume, force, verify=True)
                for note in outputs.prepare(out, again):
                    run.print(note, highlight=False, soft_wrap=True)
                outputs.write_atomic(out / "recipe.yaml", dump_recipe(recipe))
            except BaseException:
                outputs.clean_failed(out, created)
                raise
            return again

        plan = _on_main(rank, world, lock_and_prepare) or plan
        if world > 1:  # every rank follows rank 0's plan; each loads the chosen checkpoint itself
            box = [outputs.without_states(plan)]
            dist.broadcast_object_list(box, src=0)
            plan = box[0] if rank else plan
        results = {}
        try:
            for name in STAGES:
                if name in plan.kept and run.is_main:
                    fixed = outputs.repair(out, name, lambda: write_final(run))
                    run.print(f"[bold]{name}[/]: {'finished the outputs of' if fixed else 'already complete in'} "
                              f"{out / name}{'' if name in plan.train else ', skipping'}")  # fmt: skip
                if name in plan.train:
                    results[name] = train_stage(run, name, plan)
        except BaseException as exc:
            if run.is_main:
                outputs.clean_failed(out, created)
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
                raise LinmuError(
                    f"writing under {out} failed: {exc.strerror} ({exc.filename or out}); the step checkpoints "
                    "written so far are intact: free space (or fix permissions), then --resume"
                ) from None
            raise
        if world > 1:
            dist.barrier()
    return results

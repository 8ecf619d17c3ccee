"""`linmu distill`: three-stage distillation of a LinMU student from its frozen teacher.

    from linmu_cli.distillation import distill
    distill("recipes/tiny.yaml", ["stages.stage1.steps=20"])

Launch with `accelerate launch -m linmu_cli distill RECIPE` or `torchrun -m linmu_cli distill RECIPE` for
data-parallel training (DDP, or FSDP2 of the trainable modules with `distributed.strategy=fsdp`); rank 0 logs
and writes checkpoints.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from linmu_cli.distillation.recipe import STAGES, Recipe, dump_recipe, load_recipe
from linmu_cli.errors import LinmuError

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


def _prepare_output(out: Path, resume: bool, force: bool, is_main: bool) -> None:
    if resume and force:
        raise LinmuError("--resume continues a run and --force deletes it: pass one of them")
    has_content = out.is_dir() and any(out.iterdir())
    if has_content and not (resume or force):
        raise LinmuError(f"{out} already holds a run: pass --resume to continue it or --force to start over")
    if is_main:
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)


def distill(
    recipe: str | Path | Recipe | None,
    overrides: list[str] | None = None,
    *,
    stage: str | None = None,
    resume: bool = False,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order (or only `stage`); returns each stage's summary and report."""
    from linmu_cli.distillation.trainer import Run, train_stage
    from linmu_cli.sources import load_teacher

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if stage is not None and stage not in STAGES:
        raise LinmuError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    rank, world, device = _init_distributed(recipe)
    out = Path(recipe.output)
    _prepare_output(out, resume, force, rank == 0)
    if world > 1:
        dist.barrier()
    dtype = torch.bfloat16 if recipe.dtype == "auto" and device.type == "cuda" else None
    dtype_name = (
        {None: "float32", torch.bfloat16: "bfloat16"}[dtype] if recipe.dtype == "auto" else recipe.dtype
    )
    torch.manual_seed(recipe.seed)
    teacher = load_teacher(recipe.teacher, dtype=dtype_name, device=str(device), seed=recipe.seed)
    teacher.model.requires_grad_(False)
    run = Run(recipe, out, teacher, device, next(teacher.model.parameters()).dtype, rank, world,
              console or Console())  # fmt: skip
    if rank == 0:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    results = {}
    for name in [stage] if stage else STAGES:
        if (out / name / "stage.json").is_file() and not stage:
            run.print(f"[bold]{name}[/]: already complete in {out / name}, skipping")
            continue
        results[name] = train_stage(run, name)
    if world > 1:
        dist.barrier()
    return results

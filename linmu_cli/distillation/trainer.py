"""The three-stage distillation loop (docs/design.md §1, §7).

Each stage builds its student from the previous stage's output (or the teacher's conversion for stage 1),
trains the parameter groups its recipe names, writes resumable step checkpoints, and ends with a loadable
checkpoint in OUTPUT/<stage>/ plus a fidelity report. Stage 3 also writes OUTPUT/final/ with LoRA merged.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors import safe_open
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.distillation import checkpoint, parallel
from linmu_cli.distillation.data import SampleStream
from linmu_cli.distillation.losses import logit_kl, relative_mse, token_weights
from linmu_cli.distillation.objectives import EndToEndObjective, LayerwiseObjective, run_student, run_teacher
from linmu_cli.distillation.outputs import Plan, update_report, write_atomic
from linmu_cli.distillation.recipe import STAGES, LoraSettings, Recipe, StageConfig, dump_recipe
from linmu_cli.errors import LinmuError
from linmu_cli.io import atomic_directory
from linmu_cli.models import convert_model
from linmu_cli.sources import Teacher

GROUP_PATTERNS = {
    "flex": ".self_attn.flex.",
    "swin": ".self_attn.swin.",
    "fusion": ".self_attn.fuse.",
    "lora": "lora_",
}


@dataclass
class Run:
    """Everything a stage needs that does not change between stages."""

    recipe: Recipe
    out: Path
    teacher: Teacher
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    console: Console = field(default_factory=Console)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            self.console.print(*args, **kwargs)


class NonFiniteLoss(LinmuError):
    pass


# --------------------------------------------------------------------------- students


def _load_linmu_tensors(student: nn.Module, src: Path) -> None:
    """Copy every M-MATE tensor of the LinMU checkpoint `src` into `student`, keeping the saved dtype."""
    params = dict(student.named_parameters())
    wanted = {n for n in params if ".self_attn." in n}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise LinmuError(f"{src} has no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key in wanted:
                    params[key].data = f.get_tensor(key).to(params[key].device)
                    wanted.discard(key)
    if wanted:
        raise LinmuError(f"{src} lacks {len(wanted)} M-MATE tensors (e.g. {sorted(wanted)[0]}): "
                         "was it written with a different model section?")  # fmt: skip


def build_student(run: Run, name: str) -> tuple[nn.Module, str]:
    """The student a stage starts from, and a sentence saying where it came from."""
    cfg, idx = run.recipe.stages[name], STAGES.index(name)
    if cfg.init_from:
        src = Path(cfg.init_from)
    elif idx == 0:
        src = None
    else:
        src = run.out / STAGES[idx - 1]
        if not (src / "stage.json").is_file():
            raise LinmuError(
                f"{name} starts from {STAGES[idx - 1]}'s output {src}, which does not exist: run "
                f"`linmu distill RECIPE --stage {STAGES[idx - 1]}` first, or set stages.{name}.init_from=DIR"
            )
    if src is None:
        student = convert_model(run.teacher.model, run.recipe.mate, seed=run.recipe.seed)
        return student, f"conversion of {run.recipe.teacher}"
    try:
        mate = MateConfig.from_dict(json.loads((src / "config.json").read_text())["mate"])
    except (OSError, KeyError, json.JSONDecodeError):
        raise LinmuError(f"{src} is not a LinMU checkpoint (no config.json with a 'mate' section)") from None
    student = convert_model(run.teacher.model, mate, seed=run.recipe.seed)
    _load_linmu_tensors(student, src)
    return student, str(src)


def _lora_regex(lora: LoraSettings) -> str:
    names = "|".join(re.escape(t) for t in lora.target_modules)
    return rf".*language_model\.layers\.\d+\.({names})"


def inject_lora(student: nn.Module, lora: LoraSettings) -> None:
    """LoRA adapters on the decoder's MLPs, in place (the model class stays a LinMU class)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=_lora_regex(lora))  # fmt: skip
    inject_adapter_in_model(config, student)
    if not any("lora_" in n for n, _ in student.named_parameters()):
        raise LinmuError(f"stage3.lora.target_modules {lora.target_modules} matched no decoder module")


def merge_lora(student: nn.Module) -> None:
    """Fold LoRA into *copies* of the base weights (the originals are shared with the teacher), then unwrap."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(student.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            module.merge(safe_merge=True)
            parent_name, _, attr = name.rpartition(".")
            setattr(student.get_submodule(parent_name), attr, base)


def set_trainable(student: nn.Module, groups: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze the named groups (as float32 master weights)."""
    trainable = []
    for name, param in student.named_parameters():
        on = any(GROUP_PATTERNS[g] in name for g in groups)
        param.requires_grad_(on)
        if on:
            if param.dtype != torch.float32:
                param.data = param.data.float()
            trainable.append((name, param))
    if not trainable:
        raise LinmuError(f"the groups {groups} hold no parameters in this model (was a branch switched off?)")
    return trainable


def lr_lambda(cfg: StageConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


# --------------------------------------------------------------------------- reports


@torch.no_grad()
def fidelity(run: Run, student: nn.Module, batches: list[dict]) -> dict[str, Any]:
    """Per-layer relative hidden-state error and logit KL of the student (end to end) against the teacher."""
    was_training = student.training
    student.eval()
    layers = student.family.decoder_layers(run.teacher.model)
    per_layer, kls = [], []
    for batch in batches:
        tp = run_teacher(run.teacher.model, layers, batch, want_logits=True)
        with _autocast(run):
            out, captured = run_student(student, batch)
        logits = out.logits
        layout = student.token_layout(**batch)
        w = token_weights(layout.valid, layout.is_vision(), 1.0)
        per_layer.append(
            [relative_mse(s, t, w).item() for s, t in zip(captured, tp.layer_outputs, strict=True)]
        )
        kls.append(logit_kl(logits, tp.logits, w).item())
    student.train(was_training)
    layer_err = [sum(v) / len(v) for v in zip(*per_layer, strict=True)]
    return {
        "layer_rel_error": layer_err,
        "mean_rel_error": sum(layer_err) / len(layer_err),
        "logit_kl": sum(kls) / len(kls),
    }


def report_table(name: str, before: dict, after: dict) -> Table:
    table = Table(title=f"{name}: fidelity on held-out samples (lower is better)")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for i, (b, a) in enumerate(zip(before["layer_rel_error"], after["layer_rel_error"], strict=True)):
        table.add_row(f"layer {i} rel. hidden error", f"{b:.4f}", f"{a:.4f}")
    table.add_row(
        "mean rel. hidden error", f"{before['mean_rel_error']:.4f}", f"{after['mean_rel_error']:.4f}"
    )
    table.add_row("logit KL", f"{before['logit_kl']:.4f}", f"{after['logit_kl']:.4f}")
    return table


def truncate_metrics(path: Path, stage: str, step: int) -> int:
    """At every stage start, keep only the lines of earlier stages and of this stage up to `step` (the
    checkpoint continued from, 0 when starting): a kill before or during a checkpoint then never duplicates
    steps (issue 14 item 8), and a line torn by a crash mid-append is dropped, not fatal (item 10).
    Returns the number of unreadable lines dropped."""
    if not path.is_file():
        return 0
    order = {s: i for i, s in enumerate(STAGES)}
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            here, at = order[rec["stage"]], int(rec["step"])
        except (ValueError, KeyError, TypeError):
            torn += bool(line.strip())
            continue
        if here < order[stage] or (here == order[stage] and at <= step):
            keep.append(line)
    write_atomic(path, "".join(x + "\n" for x in keep))
    return torn


# --------------------------------------------------------------------------- training


def _autocast(run: Run):
    if run.device.type == "cuda" and run.dtype != torch.float32:
        return torch.autocast("cuda", dtype=run.dtype)
    return nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _heldout(run: Run) -> list[dict]:
    stream = SampleStream(run.recipe.data, run.teacher.processor, run.recipe.seed, heldout=True)
    return [_to_device(stream.next_batch(1), run.device) for _ in range(run.recipe.data.heldout)]


def _apply_resume_changes(cfg: StageConfig, optimizer, scheduler) -> None:
    """A resume's override of lr / weight_decay / schedule is applied, not silently replaced by the restored
    optimizer and scheduler state (issue 14 item 7)."""
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"], group["lr"] = cfg.lr, cfg.weight_decay, cfg.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _diverged(run: Run, ckpt_root: Path, step: int) -> Path | None:
    """After a non-finite loss at step+1: a checkpoint of step `step` holds the weights that produced it, so it
    is not good; set it aside and name the one before (issue 14 item 6: 'last good' held |w| = 1e30)."""
    dirs = checkpoint.step_dirs(ckpt_root)
    if run.is_main and dirs and dirs[-1] == checkpoint.step_dir(ckpt_root, step):
        checkpoint.set_aside(dirs[-1], "diverged")
        dirs = dirs[:-1]
    return dirs[-1] if dirs else None


def train_stage(run: Run, name: str, plan: Plan | None = None) -> dict[str, Any]:
    """Train one stage to completion, continuing from the checkpoint the plan chose (outputs.make_plan)."""
    cfg, recipe = run.recipe.stages[name], run.recipe
    ckpt_root = run.out / "checkpoints" / name
    if plan is None:  # called directly: continue from the newest intact checkpoint, if any
        found = checkpoint.find_intact(ckpt_root)
        plan = Plan([name], found={name: found} if found.path else {})
    found = plan.found.get(name)
    resume_from = found.path if found is not None else None
    torch.manual_seed(recipe.seed + STAGES.index(name))
    student, started_from = build_student(run, name)
    if cfg.lora is not None:
        inject_lora(student, cfg.lora)
    student.to(run.device)
    trainable = set_trainable(student, cfg.train)
    state = None
    if resume_from is not None:
        state = found.state if found.state is not None else checkpoint.load(resume_from)
    history = list(state.get("resume_changes", [])) if state is not None else []
    if state is not None:  # full tensors into the unsharded student
        named = dict(trainable)
        for key, tensor in state["trainable"].items():
            named[key].data.copy_(tensor)
    heldout = _heldout(run) if run.is_main else []
    before = (
        state["report_before"]
        if state is not None
        else fidelity(run, student, heldout)
        if run.is_main
        else None
    )
    student.train()
    if cfg.gradient_checkpointing and cfg.mode == "end_to_end":
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    par = parallel.strategy(recipe.distributed.strategy, run.world)
    par.prepare(student)  # FSDP: shards the trainable modules (parameters become DTensors)
    objective: nn.Module = (
        LayerwiseObjective(student, cfg.loss, cfg.gradient_checkpointing)
        if cfg.mode == "layerwise"
        else EndToEndObjective(student, cfg.loss)
    )
    wrapped = par.wrap(objective)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    data = SampleStream(recipe.data, run.teacher.processor, recipe.seed, rank=run.rank, world=run.world)

    step = 0
    if state is not None:
        par.load_optimizer_state(student, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.position = state["data_positions"][run.rank]
        data.skipped.update(state.get("skipped", {}))
        step = state["step"]
        checkpoint.set_rng_state(state["rng"][run.rank] if isinstance(state["rng"], list) else state["rng"])
        run.print(f"[bold]{name}[/]: resuming at step {step} from {resume_from}")
        changes = plan.changes.get(name) or []
        if changes:
            _apply_resume_changes(cfg, optimizer, scheduler)
            history.append({"step": step, "changes": [[k, a, b] for k, a, b in changes]})
            run.print(f"{name}: from step {step} on, as this recipe says: "
                      f"{'; '.join(f'{k} {a!r} -> {b!r}' for k, a, b in changes)}", highlight=False)  # fmt: skip
    else:
        run.print(f"[bold]{name}[/]: starting from {started_from}; training {', '.join(cfg.train)} "
                  f"({sum(p.numel() for _, p in trainable):,} parameters), {cfg.mode}"
                  f"{' (' + recipe.distributed.strategy + f' x {run.world})' if run.world > 1 else ''}")  # fmt: skip

    if run.is_main:
        torn = truncate_metrics(run.out / "metrics.jsonl", name, step)
        if torn:
            run.print(
                f"{name}: dropped {torn} torn line(s) of {run.out / 'metrics.jsonl'} (a crash mid-write)"
            )
    teacher_layers = student.family.decoder_layers(run.teacher.model)
    want_logits = cfg.mode == "end_to_end" and bool(cfg.loss.kl)
    metrics_path = run.out / "metrics.jsonl"
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=run.console, disable=not run.is_main, transient=False) as progress:
        task = progress.add_task(name, total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            t0, tokens, totals = time.perf_counter(), 0, {}
            for micro in range(cfg.grad_accum):
                batch = _to_device(data.next_batch(cfg.batch_size), run.device)
                layout = student.token_layout(**batch)
                tp = run_teacher(run.teacher.model, teacher_layers, batch, want_logits)
                with par.no_sync(wrapped, micro == cfg.grad_accum - 1), _autocast(run):
                    terms = wrapped(tp, layout) if cfg.mode == "layerwise" else wrapped(batch, tp, layout)
                    (terms["loss"] / cfg.grad_accum).backward()
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                tokens += int(layout.valid.sum())
            stats = torch.tensor([totals["loss"], float(tokens)], dtype=torch.float64, device=run.device)
            if run.world > 1:
                dist.all_reduce(stats)
                stats[0] /= run.world
            loss = float(stats[0])
            norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if math.isfinite(loss) else None
            grad_norm = (
                float(norm.full_tensor() if parallel.is_dtensor(norm) else norm) if norm is not None else loss
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = _diverged(run, ckpt_root, step)
                what = (
                    f"{loss}" if not math.isfinite(loss) else f"unusable (its gradient norm is {grad_norm})"
                )
                raise NonFiniteLoss(
                    f"{name}: the loss became {what} at step {step + 1}; stopped without updating. Last good "
                    f"checkpoint: {last or 'none yet'}. Lower stages.{name}.lr or check the data, then --resume "
                    "(a resume applies the new lr)"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rate = float(stats[1]) / (time.perf_counter() - t0)
            record = {"stage": name, "step": step, **{k: round(v, 6) for k, v in totals.items()}, "loss": loss,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": round(rate, 1)}  # fmt: skip
            if run.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.update(task, completed=step, info=f"loss {loss:.4f}  {rate:,.0f} tok/s")
            if step % cfg.save_every == 0 or step == cfg.steps:
                positions, rngs = [data.position], [checkpoint.rng_state()]
                if run.world > 1:
                    positions, rngs = [None] * run.world, [None] * run.world
                    dist.all_gather_object(positions, data.position)
                    dist.all_gather_object(rngs, checkpoint.rng_state())
                tensors = par.full_trainable(student)  # collective under FSDP
                optim_state = par.optimizer_state(student, optimizer)  # collective under FSDP
                bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
                if bad is not None:  # never write a checkpoint that cannot be resumed from
                    last = checkpoint.step_dirs(ckpt_root)
                    raise NonFiniteLoss(
                        f"{name}: {bad} became non-finite at step {step}; no checkpoint written. Last good "
                        f"checkpoint: {last[-1] if last else 'none yet'}. Lower stages.{name}.lr, then --resume"
                    )
                if run.is_main:
                    checkpoint.save(ckpt_root, step, {
                        "trainable": tensors, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                        "rng": rngs, "data_positions": positions, "step": step,
                        "skipped": dict(data.skipped), "report_before": before,
                        "recipe": recipe.to_dict(), "resume_changes": history,
                    })  # fmt: skip
                run.barrier()

    if par.shards:  # an unsharded copy for the report and the saved checkpoint (rank 0)
        tensors = par.full_trainable(student)
        if run.is_main:
            student, _ = build_student(run, name)
            if cfg.lora is not None:
                inject_lora(student, cfg.lora)
            student.to(run.device)
            named = dict(student.named_parameters())
            for key, tensor in tensors.items():
                named[key].data = tensor.to(run.device)
    after = fidelity(run, student, heldout) if run.is_main else None
    if cfg.lora is not None and run.is_main:
        merge_lora(student)
    result = {"stage": name, "started_from": started_from, "steps": step, "skipped_samples": dict(data.skipped),
              "before": before, "after": after, "resume_changes": history}  # fmt: skip
    if run.is_main:
        run.console.print(report_table(name, before, after))
        if data.skipped:
            run.print(f"{name}: skipped {sum(data.skipped.values())} bad samples: {dict(data.skipped)}")
        _write_stage(run, name, student, result)
        update_report(run.out, set_={name: {"before": before, "after": after}})
        if name == STAGES[-1]:
            write_final(run)
    run.barrier()
    return result


def _write_stage(run: Run, name: str, student: nn.Module, result: dict[str, Any]) -> None:
    with atomic_directory(run.out / name, force=True) as tmp:
        student.save_pretrained(tmp)
        if run.teacher.processor is not None:
            run.teacher.processor.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(run.recipe))
        (tmp / "stage.json").write_text(json.dumps(result, indent=2) + "\n")


def write_final(run: Run) -> None:
    """OUTPUT/final/: the last stage's files as hard links (no second copy of the weights), written last, so
    its presence means the run is complete."""
    with atomic_directory(run.out / "final", force=True) as tmp:
        for f in (run.out / STAGES[-1]).iterdir():
            if f.is_file():
                os.link(f, tmp / f.name)

"""The three-stage distillation loop (docs/design.md §1, §7).

Each stage builds its student from the previous stage's output (or the teacher's conversion for stage 1),
trains the parameter groups its recipe names, writes resumable step checkpoints, and ends with a loadable
checkpoint in OUTPUT/<stage>/ plus a fidelity report. Stage 3 also writes OUTPUT/final/ with LoRA merged.
`StageRun` is one stage (setup, resume, loss step, checkpoint, finish); it draws nothing itself: messages go
to the run's console (or the `linmu_cli.distillation` logger) and step progress to the run's callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.errors import MarkupError
from rich.table import Table
from rich.text import Text
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.distillation import checkpoint, parallel, recompute
from linmu_cli.distillation.data import Prefetcher, SampleStream
from linmu_cli.distillation.losses import logit_kl, relative_mse, token_weights
from linmu_cli.distillation.objectives import EndToEndObjective, LayerwiseObjective, run_student, run_teacher
from linmu_cli.distillation.outputs import Plan, update_report, write_atomic
from linmu_cli.distillation.recipe import STAGES, LoraSettings, Recipe, StageConfig, dump_recipe
from linmu_cli.errors import LinmuError
from linmu_cli.io import atomic_directory
from linmu_cli.loading import Loaded, load_linmu_tensors
from linmu_cli.models import convert_model

GROUP_PATTERNS = {
    "flex": ".self_attn.flex.",
    "swin": ".self_attn.swin.",
    "fusion": ".self_attn.fuse",  # the fusion linear (`fuse.`) and the vision tokens' bias (`fuse_vision`)
    "lora": "lora_",
}

log = logging.getLogger("linmu_cli.distillation")


@dataclass(frozen=True)
class StepProgress:
    """What a run's progress callback receives (rank 0 only): once when a stage starts (`step` is where it
    starts or resumes, no loss yet) and after every optimizer step."""

    stage: str
    step: int
    steps: int
    loss: float | None = None
    tokens_per_s: float | None = None


@dataclass
class Run:
    """Everything a stage needs that does not change between stages.

    `console` None keeps the Python API quiet (messages go to the `linmu_cli.distillation` logger); the CLI
    passes its console and a `progress` callback that draws the bars."""

    recipe: Recipe
    out: Path
    teacher: Loaded
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    console: Console | None = None
    progress: Callable[[StepProgress], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Rank 0 only: rich markup to the console, or its plain text to the logger."""
        if not self.is_main:
            return
        if self.console is not None:
            self.console.print(*args, **kwargs)
        else:
            text = " ".join(_plain(a) for a in args if isinstance(a, str)).strip()
            if text:
                log.info(text)


def _plain(markup: str) -> str:
    try:
        return Text.from_markup(markup).plain
    except MarkupError:  # a message quoting something that looks like a closing tag
        return markup


class NonFiniteLoss(LinmuError):
    pass


# --------------------------------------------------------------------------- vision tower

_COMPILE = {"auto": "auto", "on": True, "off": False}  # recipe.vision_compile -> use_fast_vision(compile=)


def use_recipe_vision(recipe: Recipe, model: nn.Module) -> None:
    """`recipe.fast_vision`: `model`'s vision tower through linmu_cli.vision (after the model is on its device:
    compile "auto" looks at it). Idempotent per tower; a LinMU student's tower is a module of its own holding
    the teacher's frozen tensors (`convert_model`), so it is switched on its own, each time a student is built."""
    if recipe.fast_vision:
        from linmu_cli.vision import use_fast_vision

        use_fast_vision(model, compile=_COMPILE[recipe.vision_compile])


def vision_tower(model: nn.Module) -> str:
    """Which vision tower `model` runs, in a few words (the log line; stage.json's `vision_tower`)."""
    from linmu_cli.vision import fast_vision_info

    info = fast_vision_info(model)
    if info is None:
        return "transformers"
    how = f"compiled {'+'.join(info.compiled)}" if info.compiled else "eager"
    if info.compile_error:
        how += f"; compile failed, eager: {info.compile_error}"
    if info.mlp_padded:
        how += f"; MLP width padded {info.mlp_padded[0]} -> {info.mlp_padded[1]}"
    return f"linmu fast ({how})"


# --------------------------------------------------------------------------- students


def build_student(run: Run, name: str) -> tuple[nn.Module, str]:
    """The student a stage starts from, and a sentence saying where it came from."""
    cfg, idx = run.recipe.stages[name], STAGES.index(name)
    backend = run.recipe.ssd_backend_of(name)
    if cfg.init_from:
        src = Path(cfg.init_from)
    elif idx == 0:
        student = convert_model(
            run.teacher.model, run.recipe.mate.replace(ssd_backend=backend), seed=run.recipe.seed
        )
        return student, f"conversion of {run.recipe.teacher}"
    else:
        src = run.out / STAGES[idx - 1]
        if not (src / "stage.json").is_file():
            raise LinmuError(
                f"{name} starts from {STAGES[idx - 1]}'s output {src}, which does not exist: run "
                f"`linmu distill RECIPE --stage {STAGES[idx - 1]}` first, or set stages.{name}.init_from=DIR"
            )
    try:
        saved = MateConfig.from_saved(json.loads((src / "config.json").read_text())["mate"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise LinmuError(f"{src} is not a LinMU checkpoint (no config.json with a 'mate' section)") from None
    # the kernel is a runtime setting, not saved with the stage: this run's recipe chooses it
    mate = saved.replace(ssd_backend=backend)
    student = convert_model(run.teacher.model, mate, seed=run.recipe.seed)
    load_linmu_tensors(student, src)
    return student, str(src)


def _use_recorded_threads(run: Run, state: dict[str, Any] | None) -> None:
    """On CPU, continue with the torch thread count the run was trained with: CPU kernels reduce in a different
    order with another count, so a resumed run would leave the trajectory in the last bits (seen: 1 vs 2
    threads). The count is recorded in every step checkpoint and stage.json; a fresh run records its own.

    The count is always set, even when it looks unchanged: `torch.get_num_threads()` reports OpenMP's pool,
    while MKL's GEMMs default to the number of *physical* cores unless told, so an in-process run (a notebook,
    a test) and a CLI run (which exports OMP_NUM_THREADS before torch starts, and MKL follows it) could use
    different GEMM thread counts behind the same recorded number. `torch.set_num_threads` sets both."""
    if run.device.type != "cpu":
        return
    recorded = (state or {}).get("cpu_threads")
    for stage in STAGES:
        if recorded:
            break
        try:
            recorded = json.loads((run.out / stage / "stage.json").read_text()).get("cpu_threads")
        except (OSError, ValueError):
            continue
    current = torch.get_num_threads()
    if isinstance(recorded, int) and recorded > 0 and recorded != current:
        run.print(f"using {recorded} CPU threads, as this run was trained with (not {current})")
        current = recorded
    torch.set_num_threads(current)


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


def lr_lambda(cfg: StageConfig) -> Callable[[int], float]:
    """The lr factor after `step` optimizer steps: linear warmup from 1/warmup_steps (the first step already
    learns), then constant, linear to 0, or cosine to 10%.

    Not transformers' `get_*_schedule_with_warmup`: their warmup starts at 0 (step / warmup_steps, so the
    first step does not learn) and their linear decay rounds differently in the last bit, so resumed runs
    and the recorded metrics of existing runs would change; their cosine-with-min-lr (0.1) equals this one
    after warmup."""

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
    """Tensors to `device`; pinned ones (from a Prefetcher) copy without blocking the host."""
    return {
        k: v.to(device, non_blocking=v.is_pinned()) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _set_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """After loading a checkpoint's optimizer state: its param groups carry the saved run's implementation
    flags; this recipe's win. Fused AdamW keeps its step counts as float32 tensors on the parameters' device,
    the others on the host, as torch itself places them."""
    flags = {"foreach": None, "fused": None, **optimizer_flags(impl)}
    for group in optimizer.param_groups:
        group.update(flags)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if not torch.is_tensor(step):
                continue
            if flags["fused"]:
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)
            elif step.device.type != "cpu" and not group.get("capturable"):
                optimizer.state[p]["step"] = step.cpu()


def optimizer_flags(impl: str) -> dict[str, bool]:
    """torch.optim.AdamW keyword arguments for `stages.<stage>.optimizer` ("auto": torch chooses)."""
    return {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
            "for_loop": {"foreach": False}}[impl]  # fmt: skip


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


class StageRun:
    """One stage of a run, in the shape of a torchtune recipe.

    `setup` builds the student (loading a step checkpoint's full tensors before anything is sharded), the
    parallel strategy, the objective, the optimizer, the schedule and the data stream; `resume` restores the
    rest of the checkpoint into them; `train` repeats `_loss_step` and the optimizer step, logging and calling
    `save_checkpoint`; `finish` writes the stage output and the report. `train_stage` runs the four in order.
    """

    def __init__(self, run: Run, name: str, plan: Plan | None = None) -> None:
        self.run, self.name = run, name
        self.cfg: StageConfig = run.recipe.stages[name]
        self.ckpt_root = run.out / "checkpoints" / name
        if plan is None:  # called directly: continue from the newest intact checkpoint, if any
            found = checkpoint.find_intact(self.ckpt_root)
            plan = Plan([name], found={name: found} if found.path else {})
        self.plan = plan
        self.step = 0
        self.state: dict[str, Any] | None = None  # the checkpoint resumed from
        self.history: list[dict[str, Any]] = []  # resume_changes, carried from checkpoint to checkpoint

    # ------------------------------------------------------------------ setup

    def _fresh_student(self) -> tuple[nn.Module, str]:
        student, started_from = build_student(self.run, self.name)
        if self.cfg.lora is not None:
            inject_lora(student, self.cfg.lora)
        student.to(self.run.device)
        # the teacher's tower is switched where it is loaded (distill); again here (idempotent) for a Run built
        # by hand. The student runs its own tower in its reports, and in stage 3 without shared embeddings
        use_recipe_vision(self.run.recipe, self.run.teacher.model)
        use_recipe_vision(self.run.recipe, student)
        return student, started_from

    def setup(self) -> None:
        """Everything the loop needs; the order (seed, student, checkpoint tensors, report, sharding,
        optimizer) is what makes a resumed run repeat the uninterrupted one bit for bit."""
        run, cfg, recipe = self.run, self.cfg, self.run.recipe
        found = self.plan.found.get(self.name)
        self.resume_from = found.path if found is not None else None
        torch.manual_seed(recipe.seed + STAGES.index(self.name))
        self.student, self.started_from = self._fresh_student()
        self.trainable = set_trainable(self.student, cfg.train)
        if self.resume_from is not None:
            self.state = found.state if found.state is not None else checkpoint.load(self.resume_from)
            self.history = list(self.state.get("resume_changes", []))
            named = dict(self.trainable)
            for key, tensor in self.state["trainable"].items():  # full tensors into the unsharded student
                named[key].data.copy_(tensor)
        self.heldout = _heldout(run) if run.is_main else []
        if self.state is not None:
            self.before = self.state["report_before"]
        else:
            self.before = fidelity(run, self.student, self.heldout) if run.is_main else None
        self.student.train()
        student_layers = self.student.family.decoder_layers(self.student)
        if cfg.mode == "end_to_end":
            recompute.apply_end_to_end(self.student, student_layers, cfg.checkpoint_policy)
        self.par = parallel.strategy(recipe.distributed.strategy, run.world)
        self.par.prepare(self.student)  # FSDP: shards the trainable modules (parameters become DTensors)
        objective: LayerwiseObjective | EndToEndObjective = (
            LayerwiseObjective(self.student, cfg.loss, cfg.gradient_checkpointing, cfg.grad_accum)
            if cfg.mode == "layerwise"
            else EndToEndObjective(self.student, cfg.loss, cfg.share_teacher_embeddings)
        )
        self.wrapped = self.par.wrap(objective)
        self.backward_in_forward = objective.runs_backward  # per_layer: one backward per layer, inside it
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_flags(cfg.optimizer)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        data = cfg.data(recipe.data)
        stream = SampleStream(data, run.teacher.processor, recipe.seed, rank=run.rank, world=run.world)
        self.data: SampleStream | Prefetcher = (
            Prefetcher(stream, cfg.batch_size, cfg.prefetch, pin=run.device.type == "cuda")
            if cfg.prefetch
            else stream
        )
        self.teacher_layers = self.student.family.decoder_layers(run.teacher.model)
        self.want_logits = cfg.mode == "end_to_end" and bool(cfg.loss.kl)
        # what the teacher pass keeps: every layer's input and output layer-wise; end to end only the outputs
        # of the layers the hidden loss regresses
        self.teacher_keep: dict[str, Any] = (
            {}
            if cfg.mode == "layerwise"
            else {
                "keep_inputs": False,
                "keep_layers": objective.hidden_ids,
                "keep_embeds": cfg.share_teacher_embeddings,
            }
        )

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Restore optimizer, schedule, step, data positions and RNG from the checkpoint (if any), apply the
        recipe changes a resume may make, and cut metrics.jsonl back to the step continued from."""
        run, name, cfg = self.run, self.name, self.cfg
        state = self.state
        _use_recorded_threads(run, state)
        if state is not None:
            self.par.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
            _set_optimizer_impl(self.optimizer, cfg.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            self.data.skipped.update(state.get("skipped", {}))
            saved_world = len(state["data_positions"])
            seed = run.recipe.seed + STAGES.index(name)
            self.data.position, rng = checkpoint.place_rank(state, run.rank, run.world, seed)
            checkpoint.set_rng_state(rng)
            run.print(f"[bold]{name}[/]: resuming at step {self.step} from {self.resume_from}")
            changes = [[k, a, b] for k, a, b in self.plan.changes.get(name) or []]
            if changes:
                _apply_resume_changes(cfg, self.optimizer, self.scheduler)
            if saved_world != run.world:
                changes.append(["processes", saved_world, run.world])
            if changes:
                self.history.append({"step": self.step, "changes": changes})
                run.print(f"{name}: from step {self.step} on, as this recipe says: "
                          f"{'; '.join(f'{k} {a!r} -> {b!r}' for k, a, b in changes)}", highlight=False)  # fmt: skip
        else:
            run.print(f"[bold]{name}[/]: starting from {self.started_from}; training {', '.join(cfg.train)} "
                      f"({sum(p.numel() for _, p in self.trainable):,} parameters), {cfg.mode}"
                      f"{' (' + run.recipe.distributed.strategy + f' x {run.world})' if run.world > 1 else ''}")  # fmt: skip
        if run.is_main:
            torn = truncate_metrics(run.out / "metrics.jsonl", name, self.step)
            if torn:
                run.print(
                    f"{name}: dropped {torn} torn line(s) of {run.out / 'metrics.jsonl'} (a crash mid-write)"
                )

    # ------------------------------------------------------------------ training

    def _loss_step(self) -> tuple[dict[str, float], int]:
        """Forward and backward over `grad_accum` micro-batches (gradients synchronised on the last one);
        returns this rank's loss terms (means over the micro-batches) and its number of valid tokens."""
        run, cfg = self.run, self.cfg
        tokens, totals = 0, {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(self.data.next_batch(cfg.batch_size), run.device)
            layout = self.student.token_layout(**batch)
            tp = run_teacher(
                run.teacher.model, self.teacher_layers, batch, self.want_logits, **self.teacher_keep
            )
            # per_layer's backward runs inside the objective, so the wrapper never synchronises it (see below)
            last = micro == cfg.grad_accum - 1 and not self.backward_in_forward
            with self.par.no_sync(self.wrapped, last), _autocast(run):
                terms = (
                    self.wrapped(tp, layout) if cfg.mode == "layerwise" else self.wrapped(batch, tp, layout)
                )
                if not self.backward_in_forward:
                    (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            tokens += int(layout.valid.sum())
        if self.backward_in_forward:
            self.par.average_gradients(self.params)
        return totals, tokens

    def _stop_non_finite(self, loss: float, grad_norm: float) -> None:
        last = _diverged(self.run, self.ckpt_root, self.step)
        what = f"{loss}" if not math.isfinite(loss) else f"unusable (its gradient norm is {grad_norm})"
        raise NonFiniteLoss(
            f"{self.name}: the loss became {what} at step {self.step + 1}; stopped without updating. Last good "
            f"checkpoint: {last or 'none yet'}. Lower stages.{self.name}.lr or check the data, then --resume "
            "(a resume applies the new lr)"
        )

    def _notify(self, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.run.progress is not None and self.run.is_main:
            self.run.progress(StepProgress(self.name, self.step, self.cfg.steps, loss, tokens_per_s))

    def train(self) -> None:
        """Optimizer steps until `steps`: loss step, all-reduce, clip, NaN stop, update, log, checkpoint."""
        metrics_path = self.run.out / "metrics.jsonl"
        self._notify()
        try:
            self._train_steps(metrics_path)
        finally:
            if isinstance(self.data, Prefetcher):
                self.data.close()

    def _train_steps(self, metrics_path: Path) -> None:
        run, cfg, name = self.run, self.cfg, self.name
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            totals, tokens = self._loss_step()
            stats = torch.tensor([totals["loss"], float(tokens)], dtype=torch.float64, device=run.device)
            if run.world > 1:
                dist.all_reduce(stats)
                stats[0] /= run.world
            loss = float(stats[0])
            norm = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if math.isfinite(loss) else None
            grad_norm = (
                float(norm.full_tensor() if parallel.is_dtensor(norm) else norm) if norm is not None else loss
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._stop_non_finite(loss, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            rate = float(stats[1]) / (time.perf_counter() - t0)
            record = {"stage": name, "step": self.step, **{k: round(v, 6) for k, v in totals.items()},
                      "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": round(rate, 1)}  # fmt: skip
            if run.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            self._notify(loss, rate)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """A step checkpoint of full tensors (collective: every rank calls it; rank 0 writes), with every
        rank's data position and RNG; refused if a weight became non-finite."""
        run, data = self.run, self.data
        positions, rngs = [data.position], [checkpoint.rng_state()]
        if run.world > 1:
            positions, rngs = [None] * run.world, [None] * run.world
            dist.all_gather_object(positions, data.position)
            dist.all_gather_object(rngs, checkpoint.rng_state())
        tensors = self.par.full_trainable(self.student)  # collective under FSDP
        optim_state = self.par.optimizer_state(self.student, self.optimizer)  # collective under FSDP
        bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
        if bad is not None:  # never write a checkpoint that cannot be resumed from
            last = checkpoint.step_dirs(self.ckpt_root)
            raise NonFiniteLoss(
                f"{self.name}: {bad} became non-finite at step {self.step}; no checkpoint written. Last good "
                f"checkpoint: {last[-1] if last else 'none yet'}. Lower stages.{self.name}.lr, then --resume"
            )
        if run.is_main:
            checkpoint.save(self.ckpt_root, self.step, {
                "trainable": tensors, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "rng": rngs, "data_positions": positions, "step": self.step,
                "skipped": dict(data.skipped), "report_before": self.before,
                "recipe": run.recipe.to_dict(), "resume_changes": self.history,
                "cpu_threads": torch.get_num_threads(),
            })  # fmt: skip
        run.barrier()

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict[str, Any]:
        """The report after training, the stage output (LoRA merged for stage 3), report.json, final/."""
        run, name, student = self.run, self.name, self.student
        if self.par.shards:  # an unsharded copy for the report and the saved checkpoint (rank 0)
            tensors = self.par.full_trainable(student)
            if run.is_main:
                student, _ = self._fresh_student()
                named = dict(student.named_parameters())
                for key, tensor in tensors.items():
                    named[key].data = tensor.to(run.device)
        after = fidelity(run, student, self.heldout) if run.is_main else None
        if self.cfg.lora is not None and run.is_main:
            merge_lora(student)
        result = {"stage": name, "started_from": self.started_from, "steps": self.step,
                  "skipped_samples": dict(self.data.skipped), "before": self.before, "after": after,
                  "resume_changes": self.history, "cpu_threads": torch.get_num_threads(),
                  "vision_tower": {"teacher": vision_tower(run.teacher.model),
                                   "student": vision_tower(student)},
                  "ssd_backend": run.recipe.ssd_backend_of(name)}  # fmt: skip
        if run.is_main:
            run.print(report_table(name, self.before, after))
            if self.data.skipped:
                run.print(
                    f"{name}: skipped {sum(self.data.skipped.values())} bad samples: {dict(self.data.skipped)}"
                )
            _write_stage(run, name, student, result)
            update_report(run.out, set_={name: {"before": self.before, "after": after}})
            if name == STAGES[-1]:
                write_final(run)
        run.barrier()
        return result


def train_stage(run: Run, name: str, plan: Plan | None = None) -> dict[str, Any]:
    """Train one stage to completion, continuing from the checkpoint the plan chose (outputs.make_plan)."""
    stage = StageRun(run, name, plan)
    stage.setup()
    stage.resume()
    stage.train()
    return stage.finish()


def _write_stage(run: Run, name: str, student: nn.Module, result: dict[str, Any]) -> None:
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the trainer draws nothing itself (save_pretrained's shard bar)
    try:
        with atomic_directory(run.out / name, force=True) as tmp:
            student.save_pretrained(tmp)
            if run.teacher.processor is not None:
                run.teacher.processor.save_pretrained(tmp)
            (tmp / "recipe.yaml").write_text(dump_recipe(run.recipe))
            (tmp / "stage.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def write_final(run: Run) -> None:
    """OUTPUT/final/: the last stage's files as hard links (no second copy of the weights), written last, so
    its presence means the run is complete."""
    with atomic_directory(run.out / "final", force=True) as tmp:
        for f in (run.out / STAGES[-1]).iterdir():
            if f.is_file():
                os.link(f, tmp / f.name)

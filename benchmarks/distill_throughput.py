"""Distillation throughput, peak memory and a per-phase breakdown per stage at a real shape (random weights).

    python benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 4 --out DIR
    python benchmarks/distill_throughput.py --tiny --out DIR          # CPU, seconds (the test suite runs it)
    python benchmarks/distill_throughput.py --checkpointing all --variant before: \\
        --variant new:optimizer=fused,teacher_keep=used,prefetch=1,ckpt_e2e=every_other --out DIR
    torchrun --nproc_per_node 2 benchmarks/distill_throughput.py --strategy fsdp --checkpointing --json out.json

One step = one sample's data + the frozen teacher's pass + the stage objective's forward/backward + gradient
clipping and the AdamW step, as `linmu distill` runs it (same objectives, parameter groups, bf16 autocast,
float32 master weights, `linmu_cli.distillation.recompute` checkpointing). The baseline is a plain teacher
forward+backward on the same tokens (gradients for every decoder weight, no optimizer), so "stage 3 / baseline"
is the distillation overhead ratio of issue 17: `over_baseline` = a stage's tokens/s, data phase included (what a
run pays), over the baseline's tokens/s without its data phase (8,542 in the issue had none);
`over_baseline_without_data` leaves the stage's data phase out too.

Phases of a step (CUDA events on the GPU, perf_counter on the CPU; the step is synchronised before and after,
every phase is a span on the same stream, so they add up to the step time but for `other`, the host time
between spans):
- data: the next sample made by `SampleStream` (the built-in synthetic video task at the same frames and
  resolution through the Qwen2-VL processor settings; with `prefetch`, only the wait for the background
  thread) plus the host-to-device copy. The model trains on a fixed random batch of the same shape (copied
  each step), so every variant sees identical tensors; `--data none` leaves the sample out (the copy stays).
- teacher_forward: `run_teacher` (vision tower, decoder, hooks; the LM head on every token only when the
  stage's loss needs logits, with teacher_keep=used).
- student_forward: the objective's forward without its loss functions; losses: `relative_mse`, `logit_kl`,
  `next_token_ce` (forward only: their backward is part of backward).
- recompute: checkpointed forwards run again inside backward; backward: the rest of backward.
- optimizer: gradient clipping, AdamW step, zero_grad.

Variants (`--variant NAME:key=value,...`, repeatable; default one variant named after the flags) share one
teacher: keys ckpt (layer-wise stages' checkpointing policy: all | every_other | mlp_only | none | per_layer:
each layer's backward right after its forward, timed as backward; one process here),
ckpt_e2e (stage 3's), optimizer (auto | foreach | fused | for_loop), teacher_keep (all: every layer's input
and output and full logits, as before issue 17 | used: what the stage's loss reads), prefetch (batches made
ahead in a thread), data (synthetic | none), share_embeds (1: stage 3's student starts from the teacher's
input embeddings, no second vision tower pass; needs teacher_keep=used), stages (e.g. stage1+stage2; default --stages),
batch (samples per step, default --batch 1: N copies of the same-shaped sample stacked as one batch the way the
Qwen2-VL processor batches N videos, so a step trains on N x tokens and the CPU's launch cost of every kernel is
spread over N times the GPU work), ssd (the student's SSD backend: auto = mamba-ssm on Hopper | fla: fla's backward,
its issue-#640 guard lifted at K = 128, see linmu_cli/ops/ssd/fla.py), kl (stage 3's logit-KL kernel, recipe key
loss.kl_backend: auto = the fused Triton kernel on CUDA | torch | triton; recorded as kl_backend). Unset keys take
the command-line flags.

Every record carries `batch` and `tokens_per_step` (batch x tokens per sample; tokens/s count them all). The
baseline is measured at every batch some variant uses, right before the first such variant, into
`baseline_by_batch` ({"1": ..., "2": ...}; `baseline_teacher_fwd_bwd` is the first variant's, as before), and a
variant's `over_baseline` compares it with the baseline at its own batch (like with like); at batch > 1,
`over_baseline_batch1` compares it with the one-sample teacher instead.

`--fast-vision eager|compiled` switches the teacher's vision tower to `linmu_cli.vision.use_fast_vision` (one
SDPA call per run of equal-length frames; compiled: its rotary / activation fused by torch.compile) right after
the teacher is built, so the baseline's teacher forward+backward runs the same tower as the stages (an honest
baseline); every student's own tower (stage 3 without share_embeds) is switched too, as `linmu distill
fast_vision=true` does. Recorded as `fast_vision` and `fast_vision_info` (default off: transformers' tower).

Under torchrun each process trains on a sample of the same shape (the same random values on every rank: the
speed does not depend on them), data parallel through `linmu_cli.distillation.parallel` (DDP, or FSDP2 of the
trainable modules) as `linmu distill` does; tokens/s counts all processes' tokens from the slowest process's step
time, peak memory is the largest over the GPUs. The baseline runs with one process only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from linmu_cli.archs import build_random_model
from linmu_cli.bench.timing import Clock
from linmu_cli.config import MateConfig
from linmu_cli.distillation import objectives, parallel, recompute
from linmu_cli.distillation.data import Prefetcher, SampleStream
from linmu_cli.distillation.objectives import (
    EndToEndObjective,
    LayerwiseObjective,
    hidden_layer_ids,
    run_teacher,
)
from linmu_cli.distillation.recipe import STAGE_DEFAULTS, DataConfig, LoraSettings, LossConfig, policy_of
from linmu_cli.distillation.trainer import inject_lora, optimizer_flags, set_trainable
from linmu_cli.models import convert_model
from linmu_cli.ops import last_ssd_backend
from linmu_cli.ops.logit_kl import last_backend as last_kl_backend

PHASES = (
    "data",
    "teacher_forward",
    "student_forward",
    "losses",
    "recompute",
    "backward",
    "optimizer",
    "other",
)
VARIANT_KEYS = (
    "ckpt", "ckpt_e2e", "optimizer", "teacher_keep", "prefetch", "data", "share_embeds", "stages", "batch", "ssd",
    "kl",
)  # fmt: skip
INT_KEYS = ("prefetch", "share_embeds", "batch")


def video_batch(config, frames: int, resolution: int, text: int, device, batch: int = 1) -> dict:
    """Processor-shaped inputs for one video of `frames` frames at `resolution`^2 plus `text` text tokens;
    `batch` > 1 stacks that many copies of the same sample as the Qwen2-VL processor batches videos: token rows
    stacked (batch, L), every video's patches concatenated along dim 0 of `pixel_values_videos` and one
    `video_grid_thw` row per video, in row order (transformers' `Qwen2VLVideoProcessor`: `torch.cat(...,
    dim=0)` / `torch.tensor(grids)`)."""
    patch, merge, tp = config.vision_config.patch_size, config.vision_config.spatial_merge_size, 2
    gt, gh, gw = frames // tp, resolution // patch, resolution // patch
    n_vis = gt * (gh // merge) * (gw // merge)
    ids = torch.randint(0, min(10_000, config.vision_start_token_id), (1, text + n_vis + 2))
    ids[0, text // 2] = config.vision_start_token_id
    ids[0, text // 2 + 1 : text // 2 + 1 + n_vis] = config.video_token_id
    ids[0, text // 2 + 1 + n_vis] = config.vision_end_token_id
    one = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": (2 * (ids == config.video_token_id)).to(device),
        "pixel_values_videos": torch.randn(gt * gh * gw, 3 * tp * patch * patch, device=device),
        "video_grid_thw": torch.tensor([[gt, gh, gw]], device=device),
    }
    return stack_copies(one, batch)


def stack_copies(sample: dict, n: int) -> dict:
    """`n` copies of a one-sample batch as one batch: token tensors stacked along the batch dimension,
    `pixel_values_*` (every patch of every image / video, concatenated) and `*_grid_thw` (one row per image /
    video) concatenated along dim 0, as the processor batches them."""
    return {k: v if n == 1 else v.repeat(n, *(1,) * (v.dim() - 1)) for k, v in sample.items()}


class PhaseTimer:
    """Named spans of one step, marked by the bench's `Clock` (CUDA events on the current stream, read after a
    synchronize, or perf_counter)."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.spans: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        try:
            yield
        finally:
            self.spans.append((name, start, self.clock.mark()))

    def totals(self) -> dict[str, float]:
        """Seconds per span name since the last call (synchronises first on CUDA)."""
        self.clock.sync()
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            out[name] = out.get(name, 0.0) + self.clock.seconds(a, b)
        self.spans = []
        return out


@contextlib.contextmanager
def timed_losses(timer: PhaseTimer) -> Iterator[None]:
    """The objectives' loss functions inside a `losses` span (patched in `objectives`, restored after)."""
    # name in `objectives` -> span; layer_backward is per_layer's backward, run inside the objective
    spans = {"relative_mse": "losses", "logit_kl": "losses", "next_token_ce": "losses",
             "layer_backward": "layer_backward"}  # fmt: skip
    saved = {n: getattr(objectives, n) for n in spans}

    def wrap(fn: Callable[..., Any], span: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with timer.span(span):
                return fn(*args, **kwargs)

        return run

    for n, fn in saved.items():
        setattr(objectives, n, wrap(fn, spans[n]))
    recompute.set_recompute_timer(lambda: timer.span("recompute"))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(objectives, n, fn)
        recompute.set_recompute_timer(None)


def phases_of(spans: dict[str, float], step_s: float) -> dict[str, float]:
    """The step's phases from the raw spans: nested spans (losses and per_layer's layer_backward in objective,
    recompute in backward_all) are taken out of their parents, `other` is what no span covers."""
    p = {k: 0.0 for k in PHASES}
    p["data"] = spans.get("data", 0.0)
    p["teacher_forward"] = spans.get("teacher_forward", 0.0)
    p["losses"] = spans.get("losses", 0.0)
    inner = spans.get("layer_backward", 0.0)
    p["student_forward"] = max(0.0, spans.get("objective", 0.0) - p["losses"] - inner)
    p["recompute"] = spans.get("recompute", 0.0)
    p["backward"] = max(0.0, spans.get("backward_all", 0.0) + inner - p["recompute"])
    p["optimizer"] = spans.get("optimizer", 0.0)
    p["other"] = max(0.0, step_s - sum(p.values()))
    return p


def measure(step: Callable[[], None], timer: PhaseTimer, steps: int, dev: torch.device) -> dict[str, Any]:
    """Warm-up (compile / autotune, first allocations), then `steps` timed steps: mean step time, mean
    phases, peak memory, and the caching allocator's retries and device mallocs during the timed steps (near the
    memory limit a retry frees the cache and synchronises: time that lands in whichever phase allocates)."""
    cuda = dev.type == "cuda"
    step()
    timer.totals()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = allocator_counts(cuda)
    wall, acc = 0.0, {k: 0.0 for k in PHASES}
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        wall += dt
        for k, v in phases_of(timer.totals(), dt).items():
            acc[k] += v
    sec = wall / steps
    phases = {k: v / steps for k, v in acc.items()}
    after = allocator_counts(cuda)
    return {"s_per_step": sec, "phases_s": phases, "phases_sum_s": sum(phases.values()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "allocator": {k: after[k] - before[k] for k in after}}  # fmt: skip


def allocator_counts(cuda: bool) -> dict[str, int]:
    """The CUDA caching allocator's cumulative retries (cache flushed to satisfy a request) and device mallocs;
    zeros on CPU."""
    stats = torch.cuda.memory_stats() if cuda else {}
    return {"alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "device_mallocs": int(stats.get("num_device_alloc", 0))}  # fmt: skip


class Data:
    """`batch` samples per step from the synthetic stream (made, then dropped) and the fixed batch (of as many
    rows) to the device."""

    def __init__(self, host_batch: dict, dev: torch.device, frames: int, resolution: int, kind: str,
                 prefetch: int, batch: int = 1) -> None:  # fmt: skip
        self.host, self.dev, self.batch = host_batch, dev, batch
        if dev.type == "cuda":
            self.host = {k: v.pin_memory() for k, v in host_batch.items()}
        self.stream: SampleStream | Prefetcher | None = None
        if kind == "synthetic":
            from linmu_cli.tiny import build_tiny_processor

            cfg = DataConfig(source="synthetic", tasks=["video_count"], frames=frames, size=resolution,
                             max_pixels=resolution * resolution, max_tokens=1 << 30, heldout=1)  # fmt: skip
            stream = SampleStream(cfg, build_tiny_processor("qwen2_vl", max_pixels=resolution**2), seed=0)
            self.stream = Prefetcher(stream, batch, prefetch) if prefetch else stream

    def next(self) -> dict:
        if self.stream is not None:
            self.stream.next_batch(self.batch)
        return {k: v.to(self.dev, non_blocking=v.is_pinned()) for k, v in self.host.items()}

    def close(self) -> None:
        if isinstance(self.stream, Prefetcher):
            self.stream.close()


def make_step(teacher, layers, data: Data, objective, opt, params, layout, mode: str, dev, timer: PhaseTimer,
              keep: dict, want_logits: bool) -> Callable[[], None]:  # fmt: skip
    """One distillation step as `linmu distill` runs it: data, teacher pass, objective forward/backward,
    clipping, update."""

    backward_done = getattr(
        objective, "runs_backward", False
    )  # per_layer: the objective ran it, layer by layer

    def step() -> None:
        with timer.span("data"):
            batch = data.next()
        with timer.span("teacher_forward"):
            tp = run_teacher(teacher, layers, batch, want_logits=want_logits, **keep)
            if mode == "layerwise":
                tp.logits = None  # teacher_keep=all: computed on every token (as before), not kept
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with timer.span("objective"):
                out = objective(tp, layout) if mode == "layerwise" else objective(batch, tp, layout)
            if not backward_done:
                with recompute.backward_phase(), timer.span("backward_all"):
                    out["loss"].backward()
        with timer.span("optimizer"):
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def fast_vision(model: nn.Module, mode: str) -> Any:
    """`--fast-vision`: off (transformers' tower, returns None), eager or compiled (`use_fast_vision`'s info)."""
    if mode == "off":
        return None
    from linmu_cli.vision import use_fast_vision

    return use_fast_vision(model, compile=mode == "compiled")


def vision_record(info: Any) -> dict[str, Any] | None:
    """`fast_vision_info` for the JSON: FastVisionInfo's fields and its description (None: transformers')."""
    if info is None:
        return None
    return {**dataclasses.asdict(info), "describe": info.describe()}


def parse_variant(text: str, defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    cfg = dict(defaults)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise SystemExit(f"--variant {text}: unknown key {key!r}; keys: {', '.join(VARIANT_KEYS)}")
        cfg[key] = int(value) if key in INT_KEYS else value.replace("+", ",") if key == "stages" else value
    for key in ("ckpt", "ckpt_e2e"):
        policy_of(cfg[key])  # refuse a misspelt policy before the model is built
    if cfg["ckpt_e2e"] == "per_layer":
        raise SystemExit(f"--variant {text}: per_layer is for the layer-wise stages (ckpt), not ckpt_e2e")
    if cfg["batch"] < 1:
        raise SystemExit(f"--variant {text}: batch must be >= 1")
    return name or "default", cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2-vl-7b")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--tiny", action="store_true", help="tiny-qwen2-vl, 8 frames at 112, 2 steps (CPU, seconds)"
    )
    ap.add_argument("--checkpointing", nargs="?", const="all", default="none",
                    help="checkpointing policy of every stage (no value: all)")  # fmt: skip
    ap.add_argument("--checkpointing-e2e", default=None, help="stage 3's policy (default: --checkpointing)")
    ap.add_argument("--optimizer", default="auto", choices=["auto", "foreach", "fused", "for_loop"])
    ap.add_argument("--teacher-keep", default="all", choices=["all", "used"])
    ap.add_argument("--prefetch", type=int, default=0)
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "none"])
    ap.add_argument(
        "--batch", type=int, default=1, help="samples per step (copies of the same-shaped sample)"
    )
    ap.add_argument(
        "--share-embeds", action="store_true", help="stage 3 starts from the teacher's embeddings"
    )
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    ap.add_argument("--fast-vision", default="off", choices=["off", "eager", "compiled"],
                    help="vision towers through linmu_cli.vision (compiled: torch.compile of its rotary / "
                         "activation); off: transformers' tower")  # fmt: skip
    ap.add_argument("--lora-rank", type=int, default=16, help="stage 3 (recipes/qwen2-vl-7b.yaml: 64)")
    ap.add_argument(
        "--lora-dropout", type=float, default=0.0, help="stage 3 (recipes/qwen2-vl-7b.yaml: 0.05)"
    )
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; later stages are skipped")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with torchrun: how to split")
    ap.add_argument("--stages", default="stage1,stage2,stage3", help="comma-separated stages to measure")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--out", default=None, help="write the results to DIR/distill_throughput[-LABEL].json")
    ap.add_argument("--label", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.arch, args.frames, args.resolution, args.steps = "tiny-qwen2-vl", 8, 112, min(args.steps, 2)
    t_start = time.perf_counter()
    defaults = {"ckpt": policy_of(args.checkpointing),
                "ckpt_e2e": args.checkpointing_e2e or args.checkpointing, "optimizer": args.optimizer,
                "teacher_keep": args.teacher_keep, "prefetch": args.prefetch, "data": args.data,
                "share_embeds": int(args.share_embeds),
                "stages": args.stages, "batch": args.batch, "ssd": "auto", "kl": "auto"}  # fmt: skip
    variants = [parse_variant(v, defaults) for v in args.variant] or [("default", defaults)]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and any(v["ckpt"] == "per_layer" for _, v in variants):
        raise SystemExit(
            "ckpt=per_layer is measured on one process (its step here does not average gradients)"
        )
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")  # cpu: --arch tiny-*
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    teacher = build_random_model(args.arch, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    teacher.requires_grad_(False)
    # before the baseline: the teacher's forward+backward there runs the tower the stages' teacher pass runs
    fast_info = fast_vision(teacher, args.fast_vision)
    host_batches = {1: video_batch(teacher.config, args.frames, args.resolution, 64, "cpu")}

    def host_batch_of(n: int) -> dict:
        """The fixed host batch of `n` copies of the one sample (the same sample for every n)."""
        if n not in host_batches:
            host_batches[n] = stack_copies(host_batches[1], n)
        return host_batches[n]

    tokens = host_batch_of(1)["input_ids"].numel()  # per sample
    layers = teacher.model.language_model.layers
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "arch": args.arch, "tokens": tokens, "frames": args.frames, "resolution": args.resolution, "gpu": gpu,
        "processes": world, "strategy": args.strategy if world > 1 else "single", "steps": args.steps,
        "checkpointing": args.checkpointing != "none", "lora_rank": args.lora_rank,
        "lora_dropout": args.lora_dropout, "torch": torch.__version__, "phases": list(PHASES),
        "fast_vision": args.fast_vision, "fast_vision_info": vision_record(fast_info),
        "variants": {}, "stages": {},
    }  # fmt: skip
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{args.arch}: {tokens} tokens per sample x {world} process(es)", flush=True)
    say(f"vision tower (--fast-vision {args.fast_vision}): {fast_info.describe() if fast_info else 'transformers'}",
        flush=True)  # fmt: skip
    results["baseline_by_batch"] = {}
    target = (
        Path(args.out) / f"distill_throughput{'-' + args.label if args.label else ''}.json"
        if args.out
        else None
    )

    def write() -> None:
        if rank != 0:
            return
        for path in filter(None, [args.json and Path(args.json), target]):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")

    def rate(rec: dict, batch: int) -> dict:
        sec, step_tokens = rec["s_per_step"], batch * tokens
        rec.update(batch=batch, tokens_per_step=step_tokens)
        rec["tokens_per_s"] = world * step_tokens / sec
        rec["tokens_per_s_without_data"] = world * step_tokens / max(sec - rec["phases_s"]["data"], 1e-9)
        return rec

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    timer = PhaseTimer(dev)
    first = variants[0][1]

    def baseline_at(n: int) -> dict | None:
        """The baseline at `n` samples per step, measured the first time a variant asks for it: teacher forward
        + backward, gradients for every decoder weight (one process only), with the first variant's data."""
        key = str(n)
        if world > 1 or args.no_baseline:
            return None
        if key in results["baseline_by_batch"]:
            return results["baseline_by_batch"][key]
        if over_budget():
            results["baseline_by_batch"][key] = {"skipped": "time budget", "batch": n}
            return None
        for p in layers.parameters():
            p.requires_grad_(True)
        base_data = Data(
            host_batch_of(n), dev, args.frames, args.resolution, first["data"], first["prefetch"], n
        )

        def baseline() -> None:
            with timer.span("data"):
                batch = base_data.next()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                with timer.span("teacher_forward"):
                    logits = teacher(**batch, use_cache=False).logits
                with timer.span("backward_all"):
                    logits.float().square().mean().backward()
            teacher.zero_grad(set_to_none=True)

        try:
            with timed_losses(timer):
                rec = rate(measure(baseline, timer, args.steps, dev), n)
            say(f"teacher fwd+bwd (batch {n}): {rec['tokens_per_s']:,.0f} tok/s, peak {rec['peak_gib']:.1f} GiB",
                flush=True)  # fmt: skip
        except torch.OutOfMemoryError:
            rec = {"oom": True, "batch": n}
            timer.spans = []
            teacher.zero_grad(set_to_none=True)
            say(f"teacher fwd+bwd (batch {n}): out of memory", flush=True)
        base_data.close()
        results["baseline_by_batch"][key] = rec
        if n == first["batch"]:
            results["baseline_teacher_fwd_bwd"] = rec  # the first variant's batch (1 by default), as before
        teacher.requires_grad_(False)
        if cuda:
            torch.cuda.empty_cache()
        write()
        return rec if "tokens_per_s" in rec else None

    for vname, var in variants:
        vres: dict[str, Any] = {"config": var, "stages": {}}
        results["variants"][vname] = vres
        baseline_at(var["batch"])  # like with like: measured before the first variant at a new batch
        for name, defaults_ in STAGE_DEFAULTS.items():
            if name not in var["stages"].split(","):
                continue
            if over_budget():
                vres["stages"][name] = {"skipped": "time budget"}
                continue
            e2e = defaults_["mode"] == "end_to_end"
            policy = policy_of(var["ckpt_e2e"] if e2e else var["ckpt"])
            student = convert_model(teacher, MateConfig(ssd_backend=var["ssd"]), seed=0)
            # the student's tower is a module of its own (holding the teacher's tensors): switched as distill does
            fast_vision(student, args.fast_vision)
            loss = LossConfig(**{**defaults_.get("loss", {}), "kl_backend": var["kl"]})
            if name == "stage3":
                inject_lora(student, LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                                                  dropout=args.lora_dropout))  # fmt: skip
                student.to(dev)
            trainable = sum(p.numel() for _, p in set_trainable(student, defaults_["train"]))
            student.train()
            s_layers = student.family.decoder_layers(student)
            if e2e:
                recompute.apply_end_to_end(student, s_layers, policy)
            par = parallel.strategy(args.strategy, world)
            par.prepare(student)  # FSDP: shards the trainable modules
            params = [p for p in student.parameters() if p.requires_grad]
            objective = par.wrap(
                LayerwiseObjective(student, loss, policy)
                if not e2e
                else EndToEndObjective(student, loss, bool(var["share_embeds"]))
            )
            opt = torch.optim.AdamW(params, lr=1e-5, **optimizer_flags(var["optimizer"]))
            n = var["batch"]
            layout = student.token_layout(**{k: v.to(dev) for k, v in host_batch_of(n).items()})
            used = var["teacher_keep"] == "used"
            keep: dict[str, Any] = {"keep_embeds": True} if e2e and var["share_embeds"] else {}
            if used and e2e:
                keep.update(keep_inputs=False, keep_layers=hidden_layer_ids(loss, len(s_layers)))
            want_logits = bool(loss.kl) if used else True
            data = Data(host_batch_of(n), dev, args.frames, args.resolution, var["data"], var["prefetch"], n)
            step = make_step(teacher, layers, data, objective, opt, params, layout, defaults_["mode"], dev,
                             timer, keep, want_logits)  # fmt: skip
            try:
                with timed_losses(timer):
                    rec = rate(measure(step, timer, args.steps, dev), n)
                rec.update(
                    ssd_backend=last_ssd_backend(),
                    kl_backend=last_kl_backend() if loss.kl else None,
                    trainable_params=trainable,
                    checkpointing=policy,
                )
            except torch.OutOfMemoryError:
                rec = {"oom": True, "checkpointing": policy, "batch": n}
                timer.spans = []
            except Exception as exc:  # noqa: BLE001 (one broken variant must not lose the others' numbers)
                rec = {"error": f"{type(exc).__name__}: {exc}"[:500], "checkpointing": policy, "batch": n}
                timer.spans = []
                say(f"[{vname}] {name} failed: {rec['error']}", flush=True)
            data.close()
            if world > 1:  # slowest step time and largest peak over the processes
                stats = torch.tensor(
                    [rec.get("s_per_step", float("inf")), rec.get("peak_gib", 0.0)], device=dev
                )
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                if "oom" not in rec and stats[0].isfinite():
                    rec.update(s_per_step=float(stats[0]), peak_gib=float(stats[1]))
                    rate(rec, n)
                else:
                    rec = {"oom": True, "batch": n}
            vres["stages"][name] = rec
            shown = {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k != "phases_s"
            }
            say(f"[{vname}] {name}: {shown}", flush=True)
            if "phases_s" in rec:
                say("    " + ", ".join(f"{k} {v:.3f}" for k, v in rec["phases_s"].items()), flush=True)
            del student, objective, opt, step, data
            if cuda:
                torch.cuda.empty_cache()
            write()
        base = results["baseline_by_batch"].get(str(var["batch"]), {})
        base = base if "tokens_per_s" in base else None
        base1 = results["baseline_by_batch"].get("1", {})
        for rec in vres["stages"].values():
            if base and "tokens_per_s" in rec:
                # the baseline as issue 17 defines it: teacher compute only, no data phase
                ref = base["tokens_per_s_without_data"]
                rec["over_baseline"] = rec["tokens_per_s"] / ref
                rec["over_baseline_without_data"] = rec["tokens_per_s_without_data"] / ref
                if var["batch"] != 1 and "tokens_per_s_without_data" in base1:
                    # against the one-sample teacher: what batching gains over the batch-1 reference
                    rec["over_baseline_batch1"] = rec["tokens_per_s"] / base1["tokens_per_s_without_data"]
        s3 = vres["stages"].get("stage3", {})
        if "over_baseline" in s3:
            vres["stage3_over_baseline"] = s3["over_baseline"]
            say(f"[{vname}] stage3 throughput / teacher fwd+bwd (batch {var['batch']}) = {s3['over_baseline']:.2f}",
                flush=True)  # fmt: skip
    results["stages"] = results["variants"][variants[0][0]]["stages"]  # the first variant, as before
    if "stage3_over_baseline" in results["variants"][variants[0][0]]:
        results["stage3_over_baseline"] = results["variants"][variants[0][0]]["stage3_over_baseline"]
    results["fast_vision_info"] = vision_record(fast_info)  # with the plans used and any compile failure
    results["wall_s"] = time.perf_counter() - t_start
    write()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

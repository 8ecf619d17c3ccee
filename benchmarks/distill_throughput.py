"""Distillation throughput and peak memory per stage at a real shape (random weights), on one GPU or several.

    python benchmarks/distill_throughput.py --arch qwen2-vl-7b --frames 64 --steps 4 --json out.json
    torchrun --nproc_per_node 2 benchmarks/distill_throughput.py --strategy fsdp --checkpointing --json out.json

One step = the frozen teacher's pass + the stage objective's forward/backward + the optimizer step, exactly as
`linmu distill` runs it (same objectives, same parameter groups, bf16 autocast, float32 master weights). The
baseline is a plain teacher forward+backward on the same tokens (gradients for every decoder weight, no
optimizer), so "stage 3 / baseline" is the distillation overhead ratio the distill issue asks for.

Under torchrun each process trains on a sample of the same shape (the same random values on every rank: the
speed does not depend on them), data parallel through `linmu_cli.distillation.parallel` (DDP, or FSDP2 of the
trainable modules) as `linmu distill` does; tokens/s counts all processes' tokens from the slowest process's step
time, peak memory is the largest over the GPUs. The baseline runs with one process only.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from linmu_cli.archs import build_random_model
from linmu_cli.config import MateConfig
from linmu_cli.distillation import parallel
from linmu_cli.distillation.objectives import EndToEndObjective, LayerwiseObjective, run_teacher
from linmu_cli.distillation.recipe import STAGE_DEFAULTS, LoraSettings, LossConfig
from linmu_cli.distillation.trainer import inject_lora, set_trainable
from linmu_cli.models import convert_model
from linmu_cli.ops import last_ssd_backend


def video_batch(config, frames: int, resolution: int, text: int, device) -> dict:
    """Processor-shaped inputs for one video of `frames` frames at `resolution`^2 plus `text` text tokens."""
    patch, merge, tp = config.vision_config.patch_size, config.vision_config.spatial_merge_size, 2
    gt, gh, gw = frames // tp, resolution // patch, resolution // patch
    n_vis = gt * (gh // merge) * (gw // merge)
    ids = torch.randint(0, min(10_000, config.vision_start_token_id), (1, text + n_vis + 2))
    ids[0, text // 2] = config.vision_start_token_id
    ids[0, text // 2 + 1 : text // 2 + 1 + n_vis] = config.video_token_id
    ids[0, text // 2 + 1 + n_vis] = config.vision_end_token_id
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": (2 * (ids == config.video_token_id)).to(device),
        "pixel_values_videos": torch.randn(gt * gh * gw, 3 * tp * patch * patch, device=device),
        "video_grid_thw": torch.tensor([[gt, gh, gw]], device=device),
    }


def timed(fn, steps: int) -> tuple[float, float]:
    cuda = torch.cuda.is_available()
    fn()  # warm-up (Triton compile / autotune)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def make_step(teacher, layers, batch, objective, opt, layout, mode: str, dev):  # objective: wrapped
    """One distillation step as `linmu distill` runs it: teacher pass, objective forward/backward, update."""

    def step():
        tp = run_teacher(teacher, layers, batch, want_logits=mode == "end_to_end")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = objective(tp, layout) if mode == "layerwise" else objective(batch, tp, layout)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-7b")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every stage")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with torchrun: how to split")
    ap.add_argument("--stages", default="stage1,stage2,stage3", help="comma-separated stages to measure")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")  # cpu: --arch tiny-*
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    teacher = build_random_model(args.arch, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    teacher.requires_grad_(False)
    batch = video_batch(teacher.config, args.frames, args.resolution, 64, dev)
    tokens = batch["input_ids"].numel()
    layers = teacher.model.language_model.layers
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    results = {"arch": args.arch, "tokens": tokens, "frames": args.frames, "gpu": gpu, "processes": world,
               "strategy": args.strategy if world > 1 else "single", "checkpointing": args.checkpointing,
               "torch": torch.__version__, "stages": {}}  # fmt: skip
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{args.arch}: {tokens} tokens per sample x {world} process(es)", flush=True)

    # baseline: teacher forward + backward, gradients for every decoder weight (one process only)
    for p in layers.parameters() if world == 1 else []:
        p.requires_grad_(True)

    def baseline():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = teacher(**batch, use_cache=False).logits
        logits.float().square().mean().backward()
        teacher.zero_grad(set_to_none=True)

    if world == 1:
        sec, mem = timed(baseline, args.steps)
        results["baseline_teacher_fwd_bwd"] = {
            "s_per_step": sec,
            "tokens_per_s": tokens / sec,
            "peak_gib": mem,
        }
        say(f"teacher fwd+bwd: {tokens / sec:,.0f} tok/s, peak {mem:.1f} GiB", flush=True)
    teacher.requires_grad_(False)
    torch.cuda.empty_cache()

    for name, defaults in STAGE_DEFAULTS.items():
        if name not in args.stages.split(","):
            continue
        student = convert_model(teacher, MateConfig(), seed=0)
        loss = LossConfig(**defaults.get("loss", {}))
        if name == "stage3":
            inject_lora(student, LoraSettings())
            student.to(dev)
        trainable = sum(p.numel() for _, p in set_trainable(student, defaults["train"]))
        student.train()
        if args.checkpointing and defaults["mode"] == "end_to_end":
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        par = parallel.strategy(args.strategy, world)
        par.prepare(student)  # FSDP: shards the trainable modules
        params = [p for p in student.parameters() if p.requires_grad]
        objective = par.wrap(
            LayerwiseObjective(student, loss, args.checkpointing)
            if defaults["mode"] == "layerwise"
            else EndToEndObjective(student, loss)
        )
        opt = torch.optim.AdamW(params, lr=1e-5)
        layout = student.token_layout(**batch)

        step = make_step(teacher, layers, batch, objective, opt, layout, defaults["mode"], dev)

        try:
            sec, mem = timed(step, args.steps)
            rec = {"s_per_step": sec, "tokens_per_s": world * tokens / sec, "peak_gib": mem,
                   "ssd_backend": last_ssd_backend(), "trainable_params": trainable}  # fmt: skip
        except torch.OutOfMemoryError:
            rec = {"oom": True}
        if world > 1:  # slowest step time and largest peak over the processes
            stats = torch.tensor([rec.get("s_per_step", float("inf")), rec.get("peak_gib", 0.0)], device=dev)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            if "oom" not in rec and stats[0].isfinite():
                rec.update(s_per_step=float(stats[0]), tokens_per_s=world * tokens / float(stats[0]),
                           peak_gib=float(stats[1]))  # fmt: skip
            else:
                rec = {"oom": True}
        results["stages"][name] = rec
        say(f"{name}: {rec}", flush=True)
        del student, objective, opt, step
        torch.cuda.empty_cache()
    s3, base = results["stages"].get("stage3", {}), results.get("baseline_teacher_fwd_bwd")
    if "tokens_per_s" in s3 and base:
        results["stage3_over_baseline"] = s3["tokens_per_s"] / base["tokens_per_s"]
        say(f"stage3 throughput / teacher fwd+bwd = {results['stage3_over_baseline']:.2f}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

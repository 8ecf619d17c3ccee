"""Train a small Qwen2-VL teacher from scratch on linmu's synthetic image and video tasks.

    python evals/train_teacher.py --out evals/teacher

The model is transformers' own `Qwen2VLForConditionalGeneration` at a few million parameters (real layout: patch
14, spatial merge 2, temporal patch 2, M-RoPE, GQA, head_dim 64) with linmu's tiny tokenizer and processor. It
trains on an endless, seeded stream of `linmu_cli.data.synthetic` samples in exactly the chat format that
`linmu distill` feeds it (`linmu_cli.distillation.data.to_inputs`: user question + assistant answer), with the loss on
the answer tokens and the closing `<|im_end|>` only. Each batch has one frame count, drawn from `--frames`
(default 8 to 64 frames), so the teacher works on long videos too. Held-out accuracy is greedy `generate` on
another seed (by default that of the `evals/` lmms-eval data), exact match after lowercase/strip, at 16, 32 and 64
frames; it is written with the command, seed and timings to `<out>/train_teacher.json`.

Runs are deterministic for a given `--seed` and `--threads` (the thread count fixes CPU reduction orders).
"""

from __future__ import annotations

import os

# Threads that spin while they wait make every op crawl when the cores are shared (measured 30x slower);
# must be set before torch (OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from linmu_cli.data import synthetic
from linmu_cli.distillation.data import Example, to_inputs
from linmu_cli.io import atomic_directory
from linmu_cli.tiny import build_tiny_teacher

TASKS = list(synthetic.TASKS)
EVAL_FRAMES = (16, 32, 64)


def model_config(args) -> dict:
    """`tiny_config` overrides: a GQA decoder with realistic head_dim and the real vision layout."""
    head_dim = args.head_dim
    text = {
        "hidden_size": args.heads * head_dim,
        "intermediate_size": args.intermediate or 3 * args.heads * head_dim,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
    }
    if args.rope_theta:
        half = head_dim // 2
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen2-VL's 2:3:3
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": args.rope_theta,
            "mrope_section": section,
        }
    vision = {
        "embed_dim": args.vision_dim,
        "depth": args.vision_depth,
        "num_heads": args.vision_dim // 64,
        "mlp_ratio": 4,
    }
    return {**text, "vision_config": vision}


def parse_frames(spec: str) -> list[int]:
    """'8-64' -> every even count from 8 to 64; '16,32' -> those counts."""
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        counts = list(range(lo + lo % 2, hi + 1, 2))
    else:
        counts = [int(x) for x in spec.split(",")]
    if not counts or any(c < 2 or c % 2 for c in counts):
        raise SystemExit(f"--frames {spec!r}: need even frame counts >= 2")
    return counts


def example(task: str, index: int, seed: int, frames: int) -> Example:
    s = synthetic.generate(task, index, seed=seed, frames=frames)
    media = Image.fromarray(s.media) if s.kind == "image" else s.media
    return Example(s.kind, media, s.question, s.answer)


def answer_labels(inputs: dict, examples: list[Example], tokenizer) -> torch.Tensor:
    """Labels = the answer tokens and the `<|im_end|>` after them; the prompt and the final newline are -100.

    With left padding every row ends with `<answer><|im_end|>\\n`, so the answer is a suffix of known length.
    """
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, ex in enumerate(examples):
        n = len(tokenizer(ex.answer, add_special_tokens=False).input_ids)
        span = ids[row, -(n + 2) : -1]
        if span[-1].item() != im_end:
            raise RuntimeError(
                f"unexpected chat layout at the end of row {row}: {ids[row, -(n + 3) :].tolist()}"
            )
        labels[row, -(n + 2) : -1] = span
    return labels


def make_batch(processor, step: int, batch_size: int, seed: int, frame_counts: list[int], tasks=TASKS):
    """Batch `step` of the training stream: one frame count per batch, tasks round-robin within it."""
    frames = random.Random(seed * 1_000_003 + step).choice(frame_counts)
    examples = []
    for j in range(batch_size):
        i = step * batch_size + j
        examples.append(example(tasks[i % len(tasks)], i // len(tasks), seed, frames))
    inputs = to_inputs(processor, examples, max_tokens=1 << 20)
    inputs["labels"] = answer_labels(inputs, examples, processor.tokenizer)
    return inputs, frames


@torch.no_grad()
def evaluate(model, processor, task: str, seed: int, frames: int, count: int, batch_size: int = 50) -> float:
    """Greedy exact-match accuracy on samples 0..count-1 of `task` from `seed`."""
    was_training = model.training
    model.eval()
    processor.tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, count, batch_size):
        samples = [
            synthetic.generate(task, i, seed=seed, frames=frames)
            for i in range(start, min(count, start + batch_size))
        ]
        prompts, media = [], []
        for s in samples:
            msgs = [{"role": "user", "content": [{"type": s.kind}, {"type": "text", "text": s.question}]}]
            prompts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
            media.append(Image.fromarray(s.media) if s.kind == "image" else s.media)
        key = "images" if samples[0].kind == "image" else "videos"
        inputs = processor(text=prompts, padding=True, return_tensors="pt", **{key: media})
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(
            t.strip().lower() == s.answer.strip().lower() for t, s in zip(texts, samples, strict=True)
        )
    model.train(was_training)
    return correct / count


def evaluate_all(model, processor, seed: int, frames_list, count: int) -> dict[str, dict[str, float]]:
    return {
        str(f): {
            t: evaluate(model, processor, t, seed, f, count) for t in TASKS if f == 16 or t != "image_color"
        }
        for f in frames_list
    }


class LayoutProbes(torch.nn.Module):
    """Auxiliary self-supervised heads (training only, not saved): where each visual token sits.

    The task answers depend on where a block is (which quadrant, which frame pair), but Qwen2-VL's vision tower
    has no absolute position embedding and at this tiny grid (2x2 merged tokens) M-RoPE's spatial frequencies are
    too low to tell neighbours apart, so from the answer loss alone the model takes very long to discover
    positions. Two linear probes supply that signal directly: the quadrant of every merged vision token (from the
    vision tower's output) and the frame-pair index of every video token (from a middle decoder layer).
    """

    def __init__(self, hidden: int, max_pairs: int, layer: int):
        super().__init__()
        self.quadrant = torch.nn.Linear(hidden, 4)
        self.time = torch.nn.Linear(hidden, max_pairs)
        self.layer, self.max_pairs = layer, max_pairs
        self.vision_out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attach(self, model) -> None:
        def hook(_module, args, kwargs, output):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self.vision_out.append((output.pooler_output, grid))

        model.model.visual.register_forward_hook(hook, with_kwargs=True)

    @staticmethod
    def _layout(grid: torch.Tensor, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(quadrant, frame-pair index) of every merged token of every item of `grid` (T, H, W per item)."""
        quads, times = [], []
        for t, h, w in grid.tolist():
            h, w = h // merge, w // merge
            rows = torch.arange(h).repeat_interleave(w).repeat(t)
            cols = torch.arange(w).repeat(h * t)
            quads.append((rows >= h / 2).long() * 2 + (cols >= w / 2).long())
            times.append(torch.arange(t).repeat_interleave(h * w))
        return torch.cat(quads), torch.cat(times)

    def loss(self, inputs: dict, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        losses = []
        for feats, grid in self.vision_out:
            quad, _ = self._layout(grid)
            losses.append(torch.nn.functional.cross_entropy(self.quadrant(feats), quad))
        self.vision_out.clear()
        if inputs.get("video_grid_thw") is not None:
            _, time_idx = self._layout(inputs["video_grid_thw"])
            video = hidden_states[self.layer][inputs["mm_token_type_ids"] == 2]
            losses.append(
                torch.nn.functional.cross_entropy(self.time(video), time_idx.clamp(max=self.max_pairs - 1))
            )
        return sum(losses) / len(losses)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (replaced atomically at the end)")
    p.add_argument("--seed", type=int, default=0, help="init and training-stream seed")
    p.add_argument("--eval-seed", type=int, default=12345, help="held-out seed (default: that of evals/data)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--frames", default="8-64", help="training frame counts: 'LO-HI' (even counts) or 'A,B,...'"
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="query heads (hidden size = heads x head_dim)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (default 3 x hidden)")
    p.add_argument("--rope-theta", type=float, default=0.0, help="M-RoPE base (default: tiny_config's 1e6)")
    p.add_argument("--vision-dim", type=int, default=128, help="vision width (heads of 64)")
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument(
        "--aux-weight",
        type=float,
        default=0.5,
        help="weight of the layout probes' loss (0: answer loss only)",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated synthetic tasks to train on")
    p.add_argument("--eval-count", type=int, default=100, help="held-out samples per task and frame count")
    p.add_argument(
        "--eval-every", type=int, default=250, help="quick held-out check every N steps (0: never)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for reproducibility)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    frame_counts = parse_frames(args.frames)
    tasks = args.tasks.split(",")
    model_cfg = model_config(args)
    model, processor = build_tiny_teacher("qwen2_vl", seed=args.seed, **model_cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Qwen2VLForConditionalGeneration: {n_params / 1e6:.2f}M parameters, frames {frame_counts}",
        flush=True,
    )

    probes = LayoutProbes(model.config.text_config.hidden_size, max(frame_counts) // 2, args.layers // 2)
    probes.attach(model)
    params = [*model.named_parameters(), *(("probe." + n, p) for n, p in probes.named_parameters())]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    start = time.time()
    running = running_aux = 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        inputs, frames = make_batch(processor, step, args.batch_size, args.seed, frame_counts, tasks)
        out = model(**inputs, output_hidden_states=args.aux_weight > 0)
        loss = out.loss
        aux = probes.loss(inputs, out.hidden_states) if args.aux_weight > 0 else torch.zeros(())
        probes.vision_out.clear()
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        running_aux = aux.item() if step == 0 else 0.95 * running_aux + 0.05 * aux.item()
        if (step + 1) % 25 == 0 or step == 0:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{args.steps} loss {running:.4f} aux {running_aux:.3f} frames {frames} "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            quick = {t: evaluate(model, processor, t, args.eval_seed, 16, 40) for t in tasks}
            print(f"  held-out @16 frames (40/task): {json.dumps(quick)}", flush=True)
    train_s = time.time() - start

    model.eval()
    print("final held-out evaluation ...", flush=True)
    accuracy = evaluate_all(model, processor, args.eval_seed, EVAL_FRAMES, args.eval_count)
    for f, accs in accuracy.items():
        print(f"  {f} frames: " + ", ".join(f"{t} {a:.2f}" for t, a in accs.items()), flush=True)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_frames": frame_counts,
        "threads": args.threads,
        "aux_weight": args.aux_weight,
        "parameters": n_params,
        "model": model_cfg,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - start, 1),
        "eval_count_per_task": args.eval_count,
        "heldout_accuracy": accuracy,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    with atomic_directory(Path(args.out), force=args.force) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "train_teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out} ({report['wall_seconds'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

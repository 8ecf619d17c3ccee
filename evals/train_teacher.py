"""Train a small Qwen2-VL teacher from scratch on linmu's synthetic image and video tasks.

    python evals/train_teacher.py --out evals/teacher                      # CPU: 3,000 steps, ~35 min
    python evals/train_teacher.py --out t --workers 8 --time-budget 230     # a GPU: what fits in 230 s

The committed `evals/teacher` came from the command in its README.md (3 min on one H200).

The model is transformers' own `Qwen2VLForConditionalGeneration` at a few million parameters (real layout: patch
14, spatial merge 2, temporal patch 2, M-RoPE, GQA, head_dim 64) with linmu's tiny tokenizer and processor. It
trains on an endless, seeded stream of `linmu_cli.data.synthetic` samples in exactly the chat format that
`linmu distill` feeds it (`linmu_cli.distillation.data.to_inputs`: user question + assistant answer), with the loss on
the answer tokens and the closing `<|im_end|>` only. Each batch has one frame count, drawn from `--frames`
(default 8 to 64 frames), so the teacher works on long videos too. Held-out accuracy is greedy `generate` on
another seed (by default that of the `evals/` lmms-eval data), exact match as the lmms-eval tasks score it
(`linmu_cli.evaluation.answers`), at 16, 32 and 64 frames; it is written with the command, seed and timings to
`<out>/train_teacher.json`.

Runs are deterministic on a CPU for a given `--seed` and `--threads` (the thread count fixes reduction orders);
`--workers` only builds batches ahead and changes nothing. On a GPU, expect the same accuracy, not identical bits.
"""

from __future__ import annotations

import os

# Threads that spin while they wait make every op crawl when the cores are shared (measured 30x slower);
# must be set before torch (OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from linmu_cli.data import synthetic
from linmu_cli.distillation.data import Example, to_inputs
from linmu_cli.evaluation.answers import exact_match
from linmu_cli.evaluation.greedy import greedy_answers
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


def example(task: str, index: int, seed: int, frames: int, distractors: float = 1.0) -> Example:
    """Sample `index` of `task`; for `image_color`, each block that is not asked about is kept with
    probability `distractors` (else painted over with fresh background): the early-training curriculum."""
    s = synthetic.generate(task, index, seed=seed, frames=frames)
    media = s.media
    if task == "image_color" and distractors < 1.0:
        rng = np.random.default_rng([seed, index, 1])
        asked = next(q for q, name in enumerate(synthetic.QUADRANTS) if f" {name} " in s.question)
        media = media.copy()
        h, w = media.shape[0] // 2, media.shape[1] // 2
        for q in range(4):
            if q != asked and rng.random() >= distractors:
                top, left = (q // 2) * h, (q % 2) * w
                media[top : top + h, left : left + w] = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    media = Image.fromarray(media) if s.kind == "image" else media
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


def make_batches(step: int, args, processor, frame_counts: list[int], tasks: list[str], distractors: float):
    """Step `step` of the training stream: an image batch and a video batch (one frame count), so short image
    sequences are not padded to the length of the videos. Tasks go round-robin within each batch."""
    frames = random.Random(args.seed * 1_000_003 + step).choice(frame_counts)
    batches = []
    for kind_tasks, size in (
        ([t for t in tasks if t == "image_color"], args.image_batch),
        ([t for t in tasks if t != "image_color"], args.video_batch),
    ):
        if not kind_tasks or size <= 0:
            continue
        examples = []
        for j in range(size):
            i = step * size + j
            task = kind_tasks[i % len(kind_tasks)]
            examples.append(example(task, i // len(kind_tasks), args.seed, frames, distractors))
        inputs = to_inputs(processor, examples, max_tokens=1 << 20)
        inputs["labels"] = answer_labels(inputs, examples, processor.tokenizer)
        batches.append((inputs, size))
    return batches, frames


class TrainStream(torch.utils.data.Dataset):
    """Step i -> (batches, frames) of `make_batches`; a map-style dataset so that DataLoader workers build
    batches ahead of the model while step i stays exactly the same batch whatever the number of workers."""

    def __init__(self, args, processor, frame_counts: list[int], tasks: list[str]):
        self.args, self.processor, self.frame_counts, self.tasks = args, processor, frame_counts, tasks

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int):
        lo, hi = self.args.curriculum
        distractors = min(1.0, max(0.0, (step - lo) / max(1, hi - lo)))
        return make_batches(step, self.args, self.processor, self.frame_counts, self.tasks, distractors)


@torch.no_grad()
def evaluate(model, processor, task: str, seed: int, frames: int, count: int, batch_size: int = 50) -> float:
    """Greedy exact-match accuracy (`exact_match`: the lmms-eval tasks' rule) on samples 0..count-1 of `task`."""
    samples = [synthetic.generate(task, i, seed=seed, frames=frames) for i in range(count)]
    replies = greedy_answers(model, processor, samples, batch_size=batch_size)
    return sum(exact_match(r, s.answer) for r, s in zip(replies, samples, strict=True)) / count


def evaluate_all(model, processor, seed: int, frames_list, count: int) -> dict[str, dict[str, float]]:
    return {
        str(f): {
            t: evaluate(model, processor, t, seed, f, count) for t in TASKS if f == 16 or t != "image_color"
        }
        for f in frames_list
    }


VISION_ATTENTION = "batched_flash_varlen_frames"  # "flash" in the name routes cu_seqlens to it (see below)


def batched_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, **kwargs):  # fmt: skip
    """Qwen2-VL's vision attention (full attention within each frame pair) as one batched SDPA call.

    Without flash-attn, transformers runs one SDPA call per frame pair (a Python loop over `cu_seqlens`): with
    40 videos of 32 frame pairs that is 1,280 calls per layer and most of a training step. Here every chunk has
    the same length (one frame pair = 4x4 patches), so the chunks become a batch; the result is the same
    attention. transformers hands `cu_seqlens` only to implementations whose name contains "flash". Used only
    while training; the saved config says "sdpa".
    """
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    _, heads, seq, dim = query.shape
    if len(set(lengths)) == 1:
        n = lengths[0]
        q, k, v = (t.reshape(heads, seq // n, n, dim).transpose(0, 1) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        return out.permute(0, 2, 1, 3).reshape(1, seq, heads, dim), None
    outs = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)), strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def use_vision_attention(model, name: str) -> None:
    from transformers import AttentionInterface

    if name == VISION_ATTENTION:
        AttentionInterface.register(VISION_ATTENTION, batched_vision_attention)
    model.config.vision_config._attn_implementation = name
    model.model.visual.config._attn_implementation = name


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
        self.part = torch.nn.Linear(hidden, 3)
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

    @staticmethod
    def _parts(grid: torch.Tensor, merge: int = 2) -> torch.Tensor:
        """Beginning / middle / end (0, 1, 2) of every video token's frame pair, cut as `video_when` cuts."""
        parts = []
        for t, h, w in grid.tolist():
            bounds = [round(t * i / 3) for i in range(4)]
            part = torch.tensor([max(p for p in range(3) if bounds[p] <= i) for i in range(t)])
            parts.append(part.repeat_interleave((h // merge) * (w // merge)))
        return torch.cat(parts)

    def loss(self, inputs: dict, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        losses = []
        for feats, grid in self.vision_out:
            quad, _ = self._layout(grid)
            quad = quad.to(feats.device)
            losses.append(torch.nn.functional.cross_entropy(self.quadrant(feats), quad))
        self.vision_out.clear()
        if inputs.get("video_grid_thw") is not None:
            _, time_idx = self._layout(inputs["video_grid_thw"])
            time_idx = time_idx.to(hidden_states[self.layer].device)
            video = hidden_states[self.layer][inputs["mm_token_type_ids"] == 2]
            losses.append(
                torch.nn.functional.cross_entropy(self.time(video), time_idx.clamp(max=self.max_pairs - 1))
            )
            parts = self._parts(inputs["video_grid_thw"]).to(video.device)
            losses.append(torch.nn.functional.cross_entropy(self.part(video), parts))
        return sum(losses) / len(losses)


def reproduce_command(argv: list[str], steps: int) -> str:
    """The command line that repeats this run: --time-budget replaced by the --steps it came to."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--time-budget", "--steps", "--out", "--force") or a.startswith(
            ("--time-budget=", "--steps=", "--out=")
        ):
            skip = a in ("--time-budget", "--steps", "--out")
        else:
            out.append(a)
    return "python evals/train_teacher.py --out evals/teacher " + " ".join(
        shlex.quote(a) for a in [*out, "--steps", str(steps)]
    )


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def readme(report: dict) -> str:
    """evals/teacher/README.md, written from train_teacher.json."""
    cfg, vision = report["model"], report["model"]["vision_config"]
    frames = list(report["heldout_accuracy"])
    rows = [f"| task | {' | '.join(f'{f} frames' for f in frames)} |", "|---|" + "---|" * len(frames)]
    for task in TASKS:
        cells = [report["heldout_accuracy"][f].get(task) for f in frames]
        rows.append(f"| {task} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return f"""# Small Qwen2-VL teacher trained on linmu's synthetic tasks

A teacher with real skill for `linmu distill` / `linmu eval` without downloading a VLM: transformers' own
`Qwen2VLForConditionalGeneration` ({report["parameters"] / 1e6:.1f}M parameters) with linmu's tiny tokenizer and
processor, trained from scratch on `linmu_cli.data.synthetic` by `evals/train_teacher.py`:

    {report["command"]}

({report["train_seconds"] / 60:.0f} min on {report["device"]} ({report["threads"]} CPU threads), seed {report["seed"]}, torch {report["torch"]},
transformers {report["transformers"]}; all details in `train_teacher.json`.)

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("evals/teacher")
processor = AutoProcessor.from_pretrained("evals/teacher")
```

## Architecture

- Decoder: {cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, {cfg["num_attention_heads"]} query heads and
  {cfg["num_key_value_heads"]} key/value heads of dim {cfg["hidden_size"] // cfg["num_attention_heads"]} (GQA), MLP
  {cfg["intermediate_size"]}, M-RoPE with Qwen2-VL's 2:3:3 section split.
- Vision: {vision["depth"]} blocks of width {vision["embed_dim"]} ({vision["num_heads"]} heads), the real layout (patch 14,
  spatial merge 2, temporal patch 2): a 56x56 frame pair is 2x2 merged tokens, one per quadrant.

## Training

{report["steps"]} AdamW steps (lr {report["lr"]}, cosine), each an image batch of {report["image_batch"]} `image_color` samples
and a video batch of {report["video_batch"]} `video_count` / `video_order` / `video_when` samples with one frame count
drawn from {min(report["train_frames"])}-{max(report["train_frames"])} frames, in exactly the chat format of
`linmu distill` (`linmu_cli.distillation.data.to_inputs`); the loss is on the answer tokens and `<|im_end|>` only.
Two things make the positional tasks learnable in minutes (both only shape training; the model is unchanged):

- layout probes (weight {report["aux_weight"]}): linear heads, discarded after training, that predict the quadrant of
  every merged vision token from the vision tower's output, and the frame-pair index and the third of the video
  (beginning / middle / end) of every video token from decoder layer {cfg["num_hidden_layers"] // 2}. Qwen2-VL's vision tower has no absolute position embedding, and on a 2x2
  token grid M-RoPE's spatial frequencies cannot tell neighbours apart, so from the answer loss alone the model
  takes very long to find out where a block is;
- an `image_color` curriculum: the blocks that are not asked about fade in from step {report["curriculum"][0]}
  (none) to step {report["curriculum"][1]} (all), so the model first learns to read a block's colour, then to pick
  the block that was asked about.

## Held-out accuracy

Greedy decoding, exact match (case, punctuation, spacing ignored), {report["eval_count_per_task"]} samples per task of seed
{report["eval_seed"]} (the seed of the `evals/` lmms-eval data; training used seed {report["seed"]}):

{chr(10).join(rows)}

`image_color` stays below the video tasks' 90%: the model reads colours well but still confuses quadrants in a
share of the images, and its margins there are small (the same weights score 0.74 on a CPU, where float rounding
differs, against 0.84 on the GPU that trained them). The video tasks, the ones that need global context, clear
it at every length. `tests/evals/test_teacher.py` loads this directory and checks it on samples of another seed.

Retraining with the command above on a CPU with the same torch / transformers versions and thread count gives the
same weights; on a GPU, float atomics in the backward pass make runs differ in the last bits, so expect the same
accuracy, not the same `model.safetensors` (sha256 in `train_teacher.json`).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (replaced atomically at the end)")
    p.add_argument("--seed", type=int, default=0, help="init and training-stream seed")
    p.add_argument("--eval-seed", type=int, default=12345, help="held-out seed (default: that of evals/data)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (the most, with --time-budget)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds of training: after 50 steps, --steps becomes what fits (the report records it, so "
        "`--steps N` without a budget repeats the run); 0: none",
    )
    p.add_argument("--image-batch", type=int, default=8, help="image_color samples per step")
    p.add_argument(
        "--video-batch", type=int, default=12, help="video samples per step (video tasks round-robin)"
    )
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
    p.add_argument(
        "--curriculum",
        type=int,
        nargs=2,
        default=(200, 2000),
        metavar=("START", "END"),
        help="image_color distractor blocks fade in from step START (none) to END (all)",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated synthetic tasks to train on")
    p.add_argument("--eval-count", type=int, default=100, help="held-out samples per task and frame count")
    p.add_argument(
        "--eval-every", type=int, default=500, help="quick held-out check every N steps (0: never)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for reproducibility)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument(
        "--workers", type=int, default=0, help="processes that build batches ahead of the model (0: inline)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    frame_counts = parse_frames(args.frames)
    tasks = args.tasks.split(",")
    model_cfg = model_config(args)
    model, processor = build_tiny_teacher("qwen2_vl", seed=args.seed, **model_cfg)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model.to(device).train()
    use_vision_attention(model, VISION_ATTENTION)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Qwen2VLForConditionalGeneration: {n_params / 1e6:.2f}M parameters, frames {frame_counts}",
        flush=True,
    )

    probes = LayoutProbes(model.config.text_config.hidden_size, max(frame_counts) // 2, args.layers // 2)
    probes.to(device).attach(model)
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
    stream = TrainStream(args, processor, frame_counts, tasks)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        shuffle=False,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
    )
    for step, (batches, frames) in enumerate(loader):
        if step == args.steps:
            break
        if args.time_budget and step == 50:  # still in warm-up (lr does not depend on --steps yet)
            per_step = (time.time() - start) / 50
            args.steps = max(51, min(args.steps, int(0.95 * args.time_budget / per_step)))
            print(
                f"time budget {args.time_budget:.0f} s at {per_step:.3f} s/step: {args.steps} steps",
                flush=True,
            )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batches = [({k: v.to(device) for k, v in inputs.items()}, n) for inputs, n in batches]
        total = sum(n for _, n in batches)
        opt.zero_grad(set_to_none=True)
        loss_sum = aux_sum = 0.0
        for inputs, n in batches:  # gradient accumulation, each batch weighted by its number of samples
            out = model(**inputs, output_hidden_states=args.aux_weight > 0)
            aux = probes.loss(inputs, out.hidden_states) if args.aux_weight > 0 else torch.zeros(())
            probes.vision_out.clear()
            ((out.loss + args.aux_weight * aux) * (n / total)).backward()
            loss_sum += out.loss.item() * n / total
            aux_sum += aux.item() * n / total
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss_sum if step == 0 else 0.95 * running + 0.05 * loss_sum
        running_aux = aux_sum if step == 0 else 0.95 * running_aux + 0.05 * aux_sum
        if (step + 1) % 25 == 0 or step == 0:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{args.steps} loss {running:.4f} aux {running_aux:.3f} frames {frames} "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            quick = {t: evaluate(model, processor, t, args.eval_seed, 16, 40) for t in tasks}
            quick.update(
                {f"{t}@64": evaluate(model, processor, t, args.eval_seed, 64, 40) for t in tasks[1:]}
            )
            print(f"  held-out @16 (and @64) frames, 40/task: {json.dumps(quick)}", flush=True)
    train_s = time.time() - start

    model.eval()
    print("final held-out evaluation ...", flush=True)
    accuracy = evaluate_all(model, processor, args.eval_seed, EVAL_FRAMES, args.eval_count)
    for f, accs in accuracy.items():
        print(f"  {f} frames: " + ", ".join(f"{t} {a:.2f}" for t, a in accs.items()), flush=True)
    report = {
        "command": reproduce_command(argv or sys.argv[1:], args.steps),
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "steps": args.steps,
        "image_batch": args.image_batch,
        "video_batch": args.video_batch,
        "lr": args.lr,
        "train_frames": frame_counts,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "aux_weight": args.aux_weight,
        "curriculum": list(args.curriculum),
        "parameters": n_params,
        "model": model_cfg,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - start, 1),
        "eval_count_per_task": args.eval_count,
        "heldout_accuracy": accuracy,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    use_vision_attention(model, "sdpa")
    with atomic_directory(Path(args.out), force=args.force) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        weights = (tmp / "model.safetensors").read_bytes()
        report["model_safetensors"] = {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
        (tmp / "train_teacher.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(report))
    print(f"saved {args.out} ({report['wall_seconds'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

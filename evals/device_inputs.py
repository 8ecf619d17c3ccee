"""Qwen2-VL model inputs whose pixels are normalised and patchified on the model's device, not in the processor.

At 224x224 a 64-frame video is 8,192 patches: the processor's CPU work (rescale, normalise, patchify into
float32, ~0.18 s per video on one core) and the float32 tensors it hands over (38 MB per video) would bound a
GPU training run by its data workers. Here the workers send uint8 frames (4x smaller) and the token ids; the
device does the arithmetic. `check_against_processor` proves on a batch that the result equals the processor's
own output (same keys, same ids, pixel values within float32 rounding), so a model trained on these inputs is
the model `linmu distill` / lmms-eval feed through the processor.

    host = host_batch(processor, examples)          # in a DataLoader worker: ids + uint8 frames
    inputs = device_batch(host, device, processor)  # in the training loop: the processor's dict, on device
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from linmu_cli.data.chat import chat_prompt, question_content

FRAMES_KEY = "frames_uint8"  # (B, T, H, W, 3) uint8; T = 1 for images


def _frames(example: Any) -> np.ndarray:
    media = np.asarray(example.media) if isinstance(example.media, Image.Image) else example.media
    return media[None] if example.kind == "image" else media


def _max_pixels(vp: Any) -> int:
    """The processor's pixel cap (transformers 5.17 and 5.2x keep it in different places)."""
    size = getattr(vp, "size", None) or {}
    cap = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
    return int(cap or getattr(vp, "max_pixels", None) or 1 << 62)


def host_batch(processor: Any, examples: list, with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Token ids (left padded), attention mask, `mm_token_type_ids`, the grid and the uint8 frames of examples of
    one kind and one frame shape; `with_answer` appends the answer and `<|im_end|>` (teacher forcing), else the
    prompt ends with the assistant's generation prompt."""
    kinds = {ex.kind for ex in examples}
    if len(kinds) != 1 or kinds & {"text"}:
        raise ValueError(f"host_batch: one media kind per batch (image or video), got {sorted(kinds)}")
    kind = kinds.pop()
    frames = np.stack([_frames(ex) for ex in examples])  # raises if the shapes differ
    vp = processor.video_processor if kind == "video" else processor.image_processor
    t_patch, patch, merge = vp.temporal_patch_size, vp.patch_size, vp.merge_size
    _, t, h, w, _ = frames.shape
    if h % (patch * merge) or w % (patch * merge) or h * w > _max_pixels(vp):
        raise ValueError(f"host_batch: {h}x{w} frames need the processor's resize; use its own path")
    if kind == "video" and t % t_patch:
        raise ValueError(f"host_batch: {t} frames is not a multiple of the temporal patch {t_patch}")
    grid = [1 if kind == "image" else t // t_patch, h // patch, w // patch]
    pad = processor.image_token if kind == "image" else processor.video_token
    n_tokens = grid[0] * grid[1] * grid[2] // merge**2
    prompts = [
        chat_prompt(processor, question_content(kind, ex.question), answer=ex.answer if with_answer else None)
        for ex in examples
    ]
    prompts = [p.replace(pad, pad * n_tokens, 1) for p in prompts]
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == tok.convert_tokens_to_ids(processor.image_token)] = 1
    types[ids == tok.convert_tokens_to_ids(processor.video_token)] = 2
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": types,
        f"{kind}_grid_thw": torch.tensor([grid] * len(examples)),
        FRAMES_KEY: torch.from_numpy(np.ascontiguousarray(frames)),
    }


def patchify(frames: torch.Tensor, processor: Any, kind: str) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> the processor's flat (B * grid_t * grid_h * grid_w, 3 * t_patch * 14 * 14)
    float32 patches: rescale by 1/255, normalise by the processor's mean / std, then its exact patch layout
    (images repeat their one frame over the temporal patch; videos go pair by pair)."""
    vp = processor.video_processor if kind == "video" else processor.image_processor
    t_patch, patch, merge = vp.temporal_patch_size, vp.patch_size, vp.merge_size
    x = frames.permute(0, 1, 4, 2, 3).float()  # (B, T, C, H, W)
    if kind == "image":
        x = x.expand(-1, t_patch, -1, -1, -1)
    mean = torch.tensor(vp.image_mean, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(vp.image_std, device=x.device).view(1, 1, 3, 1, 1)
    x = (x * vp.rescale_factor - mean) / std
    b, t, c, h, w = x.shape
    gt, gh, gw = t // t_patch, h // patch, w // patch
    x = x.reshape(b, gt, t_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gt * gh * gw, c * t_patch * patch * patch)


def device_batch(
    host: dict[str, torch.Tensor], device: torch.device | str, processor: Any, keep_frames: bool = False
) -> dict:
    """`host_batch`'s output on `device`, with `pixel_values` / `pixel_values_videos` made there (and the uint8
    frames kept under `FRAMES_KEY` with `keep_frames`, for training-only heads that read the pixels)."""
    out = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    frames = out[FRAMES_KEY] if keep_frames else out.pop(FRAMES_KEY)
    kind = "video" if "video_grid_thw" in out else "image"
    out["pixel_values_videos" if kind == "video" else "pixel_values"] = patchify(frames, processor, kind)
    return out


def check_against_processor(processor: Any, examples: list, with_answer: bool = True) -> None:
    """Raise if `device_batch(host_batch(...))` differs from what the processor itself makes of `examples`
    (`linmu_cli.distillation.data.to_inputs`'s call): the guard for a transformers version that changes its
    processor. Runs on the CPU in about a second for a few 224x224 videos."""
    kind = examples[0].kind
    prompts = [
        chat_prompt(processor, question_content(kind, ex.question), answer=ex.answer if with_answer else None)
        for ex in examples
    ]
    processor.tokenizer.padding_side = "left"
    media = (
        {"images": [Image.fromarray(np.asarray(ex.media)) for ex in examples]}
        if kind == "image"
        else {"videos": [ex.media for ex in examples]}
    )
    ref = dict(processor(text=prompts, padding=True, return_tensors="pt", **media))
    got = device_batch(host_batch(processor, examples, with_answer), "cpu", processor)
    if "mm_token_type_ids" not in ref:  # an older processor that does not return them: neither do we
        got.pop("mm_token_type_ids")
    if set(ref) != set(got):
        raise AssertionError(f"device inputs: keys {sorted(got)} != the processor's {sorted(ref)}")
    for key, value in ref.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(
                got[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
            )
        elif not torch.equal(got[key], value):
            raise AssertionError(f"device inputs: {key} differs from the processor's")


__all__ = ["FRAMES_KEY", "check_against_processor", "device_batch", "host_batch", "patchify"]

"""The bench's input: one chat-like prompt around a synthetic video with the real processor's token layout.

Speed depends on shapes, not values, so the pixels and the text ids are random; only the layout (how many
video tokens, where the vision start / end tokens sit, the grid) must be the processor's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
PREFIX_TOKENS, SUFFIX_TOKENS = (
    20,
    15,
)  # chat template + system prompt before the video; question + header after


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name, or one clear error line listing the names."""
    if name not in DTYPES:
        raise LinmuError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class VideoPrompt:
    """The processor-shaped inputs of one prompt and the sizes the reports quote."""

    frames: int
    resolution: int
    video_tokens: int
    inputs: dict[str, torch.Tensor]

    @property
    def lm_tokens(self) -> int:
        """Tokens the language model prefills: the video tokens and the text around them."""
        return self.inputs["input_ids"].shape[1]


def synthetic_video(config: PretrainedConfig, frames: int, resolution: int, device: torch.device,
                    dtype: torch.dtype, seed: int = 0) -> VideoPrompt:  # fmt: skip
    """One chat-like prompt around a video of `frames` random frames of resolution x resolution.

    Shapes are the processor's: `pixel_values_videos` (frames/2 * (H/14) * (W/14), 3 * 2 * 14 * 14),
    `video_grid_thw` [[frames/2, H/14, W/14]], frames/2 * (H/28) * (W/28) video tokens in `input_ids`, plus
    `mm_token_type_ids` and `attention_mask`.
    """
    vc = config.vision_config
    patch, merge, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    grid = (frames // tp, resolution // patch, resolution // patch)
    video_tokens = grid[0] * (grid[1] // merge) * (grid[2] // merge)
    gen = torch.Generator(device=device).manual_seed(seed)
    specials = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id]  # fmt: skip
    vocab = config.get_text_config(decoder=True).vocab_size
    text_hi = min(min(specials), vocab)  # ordinary (BPE) ids sit below the special ones in Qwen vocabularies

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, text_hi, (n,), generator=gen, device=device)

    ids = torch.cat([
        text(PREFIX_TOKENS),
        torch.tensor([config.vision_start_token_id], device=device),
        torch.full((video_tokens,), config.video_token_id, device=device),
        torch.tensor([config.vision_end_token_id], device=device),
        text(SUFFIX_TOKENS),
    ])[None]  # fmt: skip
    pixels = torch.randn(grid[0] * grid[1] * grid[2], channels * tp * patch * patch, generator=gen,
                         device=device).to(dtype)  # fmt: skip
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.video_token_id).long() * 2,
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([grid], device=device),
    }
    return VideoPrompt(frames, resolution, video_tokens, inputs)


__all__ = ["DTYPES", "PREFIX_TOKENS", "SUFFIX_TOKENS", "VideoPrompt", "parse_dtype", "synthetic_video"]

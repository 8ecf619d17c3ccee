"""Real-shape model configs by alias, offline, for random-weight benchmarks (`linmu bench --arch`).

Speed does not depend on trained weights, so `linmu bench --arch qwen2-vl-7b` builds the published architecture
with random weights directly on the target device: no checkpoint, no download.

Sources: the `config.json` files of the Hugging Face repositories named in `ARCHS` (Qwen/Qwen2-VL-2B-Instruct,
Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct), copied field by field
(text sizes, vision tower sizes, special token ids, M-RoPE sections, tie_word_embeddings). docs/design.md §8 lists
the 7B values; `tests/bench/test_bench.py` checks the parameter counts against the published totals on the meta
device. `tiny-qwen2-vl` / `tiny-qwen2.5-vl` are the embedded tiny teachers (`linmu_cli.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from linmu_cli.models.family import Family

# Qwen2-VL / Qwen2.5-VL special token ids (identical in every released size).
_QWEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
_QWEN_TEXT_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}


@dataclass(frozen=True)
class Arch:
    """One published architecture: family, hub id it was copied from, text / vision config fields."""

    family: str  # "qwen2_vl" | "qwen2_5_vl"
    hub_id: str
    text: dict[str, Any]
    vision: dict[str, Any]
    params: int  # published total parameter count (safetensors metadata), for the config check
    top: dict[str, Any] = field(default_factory=dict)


def _text(hidden, inter, layers, heads, kv, vocab, max_pos, tie) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": tie,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        **_QWEN_TEXT_IDS,
    }


def _qwen2_vision(out_hidden: int) -> dict[str, Any]:
    return {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
            "hidden_size": out_hidden, "hidden_act": "quick_gelu", "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2}  # fmt: skip


def _qwen2_5_vision(out_hidden: int) -> dict[str, Any]:
    return {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
            "out_hidden_size": out_hidden, "hidden_act": "silu", "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2}  # fmt: skip


ARCHS: dict[str, Arch] = {
    "qwen2-vl-2b": Arch("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct",
                        _text(1536, 8960, 28, 12, 2, 151936, 32768, True), _qwen2_vision(1536), 2_208_985_600),
    "qwen2-vl-7b": Arch("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct",
                        _text(3584, 18944, 28, 28, 4, 152064, 32768, False), _qwen2_vision(3584), 8_291_375_616),
    "qwen2.5-vl-3b": Arch("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
                          _text(2048, 11008, 36, 16, 2, 151936, 128000, True), _qwen2_5_vision(2048),
                          3_754_622_976),
    "qwen2.5-vl-7b": Arch("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct",
                          _text(3584, 18944, 28, 28, 4, 152064, 128000, False), _qwen2_5_vision(3584),
                          8_292_166_656),
}  # fmt: skip
TINY_ARCHS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}


def known_archs() -> list[str]:
    """Every `--arch` alias: the real shapes, then the tiny teachers."""
    return [*ARCHS, *TINY_ARCHS]


def _family(name: str) -> Family:
    """The registered family of a source model_type: its transformers config and model classes."""
    import linmu_cli.models  # noqa: F401  (importing the family files registers them)
    from linmu_cli.models.family import families

    return families()[name]


def arch_config(alias: str, token_ids: dict[str, int] | None = None) -> PretrainedConfig:
    """The transformers config (Qwen2VLConfig / Qwen2_5_VLConfig) of a real-shape alias.

    `token_ids` replaces the special token ids (image/video/vision start/end, bos/eos/pad), e.g. with those of
    the tiny tokenizer for `random:ALIAS` teachers."""
    if alias not in ARCHS:
        raise LinmuError(f"unknown --arch {alias!r}; known: {', '.join(known_archs())}")
    arch = ARCHS[alias]
    cls = _family(arch.family).config_class
    text = dict(arch.text)
    tie = text.pop("tie_word_embeddings")
    ids = dict(_QWEN_IDS)
    if token_ids:
        ids.update({k: v for k, v in token_ids.items() if k in ids})
        text.update({k: v for k, v in token_ids.items() if k in _QWEN_TEXT_IDS or k == "pad_token_id"})
    return cls(text_config=text, vision_config=dict(arch.vision), tie_word_embeddings=tie, **ids, **arch.top)


def build_random_model(
    alias: str, dtype: torch.dtype, device: torch.device | str, token_ids: dict[str, int] | None = None
) -> nn.Module:
    """The teacher of `alias` with random weights, built directly on `device` in `dtype` (eval mode, SDPA).

    Real shapes are built where they run: on CUDA the parameters are allocated and initialized there (no
    CPU copy of 8B parameters); `device="meta"` gives a weightless model for shape checks. Tiny aliases
    use the embedded tiny teachers (seeded).
    """
    device = torch.device(device)
    if alias in TINY_ARCHS:
        from linmu_cli.tiny import build_tiny_teacher

        model, _ = build_tiny_teacher(TINY_ARCHS[alias], seed=0)
        return model.to(device=device, dtype=dtype).eval()
    config = arch_config(alias, token_ids)
    cls = _family(ARCHS[alias].family).model_class
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


REAL_MAX_PIXELS = 12_845_056  # the released Qwen2-VL / Qwen2.5-VL processors' max_pixels


def build_random_teacher(
    alias: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> tuple[nn.Module, object]:
    """`random:ALIAS`: the real shape of `alias` with seeded random weights, and the tiny tokenizer's processor.

    For speed and scaling runs of `linmu distill` / `linmu eval` without a checkpoint: the processor is the
    family's real one (real patch / merge layout, pixel budget of the released checkpoints) around the tiny
    tokenizer, whose special token ids are written into the config. Every process that builds it with the same
    seed on the same kind of device gets the same weights.
    """
    from linmu_cli.tiny import build_tiny_processor, config_token_ids, set_generation_tokens

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_random_model(alias, dtype, device, config_token_ids())
    set_generation_tokens(model)
    return model, build_tiny_processor(ARCHS[alias].family, max_pixels=REAL_MAX_PIXELS)


__all__ = [
    "ARCHS",
    "TINY_ARCHS",
    "Arch",
    "arch_config",
    "build_random_model",
    "build_random_teacher",
    "known_archs",
]

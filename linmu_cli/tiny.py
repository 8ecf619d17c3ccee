"""Tiny, offline, deterministic Qwen2-VL / Qwen2.5-VL teachers built from transformers' real classes.

Tests and smoke runs need the whole pipeline (processor -> model -> generate) without the Hugging Face Hub
and within seconds on a CPU. Everything here is built locally: a byte-level BPE tokenizer learned from a
built-in English corpus, the real Qwen2-VL chat template and special tokens, the real image/video
processors with small pixel budgets, and randomly initialised (seeded) models of a few hundred thousand
parameters. Layout constants (patch 14, merge 2, temporal patch 2, M-RoPE) are the real ones, so code
written against these teachers behaves the same on real checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from linmu_cli.models.family import Family, families

# The families whose tiny teachers are built here (their layout constants and vision widths are below).
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# Qwen2-VL's special tokens, in the real checkpoint's id order (151643, 151644, ...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Verbatim from Qwen/Qwen2-VL-7B-Instruct (also used by Qwen2.5-VL-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small fixed corpus the BPE merges are learned from: chat and vision-language flavoured English.
_CORPUS = """\
You are a helpful assistant. Describe this image in detail. What is shown in the picture?
The image shows a red square on a blue background. There is a small green circle in the top left corner.
A yellow triangle sits below a white rectangle. The black line runs from the left edge to the right edge.
Describe the video. What happens in this video? A ball rolls from the left side of the frame to the right.
In the first frame the cat is sleeping; in the last frame the cat is awake and walking towards the door.
How many objects are there in the image? There are three objects: two cups and one plate on the table.
What color is the car? The car is red. What color is the sky? The sky is blue with a few white clouds.
Where is the dog? The dog is under the tree, next to the bench, in the middle of the park.
Read the text in the image. The sign says stop. The label on the bottle says water, one litre.
Answer the question with a single word or phrase. Yes. No. Two. Left. Right. Top. Bottom. Center.
Please answer the following question about the chart. The bar for the year two thousand is the highest.
The person in the video picks up a book, opens it, reads a page, and then puts it back on the shelf.
A man is riding a bicycle along a road near the river while the sun sets behind the mountains.
A woman holds an umbrella in the rain. Children are playing football on a field of green grass.
The kitchen has a table, four chairs, a window, and a clock on the wall that shows ten past nine.
This is a photo of a city street at night with cars, lights, tall buildings, and people walking.
The model looks at each patch of the image and merges neighbouring patches into visual tokens.
Linear attention keeps a fixed size state, so the cost grows linearly with the length of the sequence.
A vision language model reads images, videos, and text, and then writes an answer one token at a time.
Summarise the scene in one sentence. Count the people. Find the object that is different from the others.
Is the light on or off? The light is on. Is the door open or closed? The door is closed.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 2024. Punctuation: , . ; : ! ? ( ) [ ] " ' - /.
First, look at the image carefully. Second, think about the question. Finally, give a short answer.
The teacher model is large and slow; the student model is small and fast and learns from the teacher.
Thank you! You are welcome. Hello, how can I help you today? Sorry, I cannot see the image clearly.
"""
_BPE_VOCAB_SIZE = 1024  # target size of the learned byte-level vocabulary (256 bytes + merges)

# Real Qwen2-VL layout, small pixel budgets: 56x56 -> 2x2 merged tokens; at most 112x112 -> 4x4.
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112

# Named sizes of `build_tiny_teacher`: config overrides (as `tiny_config` takes them) and the processor's pixel cap.
# "teacher2" (issue 15) is the second, larger teacher trained by `evals/train_teacher.py --preset teacher2`: a
# GQA decoder of 6 layers x 384 (6 heads of 64, 2 key/value heads) and a vision tower of 4 blocks x 256, ~16M
# parameters, with 224x224 frames: 16x16 patches of 14 px -> 8x8 merged tokens per frame pair.
TEACHER2_MAX_PIXELS = 224 * 224
SIZES: dict[str, tuple[dict[str, Any], int]] = {
    "tiny": ({}, MAX_PIXELS),
    "teacher2": (
        {
            "hidden_size": 384,
            "intermediate_size": 1152,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "vision_config": {"embed_dim": 256, "depth": 4, "num_heads": 4, "mlp_ratio": 4},
        },
        TEACHER2_MAX_PIXELS,
    ),
}


def _family(name: str) -> Family:
    """The family's adapter (its transformers config / model / processor classes, `linmu_cli.models.family`);
    unknown families fail loudly rather than falling back."""
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {name!r}; expected one of {TINY_FAMILIES}")
    return families()[name]


@functools.cache
def _learned_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Learn byte-level BPE vocab/merges once per process; the `tokenizers` trainer is deterministic."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # Qwen2's own pre-tokenization, so merges match its splits
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return vocab, merges


def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in the tiny tokenizer (right after the learned BPE vocab)."""
    base = len(_learned_bpe()[0])
    return {token: base + i for i, token in enumerate(SPECIAL_TOKENS)}


def config_token_ids() -> dict[str, int]:
    """The tiny tokenizer's special tokens as Qwen2-VL config fields (top level: image/video/vision start/end;
    text config: bos/eos/pad). Shared by the tiny teachers and the `random:ALIAS` real-shape teachers."""
    ids = special_token_ids()
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


TEXT_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def set_generation_tokens(model: transformers.PreTrainedModel) -> None:
    """Greedy decoding that stops on <|im_end|> or <|endoftext|>, like the real generation_config."""
    ids = special_token_ids()
    model.generation_config.update(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A real `Qwen2Tokenizer` (byte-level BPE) with Qwen2-VL's special tokens and chat template."""
    vocab_items, merges = _learned_bpe()
    vocab = dict(vocab_items)
    for token in SPECIAL_TOKENS:  # appended after the BPE vocab, in Qwen2-VL's order
        vocab[token] = len(vocab)
    return transformers.Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        errors="replace",
        split_special_tokens=False,
        model_max_length=4096,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_tiny_processor(family: str, max_pixels: int = MAX_PIXELS) -> transformers.ProcessorMixin:
    """The family's real processor (image + video + tokenizer) with tiny pixel budgets.

    Like the real Qwen2.5-VL processor, a video without `video_metadata` is assumed to be 24 fps
    (`second_per_grid_ts` = 2/24); pass `video_metadata=[VideoMetadata(total_num_frames=T, fps=...)]` to
    give its M-RoPE temporal positions real seconds.
    """
    processor_cls = _family(family).processor_class
    layout = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    image_processor = transformers.Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=max_pixels, **layout
    )
    # Videos arrive as (T, H, W, 3) arrays whose frames are already chosen: never sample frames, and pin
    # the per-frame pixel cap off (also silences the "cap_pixels_per_frame" deprecation warning).
    video_processor = transformers.Qwen2VLVideoProcessor(
        min_pixels=MIN_PIXELS,
        max_pixels=max_pixels,
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        **layout,
    )
    return processor_cls(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=build_tiny_tokenizer(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen2-VL's 2:3:3 ratio ([16, 24, 24] at 128)."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> transformers.PretrainedConfig:
    """A few-layer config of the real family; `overrides` reach text/top-level fields by name.

    Text fields (`num_hidden_layers=4`, `hidden_size=...`) go to `text_config`, top-level fields
    (`image_token_id`, ...) to the top, and `vision_config={...}` / `text_config={...}` dicts are merged.
    """
    config_cls = _family(family).config_class
    token_ids = config_token_ids()
    text_over, vision_over = overrides.pop("text_config", {}), overrides.pop("vision_config", {})
    top_fields = {f.name for f in dataclasses.fields(config_cls)} - {"text_config", "vision_config"}
    # transformers >= 5.2x: sub_configs_defaults; 5.17: sub_configs
    text_cls = (getattr(config_cls, "sub_configs_defaults", None) or config_cls.sub_configs)["text_config"]
    text_fields = {f.name for f in dataclasses.fields(getattr(text_cls, "config_class", text_cls))}
    text_over.update({k: overrides.pop(k) for k in list(overrides) if k in text_fields})
    top_over = {k: overrides.pop(k) for k in list(overrides) if k in top_fields}
    if overrides:
        raise ValueError(f"unknown tiny_config overrides for {family}: {sorted(overrides)}")

    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        **{k: v for k, v in token_ids.items() if k in TEXT_TOKEN_FIELDS},
    }
    text.update(text_over)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault(
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(head_dim)},
    )

    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    if family == "qwen2_vl":  # embed_dim = vision width, hidden_size = merger output (LM width)
        vision.update(embed_dim=32, mlp_ratio=4, hidden_size=text["hidden_size"])
    else:  # hidden_size = vision width, out_hidden_size = merger output (LM width)
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=text["hidden_size"],
            window_size=56,  # 2x2 merged tokens per window, so 112x112 inputs really use windows
            fullatt_block_indexes=[1],  # last block full attention, like the real [7, 15, 23, 31]
        )
    vision.update(vision_over)

    top = {
        **{k: v for k, v in token_ids.items() if k not in TEXT_TOKEN_FIELDS},
        "tie_word_embeddings": False,
        **top_over,
    }
    return config_cls(text_config=text, vision_config=vision, **top)


def size_overrides(size: str, **config_overrides: Any) -> dict[str, Any]:
    """The named size's `tiny_config` overrides with `config_overrides` on top (`vision_config` /
    `text_config` dicts merged key by key, so one field can change without restating the rest)."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny teacher size {size!r}; expected one of {tuple(SIZES)}")
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in SIZES[size][0].items()}
    for key, value in config_overrides.items():
        if key in ("vision_config", "text_config") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def build_tiny_teacher(
    family: str, seed: int = 0, size: str = "tiny", **config_overrides: Any
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """A seeded, randomly initialised real model (eval mode, float32, sdpa) and its matching processor.

    `size` picks a named size of `SIZES` ("tiny": a few hundred thousand parameters at <= 112x112;
    "teacher2": ~16M parameters at 224x224, Qwen2-VL only); `config_overrides` go on top of it.
    """
    overrides = size_overrides(size, **config_overrides)  # validates `size` first
    if size != "tiny" and family != "qwen2_vl":
        raise ValueError(f"tiny teacher size {size!r} is defined for qwen2_vl only, not {family}")
    processor = build_tiny_processor(family, max_pixels=SIZES[size][1])
    tokenizer = processor.tokenizer
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, like real checkpoints pad their vocab
    config = tiny_config(family, vocab_size, **overrides)
    model_cls = _family(family).model_class
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    set_generation_tokens(model)
    return model.eval(), processor


def save_tiny_teacher(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a checkpoint directory that `AutoModelForImageTextToText` / `AutoProcessor` reload offline."""
    out = Path(out_dir)
    model, processor = build_tiny_teacher(family, seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

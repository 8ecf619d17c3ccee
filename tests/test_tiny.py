"""The tiny teachers must be real Qwen2-VL / Qwen2.5-VL pipelines: offline, deterministic and fast."""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from linmu_cli.models.family import families
from linmu_cli.tiny import (
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_FAMILIES,
    build_tiny_processor,
    build_tiny_teacher,
    build_tiny_tokenizer,
    save_tiny_teacher,
    special_token_ids,
    tiny_config,
)

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch


def _image(size: int = 56) -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def _video(frames: int = 8, size: int = 56) -> np.ndarray:
    return np.random.RandomState(1).randint(0, 256, (frames, size, size, 3), dtype=np.uint8)


def _prompt(processor: transformers.ProcessorMixin, kind: str, question: str = "What is this?") -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _inputs(processor: transformers.ProcessorMixin, kind: str) -> transformers.BatchFeature:
    media = {"images": [_image()]} if kind == "image" else {"videos": [_video()]}
    return processor(text=[_prompt(processor, kind)], return_tensors="pt", **media)


def test_tokenizer_is_deterministic_byte_level_bpe() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert isinstance(a, transformers.Qwen2Tokenizer)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # same vocab, merges, added tokens
    assert a.get_vocab() == b.get_vocab()
    assert 900 <= len(a) <= 2048
    text = "Describe this image in detail. Ünïcode & emoji 🙂 still round-trip."
    ids = a(text).input_ids
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    assert a.decode(ids) == text


def test_tokenizer_special_tokens_match_qwen2_vl() -> None:
    tok = build_tiny_tokenizer()
    ids = special_token_ids()
    assert list(ids) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(SPECIAL_TOKENS)))
    for token, token_id in ids.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok(token).input_ids == [token_id]  # never split into bytes
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.eos_token_id == ids["<|im_end|>"] and tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.decode(tok("<|im_start|>user\nhi<|im_end|>").input_ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_is_qwen2_vls() -> None:
    tok = build_tiny_tokenizer()
    assert tok.chat_template == QWEN2_VL_CHAT_TEMPLATE
    processor = build_tiny_processor("qwen2_vl")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}],
        }
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(own_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(
    ("size", "grid", "n_tokens"), [(56, [1, 4, 4], 4), (112, [1, 8, 8], 16), (224, [1, 8, 8], 16)]
)
def test_processor_image_tokens(family: str, size: int, grid: list[int], n_tokens: int) -> None:
    processor = build_tiny_processor(family)
    ids = special_token_ids()
    out = processor(text=[_prompt(processor, "image")], images=[_image(size)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [grid]  # 224x224 is capped at the 112x112 pixel budget
    assert out["pixel_values"].shape == (grid[0] * grid[1] * grid[2], PATCH_DIM)
    is_image = out["input_ids"][0] == ids["<|image_pad|>"]
    assert int(is_image.sum()) == n_tokens
    assert torch.equal(out["mm_token_type_ids"][0], is_image.long())  # 1 exactly on image tokens
    assert out["attention_mask"].shape == out["input_ids"].shape


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_processor_video_tokens(family: str) -> None:
    processor = build_tiny_processor(family)
    ids = special_token_ids()
    out = _inputs(processor, "video")
    assert out["video_grid_thw"].tolist() == [[4, 4, 4]]  # 8 frames / temporal patch 2, 56px / 14
    assert out["pixel_values_videos"].shape == (64, PATCH_DIM)
    is_video = out["input_ids"][0] == ids["<|video_pad|>"]
    assert int(is_video.sum()) == 16
    assert torch.equal(out["mm_token_type_ids"][0], 2 * is_video.long())  # 2 exactly on video tokens
    assert ("second_per_grid_ts" in out) == (family == "qwen2_5_vl")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_config_shapes_and_token_ids(family: str) -> None:
    ids = special_token_ids()
    config = tiny_config(family, vocab_size=960)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (64, 2, 128)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (4, 2, 960)
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]  # sums to head_dim / 2 = 8
    assert (text.eos_token_id, text.pad_token_id) == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert not config.tie_word_embeddings
    assert (vision.depth, vision.num_heads, vision.patch_size) == (2, 2, 14)
    assert (vision.spatial_merge_size, vision.temporal_patch_size) == (2, 2)
    out_dim = vision.hidden_size if family == "qwen2_vl" else vision.out_hidden_size
    assert out_dim == 64
    deeper = tiny_config(family, 960, num_hidden_layers=4, hidden_size=128, vision_config={"depth": 3})
    assert deeper.text_config.num_hidden_layers == 4 and deeper.vision_config.depth == 3
    assert deeper.text_config.rope_parameters["mrope_section"] == [4, 6, 6]  # rescaled to head_dim 32
    with pytest.raises(ValueError, match="unknown tiny_config overrides"):
        tiny_config(family, 960, not_a_field=1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_classes_come_from_the_family_object(family: str) -> None:
    """tiny.py keeps no table of its own: config, processor and model classes are the family's."""
    fam = families()[family]
    assert type(tiny_config(family, vocab_size=960)) is fam.config_class
    assert type(build_tiny_processor(family)) is fam.processor_class
    assert type(build_tiny_teacher(family)[0]) is fam.model_class


def test_an_unknown_tiny_family_fails_loudly() -> None:
    with pytest.raises(ValueError, match="unknown tiny family 'llava'"):
        tiny_config("llava", vocab_size=960)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_teacher_weights_are_seeded(family: str) -> None:
    (a, _), (b, _), (c, _) = (build_tiny_teacher(family, seed=s) for s in (0, 0, 1))
    expected_cls = (
        "Qwen2VLForConditionalGeneration" if family == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"
    )
    assert type(a).__name__ == expected_cls and not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.dtype == torch.float32 for v in sa.values())
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kind", ["image", "video"])
def test_forward_and_generate(family: str, kind: str) -> None:
    model, processor = build_tiny_teacher(family)
    inputs = _inputs(processor, kind)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3)
    n = inputs["input_ids"].shape[1]
    assert logits.shape == (1, n, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(generated[:, :n], inputs["input_ids"])
    assert 1 <= generated.shape[1] - n <= 3
    assert int(generated[0, n]) == int(logits[0, -1].argmax())  # greedy decoding of the same model
    # The vision tower really feeds the LM: other pixels give other logits.
    media = {"images": [_image().rotate(90)]} if kind == "image" else {"videos": [_video()[::-1].copy()]}
    other = processor(text=[_prompt(processor, kind)], return_tensors="pt", **media)
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_and_reload_offline(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = save_tiny_teacher(family, tmp_path / "teacher", seed=3)
    model, processor = build_tiny_teacher(family, seed=3)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    reprocessor = transformers.AutoProcessor.from_pretrained(out)
    assert type(reloaded) is type(model) and type(reprocessor) is type(processor)
    assert reprocessor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reprocessor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    for kind in ("image", "video"):
        inputs, reinputs = _inputs(processor, kind), _inputs(reprocessor, kind)
        assert inputs.keys() == reinputs.keys()
        assert all(torch.equal(torch.as_tensor(inputs[k]), torch.as_tensor(reinputs[k])) for k in inputs)
        with torch.no_grad():
            assert torch.equal(reloaded(**reinputs).logits, model(**inputs).logits)

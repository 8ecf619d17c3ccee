"""A LinMU model called the ways transformers users and libraries call one (issue 13).

Each test compares LinMU with its own full recomputation, and with the teacher where the math says they agree
(Flex-MA off and a text window covering the input: docs/design.md §6 exactness).
"""

import copy
import inspect
import json

import pytest
import torch
from helpers import CACHE, image, output_cache, prompt_inputs, video
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    DataCollatorWithFlattening,
)

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.models import convert_model, linmu_classes
from linmu_cli.models.family import families

EXACT = MateConfig(use_flex=False, text_window=4096)


def _turns(processor, media: str | None):
    """Turn 1 (with the image / video if any) and the text of turn 2, tokenized."""
    kwargs = {"video": {"videos": [video(7)]}, "image": {"images": [image(8)]}}.get(media, {})
    first = prompt_inputs(processor, ["what do you see here?"], **kwargs)
    follow = processor.tokenizer(
        "<|im_end|>\n<|im_start|>user\nand what colour is it?<|im_end|>\n<|im_start|>assistant\n",
        return_tensors="pt",
    )["input_ids"]
    return first, follow


def _second_turn(model, first, follow, cache=None):
    """Generate turn 1, then turn 2 on the whole conversation (with turn 1's cache when `cache` is True)."""
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out1 = model.generate(**first, **gen)
        ids = torch.cat([out1.sequences, follow], 1)
        inputs = {k: v for k, v in first.items() if k not in ("pixel_values", "pixel_values_videos")}
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(
            first["mm_token_type_ids"], (0, ids.shape[1] - first["input_ids"].shape[1])
        )
        if cache:
            turn1 = output_cache(out1)
            assert turn1.get_seq_length() == out1.sequences.shape[1] - 1  # the last token is not fed yet
            out2 = model.generate(**inputs, **{CACHE: turn1}, **gen)
            assert turn1.get_seq_length() == ids.shape[1] + 3  # the conversation once, plus 3 generated
        else:
            for key in ("pixel_values", "pixel_values_videos"):
                if key in first:
                    inputs[key] = first[key]
            out2 = model.generate(**inputs, **gen)
    return out2


def _assert_same_generation(got, want, atol: float) -> None:
    """The same tokens, and the same logits at every step within `atol`."""
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("media", [None, "image", "video"])
def test_multi_turn_with_the_returned_cache_equals_recomputing_the_conversation(tiny, media):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=6, vision_window=[2, 1, 2]))
    first, follow = _turns(processor, media)
    cached = _second_turn(student, first, follow, cache=True)
    full = _second_turn(student, first, follow, cache=False)
    _assert_same_generation(cached, full, atol=2e-4)


def test_multi_turn_matches_the_teacher_where_the_math_agrees(tiny):
    _, teacher, processor = tiny
    student = convert_model(teacher, EXACT)
    first, follow = _turns(processor, None)
    got = _second_turn(student, first, follow, cache=True)
    want = _second_turn(teacher, first, follow, cache=True)
    _assert_same_generation(got, want, atol=1e-4)


def test_a_prefix_cache_copied_and_reused_twice(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=5))
    prefix = torch.randint(0, 900, (1, 17))
    with torch.no_grad():
        cache = output_cache(student(input_ids=prefix, use_cache=True))
        for seed in (1, 2):
            suffix = torch.randint(0, 900, (1, 6), generator=torch.Generator().manual_seed(seed))
            ids = torch.cat([prefix, suffix], 1)
            reused = copy.deepcopy(cache)
            got = student.generate(input_ids=ids, **{CACHE: reused}, max_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)  # fmt: skip
            want = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True)  # fmt: skip
            assert reused.get_seq_length() == ids.shape[1] + 2
            assert torch.equal(got.sequences, want.sequences)
            torch.testing.assert_close(
                torch.stack(got.logits), torch.stack(want.logits), atol=2e-4, rtol=1e-4
            )
    assert cache.get_seq_length() == 17  # the original is untouched


def test_training_forward_with_the_default_use_cache(tiny):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=8)).train()
    assert student.config.get_text_config().use_cache is not False
    inputs = prompt_inputs(processor, ["hi", "a longer prompt with words"], images=[image(1), image(2)])
    out = student(**inputs, labels=inputs["input_ids"])  # what HF Trainer does
    out.loss.backward()
    assert isinstance(output_cache(out), LinMUCache)
    with torch.no_grad():
        ref = student(**inputs, labels=inputs["input_ids"], use_cache=False)
    torch.testing.assert_close(out.loss.detach(), ref.loss, atol=1e-6, rtol=1e-6)
    assert student.model.language_model.layers[0].self_attn.swin.q_proj.weight.grad is not None


@pytest.mark.parametrize("impl", ["static", "dynamic"])
def test_cache_implementation_static_and_dynamic_give_the_same_tokens_and_logits(tiny, impl):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=6))
    ids = torch.randint(0, 900, (2, 12))
    args = dict(
        input_ids=ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        got = student.generate(**args, cache_implementation=impl)
        want = student.generate(**args)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-5)
    cache = output_cache(got)
    assert isinstance(cache, LinMUCache) and cache.get_seq_length() == 12 + 4
    assert (cache.static is not None) == (impl == "static")
    with pytest.raises(ValueError, match="offloaded.*constant-size recurrent state"):
        student.generate(**args, cache_implementation="offloaded")


@pytest.mark.parametrize("kind", ["text", "video"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beams"])
def test_fixed_buffer_decode_equals_the_cache_path(tiny, kind, mode):
    """generate(cache_implementation="static") runs fast_decode's fixed-buffer step (a CUDA graph on CUDA; here
    eager): the same logits as the LinMUCache path, with left padding, sampling and beam reordering."""
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=5, vision_window=[2, 1, 2]))
    media = {"videos": [video(1), video(2, frames=4)]} if kind == "video" else {}
    inputs = prompt_inputs(processor, ["hi", "a much longer question about it"], **media)
    args = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20, num_return_sequences=2),
            "beams": dict(do_sample=False, num_beams=3)}[mode]  # fmt: skip
    outs = []
    for impl in ("static", None):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(student.generate(**inputs, **args, max_new_tokens=6, cache_implementation=impl,
                                         return_dict_in_generate=True, output_scores=True))  # fmt: skip
    got, want = outs
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=2e-4, rtol=1e-4)


def test_a_copied_fixed_buffer_cache_continues_like_the_original(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (2, 9))
    with torch.no_grad():
        out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                               return_dict_in_generate=True)  # fmt: skip
        cache = output_cache(out)
        twin = copy.deepcopy(cache)
        assert twin.static is None and twin.get_seq_length() == cache.get_seq_length() == 11
        nxt = out.sequences[:, -1:]
        a = student(input_ids=nxt, **{CACHE: cache}).logits
        b = student(input_ids=nxt, **{CACHE: twin}).logits
        full = student(input_ids=out.sequences, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a, full, atol=2e-4, rtol=1e-4)


def test_a_fixed_buffer_cache_continues_into_the_next_turn(tiny):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=6))
    first, follow = _turns(processor, None)
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out1 = student.generate(**first, **gen, cache_implementation="static")
        cache = output_cache(out1)
        assert cache.static is not None
        ids = torch.cat([out1.sequences, follow], 1)
        got = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{CACHE: cache}, **gen)
        want = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-4, rtol=1e-4)


def test_auto_model_returns_the_bare_linmu_model(tiny, tmp_path):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=32))
    student.save_pretrained(tmp_path)
    bare = AutoModel.from_pretrained(tmp_path)
    assert type(bare).__name__.startswith("LinMU") and not hasattr(bare, "lm_head")
    assert type(bare.language_model.layers[0].self_attn).__name__ == "MateAttention"
    inputs = prompt_inputs(processor, ["describe"], videos=[video(5)])
    with torch.no_grad():
        got = bare(**inputs).last_hidden_state
        want = student(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_written_out_classes_are_what_conversion_and_the_auto_classes_give(tiny, tmp_path):
    """docs/design.md §8: a config subclass with its own model_type, registered with the Auto classes; the
    LinMU classes are the ones in the family's file, with the installed release's forward signature."""
    name, teacher, _ = tiny
    family = families()[name]
    source = family.model_class.__name__
    config_cls, model_cls = linmu_classes(name)
    assert (config_cls, model_cls) == (family.linmu_config_class, family.linmu_model_class)
    assert linmu_classes(name, base=True)[1] is family.linmu_base_class
    assert model_cls.__module__ == config_cls.__module__ == f"linmu_cli.models.{name}"
    assert model_cls.__name__ == f"LinMU{source}" and config_cls.model_type == f"linmu_{name}"
    for linmu, src in ((model_cls, family.model_class), (family.linmu_base_class, family.base_class)):
        assert inspect.signature(linmu.forward) == inspect.signature(src.forward)
    assert inspect.signature(model_cls.prepare_inputs_for_generation) == inspect.signature(
        family.model_class.prepare_inputs_for_generation
    )
    assert model_cls.can_generate() and not family.linmu_base_class.can_generate()
    student = convert_model(teacher, MateConfig(text_window=32))
    assert type(student) is model_cls and student.family is family
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"linmu_{name}" and saved["architectures"] == [f"LinMU{source}"]
    assert saved["mate"] == MateConfig(text_window=32).to_dict()
    assert type(AutoConfig.from_pretrained(tmp_path)) is config_cls
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is model_cls
    assert type(AutoModel.from_pretrained(tmp_path)) is family.linmu_base_class


def test_packed_rows_are_refused_and_padded_rows_are_not(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    a, b = torch.randint(0, 900, (1, 7)), torch.randint(0, 900, (1, 5))
    rows = [{"input_ids": a[0].tolist()}, {"input_ids": b[0].tolist()}]
    for flash_kwargs in (False, True):  # position ids that restart; also cu_seq_lens for flash attention
        batch = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=flash_kwargs)(rows)
        with (
            torch.no_grad(),
            pytest.raises(ValueError, match="padding-free packing.*DataCollatorWithPadding"),
        ):
            student(**batch, use_cache=False)
    # left padding with ones at padded positions (an old generate() convention) is not packing
    ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, 2:]
        want = student(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_output_attentions_is_a_clear_error_and_sdpa_builds_no_dense_mask(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    ids = torch.randint(0, 900, (1, 9))
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=True: a LinMU decoder has no"):
        student(input_ids=ids, output_attentions=True)
    with torch.no_grad():
        before = student(input_ids=ids).logits
    student.set_attn_implementation("sdpa")
    assert student.model.language_model.config._attn_implementation == "linmu_mate"
    assert student.model.visual.config._attn_implementation == "sdpa"
    seen = []
    hook = student.model.language_model.layers[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    with torch.no_grad():
        after = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    hook.remove()
    assert seen == [None]  # no (L x L) mask was built for the decoder
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_tensor_parallel_plan_names_only_modules_that_exist(tiny):
    import re

    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig())
    names = [n for n, _ in student.named_modules()]
    plan = student.tp_plan
    assert plan and not any("self_attn" in k for k in plan)
    for pattern in plan:
        rx = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(rx.match(n) for n in names), pattern
    assert any("mlp.down_proj" in k for k in plan)


def test_the_model_is_stateful_and_refuses_assisted_decoding(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    assert type(student)._is_stateful is True
    ids = torch.randint(0, 900, (1, 9))
    # transformers < 5.2x refuses a stateful model up front; later 5.x after prefill, as its cache cannot crop
    with torch.no_grad(), pytest.raises(ValueError, match="stateful|cache that can be cropped"):
        student.generate(input_ids=ids, prompt_lookup_num_tokens=2, max_new_tokens=3)


@pytest.mark.parametrize("token", ["image_token_id", "video_token_id"])
def test_vision_token_ids_without_grids_are_text_like_for_the_teacher(tiny, token):
    _, teacher, _ = tiny
    student = convert_model(teacher, EXACT)
    ids = torch.randint(0, 900, (1, 20))
    ids[0, 5:9] = getattr(teacher.config, token)
    with torch.no_grad():
        want = teacher(input_ids=ids, use_cache=False).logits
        got = student(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layout_of_a_later_turn_from_all_grids_or_only_the_new_ones(tiny):
    """Turn 2 brings a second image: its segment is found whether the grids cover the whole conversation or only
    the new part, and a cache that ends inside an image is refused."""
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig())
    two = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "this"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    inputs = processor(text=[two], images=[image(1), image(2, 84)], return_tensors="pt")
    ids, grids = inputs["input_ids"], inputs["image_grid_thw"]
    first_end = (ids[0] == teacher.config.image_token_id).nonzero()[0].item() + int(grids[0].prod()) // 4
    new = ids.shape[1] - (first_end + 3)
    build = student.family.build_layout
    whole = build(student.config, ids.shape[1], 1, ids.device, input_ids=ids, image_grid_thw=grids)
    assert len(whole.segments[0]) == 2
    want = [(s.start - (ids.shape[1] - new), s.t, s.h, s.w) for s in whole.segments[0][1:]]
    for given in (grids, grids[1:]):
        part = build(student.config, new, 1, ids.device, input_ids=ids, image_grid_thw=given)
        assert [(s.start, s.t, s.h, s.w) for s in part.segments[0]] == want
    inside = ids.shape[1] - first_end + 2  # the new part would start two tokens before the first image ends
    with pytest.raises(ValueError, match="split between the cached prefix"):
        build(student.config, inside, 1, ids.device, input_ids=ids, image_grid_thw=grids)

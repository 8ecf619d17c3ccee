"""Converted models against the properties of docs/design.md §6, for both tiny families."""

import copy

import pytest
import torch
from helpers import image, output_cache, prompt_inputs, video
from transformers import AutoModelForImageTextToText

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.models import convert_model


def test_exactness_without_flex_and_with_a_wide_text_window(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(use_flex=False, text_window=4096))
    ids = torch.randint(0, 900, (2, 45))
    with torch.no_grad():
        want = teacher(input_ids=ids, use_cache=False).logits
        got = student(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_student_shares_every_non_attention_tensor_with_the_teacher(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig())
    t = {n: p for n, p in teacher.state_dict(keep_vars=True).items() if ".self_attn." not in n}
    s = {n: p for n, p in student.state_dict(keep_vars=True).items() if ".self_attn." not in n}
    assert t.keys() == s.keys()
    assert all(s[n] is t[n] for n in t)
    assert any(".self_attn.flex.A_log" in n for n in student.state_dict())
    # the teacher itself is untouched
    assert type(teacher.model.language_model.layers[0].self_attn).__name__.endswith("Attention")


def test_text_tokens_are_causal(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    ids = torch.randint(0, 900, (1, 30))
    later = ids.clone()
    later[:, 20:] = torch.randint(0, 900, (1, 10))
    with torch.no_grad():
        a = student(input_ids=ids, use_cache=False).logits
        b = student(input_ids=later, use_cache=False).logits
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 21:], b[:, 21:])


def test_video_tokens_see_their_segment_but_nothing_after(tiny):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(vision_window=[1, 1, 1], text_window=2))
    inputs = prompt_inputs(processor, ["what happens in the video?"], videos=[video(0)])
    vid = (inputs["input_ids"] == teacher.config.video_token_id)[0]
    first, last = vid.nonzero()[0].item(), vid.nonzero()[-1].item()
    with torch.no_grad():
        base = student(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]
        changed = dict(inputs)
        changed["input_ids"] = inputs["input_ids"].clone()
        changed["input_ids"][0, last + 3 :] = 500  # text after the video
        after = student(**changed, use_cache=False, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(after[0, : last + 1], base[0, : last + 1])
    # with 1x1x1 windows only Flex-MA's backward scan lets the first video token see the later ones:
    # silencing it (step size 0) changes the first video token and nothing before it
    one_way_model = copy.deepcopy(student)
    with torch.no_grad():
        for layer in one_way_model.model.language_model.layers:
            layer.self_attn.flex.dt_bias_bwd.fill_(-1e4)
        one_way = one_way_model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(one_way[0, first], base[0, first])
    assert torch.equal(one_way[0, :first], base[0, :first])


@pytest.mark.parametrize("kind", ["text", "video", "image"])
def test_cached_generation_equals_full_recomputation_with_left_padding(tiny, kind):
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=6, vision_window=[2, 1, 2]))
    texts = ["hi", "tell me a much longer story about the colors you see"]
    media = {
        "video": {"videos": [video(1), video(2, frames=4)]},
        "image": {"images": [image(3), image(4, 112)]},
    }
    inputs = prompt_inputs(processor, texts, **media.get(kind, {}))
    assert (inputs["attention_mask"] == 0).any()  # really left padded
    with torch.no_grad():
        gen = student.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
        seq = gen.sequences
        mask = torch.cat(
            [inputs["attention_mask"], torch.ones(2, seq.shape[1] - inputs["input_ids"].shape[1])], 1
        )
        full = dict(inputs, input_ids=seq, attention_mask=mask.long())
        full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 6))
        logits = student(**full, use_cache=False).logits
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, logits[:, prompt_len - 1 + step], atol=2e-4, rtol=1e-4)
    # padding never enters any state: the short prompt alone gives the same first-step logits
    alone = prompt_inputs(processor, texts[:1], **{k: v[:1] for k, v in media.get(kind, {}).items()})
    with torch.no_grad():
        solo = student(**alone, use_cache=False).logits[:, -1]
    torch.testing.assert_close(solo, gen.logits[0][:1], atol=2e-4, rtol=1e-4)


def test_cache_size_does_not_grow_with_the_prompt(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=16))
    sizes = []
    for length in (40, 400):
        with torch.no_grad():
            out = student(input_ids=torch.randint(0, 900, (2, length)), use_cache=True)
        cache = output_cache(out)
        assert isinstance(cache, LinMUCache) and cache.get_seq_length() == length
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("norm", [{}, {"output_norm_heads": 1}], ids=["every-head-normed", "one-head-normed"])
def test_save_and_load_round_trip_is_bit_exact(tiny, tmp_path, norm):
    import json

    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=32, scan_orders=["hwt", "thw"], **norm))
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"output_norm": True, "output_norm_heads": norm.get("output_norm_heads")}.items() <= saved[
        "mate"
    ].items()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(student).__name__
    assert loaded.mate_config == student.mate_config
    assert loaded.model.language_model.layers[0].self_attn.flex.normed_heads == norm.get(
        "output_norm_heads", teacher.config.get_text_config().num_attention_heads
    )
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = prompt_inputs(processor, ["describe"], videos=[video(5)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, student(**inputs).logits, atol=0, rtol=0)

"""`decode_loop.static_decode` (generate()'s loop on the fixed-buffer cache, the stop flag read every few tokens)
gives what transformers' own loop gives on the same model and cache: tokens, scores, logits, early stops.

On CUDA generate() picks it by itself for cache_implementation="static"; here (CPU) it is passed as
`custom_generate`, the public way transformers takes a decoding loop, and runs the same eager step.
"""

import pytest
import torch
from helpers import prompt_inputs, video

from linmu_cli.config import MateConfig
from linmu_cli.models import convert_model, decode_loop


@pytest.fixture
def student(tiny):
    _, teacher, processor = tiny
    return convert_model(teacher, MateConfig(text_window=5, vision_window=[2, 1, 2])), processor


def _both(model, seed: int = 3, **kwargs):
    """(transformers' loop, static_decode) on the same call, each from the same seed."""
    outs = []
    for loop in (None, decode_loop.static_decode):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model.generate(cache_implementation="static", custom_generate=loop, **kwargs))
    return outs


@pytest.mark.parametrize("every", [1, 4, 16])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_static_decode_equals_transformers_loop(student, mode, every, monkeypatch):
    model, processor = student
    monkeypatch.setattr(decode_loop, "CHECK_EVERY", every)
    inputs = prompt_inputs(
        processor, ["hi", "a much longer question about it"], videos=[video(1), video(2, frames=4)]
    )
    args = {
        "greedy": dict(do_sample=False),
        "sample": dict(do_sample=True, top_k=20, num_return_sequences=2),
    }[mode]
    want, got = _both(model, **inputs, **args, max_new_tokens=9, min_new_tokens=2)
    assert decode_loop.last_decode_loop() == "linmu_static"
    assert torch.equal(got, want)


def test_early_stop_is_cut_where_transformers_stops(student, monkeypatch):
    """Rows finish at different tokens (EOS ids the model really samples): finished rows padded the same, the
    output cut at the same length, though the loop reads the stop flag only every CHECK_EVERY tokens and so
    decoded past the stop."""
    model, processor = student
    inputs = prompt_inputs(processor, ["hi", "a much longer question about it", "and a third one"])
    args = dict(do_sample=True, top_k=4, max_new_tokens=12)
    torch.manual_seed(5)
    with torch.no_grad():
        free = model.generate(**inputs, **args, cache_implementation="static")
    new = free[:, inputs["input_ids"].shape[1] :]
    eos = [int(new[0, 2]), int(new[1, 4]), int(new[2, 5])]  # each row stops by its 3rd / 5th / 6th token
    for every in (1, 3, 4, 8, 16):  # stops inside a window, on its edge, and before the first check
        monkeypatch.setattr(decode_loop, "CHECK_EVERY", every)
        want, got = _both(model, seed=5, **inputs, **args, eos_token_id=eos, pad_token_id=0)
        assert (
            want.shape[1] <= inputs["input_ids"].shape[1] + 6 and (want == 0).any()
        )  # stopped early, padded
        assert torch.equal(got, want), every


def test_scores_and_logits_and_returned_cache(student):
    """return_dict_in_generate: the same scores and logits per token, and the cache stepped exactly as far as
    transformers' loop steps it (the loop checks every token when the cache outlives the call)."""
    model, processor = student
    inputs = prompt_inputs(processor, ["hi", "a much longer question about it"])
    args = dict(
        do_sample=False,
        max_new_tokens=6,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    want, got = _both(model, **inputs, **args)
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(want, name)) == 6
        torch.testing.assert_close(torch.stack(getattr(got, name)), torch.stack(getattr(want, name)))
    cache_want = want.get("cache", want.get("past_key_values"))
    cache_got = got.get("cache", got.get("past_key_values"))
    assert cache_got.get_seq_length() == cache_want.get_seq_length()


def test_generate_chooses_the_loop(student):
    """transformers' loop on CPU and whenever static_decode does not apply; the choice is recorded."""
    model, processor = student
    inputs = prompt_inputs(processor, ["hi"])
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert decode_loop.last_decode_loop() == "transformers"  # CPU
    assert not decode_loop.uses_static_decode(model, {"cache_implementation": "static"})
    with pytest.raises(ValueError, match='cache_implementation="static"'):
        model.generate(**inputs, max_new_tokens=2, custom_generate=decode_loop.static_decode)


@pytest.mark.parametrize(
    ("kwargs", "applies"),
    [
        ({"cache_implementation": "static"}, True),  # num_beams unset (None in transformers 5.x): one beam
        ({"cache_implementation": "static", "do_sample": True, "top_k": 4}, True),
        ({"cache_implementation": "static", "num_return_sequences": 2, "do_sample": True}, True),
        ({}, False),
        ({"cache_implementation": "dynamic"}, False),
        ({"cache_implementation": "static", "num_beams": 3}, False),
        ({"cache_implementation": "static", "output_hidden_states": True}, False),
        ({"cache_implementation": "static", "streamer": object()}, False),
        ({"cache_implementation": "static", "prompt_lookup_num_tokens": 3}, False),
    ],
)
def test_which_calls_take_the_static_loop(student, kwargs, applies):
    """The choice generate() makes on CUDA (the device aside): on 2026-12-02 the H200 run showed every call
    falling back to transformers' loop, because an unset num_beams is None, not 1."""
    model, _ = student
    assert decode_loop.static_decode_applies(model.generation_config, kwargs) is applies

"""One decode state and one decode step (issue 13): the LinMUCache's fixed buffers are what generate() and the bench
step, every decode path runs the same layer step, and the ring wraps correctly over long decodes."""

import copy

import pytest
import torch
from helpers import CACHE, interleave_graph_and_eager, output_cache, prompt_inputs, video

from linmu_cli import bench
from linmu_cli.config import MateConfig
from linmu_cli.fast_decode import StaticDecoder
from linmu_cli.layers import flex_ma
from linmu_cli.layers.cache import LinMUCache, MateCacheLayer
from linmu_cli.layers.local_swin import LocalSwin
from linmu_cli.layers.mate import MateAttention
from linmu_cli.models import convert_model


def test_runner_steps_and_eager_forwards_interleave_on_one_cache():
    interleave_graph_and_eager(torch.device("cpu"))


def _addresses(cache: LinMUCache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for _, t in layer.tensors()]


@pytest.mark.parametrize("kind", ["text", "video"])
@pytest.mark.parametrize("impl", [None, "static"])
def test_a_decode_longer_than_the_window_equals_full_recomputation(tiny, kind, impl):
    """16 new tokens through a ring of 4 slots (it wraps four times), left-padded batch: every step's logits
    equal a forward over the whole sequence without a cache."""
    _, teacher, processor = tiny
    student = convert_model(teacher, MateConfig(text_window=4, vision_window=[2, 1, 2]))
    media = {"videos": [video(1), video(2, frames=4)]} if kind == "video" else {}
    inputs = prompt_inputs(processor, ["hi", "a much longer question about it"], **media)
    new = 16
    with torch.no_grad():
        gen = student.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, cache_implementation=impl)  # fmt: skip
        seq = gen.sequences
        extra = seq.shape[1] - inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, extra, dtype=torch.long)], 1)
        full = dict(inputs, input_ids=seq, attention_mask=mask)
        full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, extra))
        logits = student(**full, use_cache=False).logits
    assert len(gen.logits) == new
    start = inputs["input_ids"].shape[1] - 1
    for i, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, logits[:, start + i], atol=2e-4, rtol=1e-4)
    cache = output_cache(gen)
    assert cache.layers[0].keys.shape[2] == 4 and int(cache.layers[0].key_valid.sum(-1).max()) == 4


def test_the_bench_step_and_generate_run_the_same_layer_step(tiny, monkeypatch):
    """The bench's StaticDecoder, generate() and generate(cache_implementation="static") all decode through
    MateAttention.forward, Flex-MA's ssd_step and MateCacheLayer.update_window on a LinMUCache: there is no
    other decode path left."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    layers = len(student.model.language_model.layers)
    calls: list[tuple[str, int]] = []
    update = MateCacheLayer.update_window
    step = flex_ma.ssd_step

    def spy_update(self, keys, *args, **kwargs):
        calls.append(("ring", keys.shape[2]))
        return update(self, keys, *args, **kwargs)

    def spy_step(*args, **kwargs):
        calls.append(("ssm", 1))
        return step(*args, **kwargs)

    monkeypatch.setattr(MateCacheLayer, "update_window", spy_update)
    monkeypatch.setattr(flex_ma, "ssd_step", spy_step)
    assert not hasattr(MateAttention, "static_step") and not hasattr(LocalSwin, "ring_step")

    def decode_calls() -> dict[str, int]:
        out = {
            "ring": sum(1 for k, n in calls if k == "ring" and n == 1),
            "ssm": sum(k == "ssm" for k, _ in calls),
        }
        calls.clear()
        return out

    with torch.no_grad():
        bench = StaticDecoder.random(student, batch=2, position=20)
        for _ in range(3):
            bench.step()
        assert decode_calls() == {"ring": 3 * layers, "ssm": 3 * layers}
        ids = torch.randint(0, 900, (2, 7))
        for impl in (None, "static"):
            out = student.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   cache_implementation=impl, return_dict_in_generate=True)  # fmt: skip
            assert decode_calls() == {"ring": 3 * layers, "ssm": 3 * layers}, impl  # prefill + 3 decode steps
            assert (output_cache(out).static is not None) == (impl == "static")


def test_the_cache_buffers_keep_their_addresses_across_every_update(tiny):
    """Allocated once by the prefill, then written in place by decode steps, a multi-token continuation, the
    runner's step, a beam reorder and a reset: what lets a captured CUDA graph keep stepping the cache generate()
    holds."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=5))
    ids = torch.randint(0, 900, (2, 9))
    with torch.no_grad():
        cache = output_cache(student(input_ids=ids, use_cache=True))
        before = _addresses(cache)
        assert all(layer.keys.shape[2] == 5 for layer in cache.layers)
        for t in range(3):
            student(input_ids=ids[:, t : t + 1], **{CACHE: cache})
        student(input_ids=ids[:, :4], **{CACHE: cache})  # next turn: a chunk continues the ring in age order
        runner = StaticDecoder.from_cache(
            student, cache, ids[:, :1], bench.next_positions(student, 16, 2, ids.device)
        )
        for _ in range(2):  # the runner's step (what a CUDA graph records) writes the same buffers
            runner.step()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert _addresses(cache) == before and cache.get_seq_length() == 9 + 3 + 4 + 2
        cache.reset()
        assert _addresses(cache) == before and cache.get_seq_length() == 0
        again = student(input_ids=ids, **{CACHE: cache}).logits
        fresh = student(input_ids=ids, use_cache=True).logits
    torch.testing.assert_close(again, fresh, atol=1e-6, rtol=1e-6)


def test_reorder_in_place_equals_reordered_rows(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (3, 8))
    nxt = torch.randint(0, 900, (3, 1))
    idx = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = output_cache(student(input_ids=ids, use_cache=True))
        student(input_ids=nxt, **{CACHE: cache})
        picked = copy.deepcopy(cache)
        picked.batch_select_indices(idx)
        cache.reorder_cache(idx)
        a = student(input_ids=nxt[idx], **{CACHE: cache}).logits
        b = student(input_ids=nxt[idx], **{CACHE: picked}).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_bf16_ssm_state_halves_it_and_stays_close_to_float32(tiny):
    """LinMUCache(ssm_dtype=bfloat16): the SSM state is stored in bf16 (updated in float32); fed the same 64
    tokens, the decode follows the float32 state closely (docs/decode-state numbers: see the report)."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=8))
    ids = torch.randint(0, 900, (2, 12))
    with torch.no_grad():
        seq = student.generate(input_ids=ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        caches, logits = [], []
        for dtype in (torch.float32, torch.bfloat16):
            cache = student.new_cache(ssm_dtype=dtype)
            steps = [student(input_ids=ids, **{CACHE: cache}).logits[:, -1]]
            steps += [student(input_ids=seq[:, t : t + 1], **{CACHE: cache}).logits[:, -1]
                      for t in range(12, seq.shape[1] - 1)]  # fmt: skip
            caches.append(cache)
            logits.append(torch.stack(steps))
    f32, bf16 = caches
    assert all(layer.ssm.dtype == torch.bfloat16 for layer in bf16.layers)
    ssm = lambda c: sum(layer.ssm.numel() * layer.ssm.element_size() for layer in c.layers)  # noqa: E731
    assert 2 * ssm(bf16) == ssm(f32) and bf16.nbytes() == f32.nbytes() - ssm(bf16)
    torch.testing.assert_close(logits[1][0], logits[0][0], atol=0, rtol=0)  # the prefill scans in float32
    diff = (logits[1] - logits[0]).abs().max().item()
    assert 0 < diff < 0.05 * logits[0].abs().max().item(), diff


def test_a_static_generate_asking_for_hidden_states_steps_eagerly_on_the_same_cache(tiny):
    """The runner returns logits only; a step that wants hidden states runs the eager forward on the same buffers
    (one state): the same tokens, logits and hidden states as generate() without "static"."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (2, 7))
    args = dict(input_ids=ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                output_hidden_states=True)  # fmt: skip
    with torch.no_grad():
        got = student.generate(**args, cache_implementation="static")
        want = student.generate(**args)
    assert output_cache(got).static is not None
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), atol=2e-5, rtol=1e-5)


def test_a_static_cache_step_with_labels_runs_eagerly(tiny):
    """A one-token forward on a static cache that passes labels (a tensor) takes the eager step on the same
    buffers, with the logits of the plain cache path."""
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (2, 7))
    with torch.no_grad():
        out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               cache_implementation="static")  # fmt: skip
        cache = output_cache(out)
        plain = copy.deepcopy(cache)
        plain.static_requested = False
        token = out.sequences[:, -1:]
        got = student(input_ids=token, labels=torch.zeros(2, 1, dtype=torch.long), **{CACHE: cache})
        want = student(input_ids=token, **{CACHE: plain})
    assert cache.static is not None and "loss" in got
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)


def test_generate_takes_the_ssm_dtype_from_cache_config(tiny):
    _, teacher, _ = tiny
    student = convert_model(teacher, MateConfig(text_window=4))
    ids = torch.randint(0, 900, (1, 6))
    with torch.no_grad():
        for impl in (None, "static"):
            out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                   cache_implementation=impl, cache_config={"ssm_dtype": "bfloat16"})  # fmt: skip
            assert {layer.ssm.dtype for layer in output_cache(out).layers} == {torch.bfloat16}
        with pytest.raises(ValueError, match="takes only 'ssm_dtype'"):
            student.generate(input_ids=ids, max_new_tokens=2, cache_config={"max_batch_size": 2})
        with pytest.raises(ValueError, match="ssm_dtype='int8'"):
            student.generate(input_ids=ids, max_new_tokens=2, cache_config={"ssm_dtype": "int8"})

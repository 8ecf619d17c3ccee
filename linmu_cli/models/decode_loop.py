"""generate()'s greedy / sampling loop on the fixed-buffer cache, without a host sync per token.

transformers' own loop (`_sample`) reads `unfinished_sequences.max() == 0` on the host after every token; the host
then runs the next token's Python (inputs, processors, model call) while the GPU idles. With LinMU's decode step a
single CUDA-graph replay (`linmu_cli.fast_decode.StaticDecoder`), that host time adds to every step: 1.5 ms on a
10.9 ms step at batch 1 (docs/benchmarks.md, "generate() against the bench's decode step").

`static_decode` is the same loop, op for op (float32 logits, the logits processors, argmax or multinomial, padding of
finished rows, the stopping criteria), handed to transformers through its public `generate(custom_generate=...)`
callable. It differs in one place: the stop decision is read on the host every `CHECK_EVERY` tokens instead of
every token, from per-token "all finished" flags kept on the device; the tokens decoded after the last row finished
are cut off again, so the output is the output of transformers' loop. Those extra steps advance the decode state,
which cannot be rolled back: when the cache outlives the call (returned with `return_dict_in_generate`, or passed in
by the user) and when tokens are streamed, the loop checks after every token, as transformers does.

`LinMUGenerationMixin.generate` chooses it for `cache_implementation="static"` on CUDA with one beam and no
assistant; `last_decode_loop()` says which loop ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

from linmu_cli.layers.cache import LinMUCache

CHECK_EVERY = 16  # tokens between two host reads of the stop flags (one sync each)

_LAST_LOOP: str | None = None


def last_decode_loop() -> str | None:
    """ "linmu_static" when the most recent generate() ran `static_decode`, "transformers" when it ran
    transformers' own loop on a LinMU model, None before any generate()."""
    return _LAST_LOOP


def set_last_decode_loop(name: str) -> None:
    global _LAST_LOOP
    _LAST_LOOP = name


def uses_static_decode(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether a generate() call with these keyword arguments runs `static_decode`: on CUDA, when
    `static_decode_applies`."""
    return next(model.parameters()).device.type == "cuda" and static_decode_applies(
        model.generation_config, kwargs
    )


def static_decode_applies(default: GenerationConfig, kwargs: dict[str, Any]) -> bool:
    """The fixed-buffer cache ("static"), greedy or sampling with one beam, no assistant, no streamer, no
    negative prompt, no per-step attentions / hidden states. Unset fields are None in transformers 5.x
    (`num_beams` too), resolved later by generate(): None means the default here."""
    config = kwargs.get("generation_config") or default
    config = GenerationConfig.from_dict(config.to_dict())  # a copy: update() below must not touch the model's
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    unsupported = (
        (config.num_beams or 1) != 1
        or config.output_attentions
        or config.output_hidden_states
        or kwargs.get("assistant_model") is not None
        or config.prompt_lookup_num_tokens is not None
        or kwargs.get("synced_gpus")
        or kwargs.get("negative_prompt_ids") is not None
        or kwargs.get("streamer") is not None  # a callable custom_generate is not handed the streamer
    )
    return config.cache_implementation == "static" and not unsupported


def _cache_of(model_kwargs: dict[str, Any]) -> LinMUCache | None:
    for name in ("cache", "past_key_values"):  # from transformers 5.24 on / before
        if isinstance(model_kwargs.get(name), LinMUCache):
            return model_kwargs[name]
    return None


def _output(sequences: torch.Tensor, scores, logits, cache: LinMUCache | None) -> GenerateDecoderOnlyOutput:
    fields = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    cache_field = "cache" if "cache" in fields else "past_key_values"
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=scores, logits=logits, **{cache_field: cache}
    )


@torch.no_grad()
def static_decode(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any | None = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """transformers' `_sample` loop (same arguments, same result) stepping the cache's `StaticDecoder`."""
    if synced_gpus or (generation_config.num_beams or 1) != 1:
        raise ValueError(
            "static_decode runs one beam on one process: call generate() without custom_generate"
        )
    set_last_decode_loop("linmu_static")
    cache = _cache_of(model_kwargs)
    if cache is None or not cache.static_requested:
        raise ValueError(
            'static_decode steps the fixed-buffer cache: call generate(cache_implementation="static")'
        )
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad = pad.to(input_ids.device) if pad is not None else None
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    want = generation_config.return_dict_in_generate
    scores = () if want and generation_config.output_scores else None
    raw_logits = () if want and generation_config.output_logits else None
    check_every = (
        1 if want or streamer is not None else CHECK_EVERY
    )  # the cache outlives the call / tokens stream

    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    max_length = getattr(stopping_criteria, "max_length", None)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    logits = outputs.logits[:, -1]
    del outputs
    runner = cache.static
    finished_flags: list[
        torch.Tensor
    ] = []  # per token: every row finished (device bools, read every check_every)
    checked = 0  # tokens whose flag the host has read
    while True:
        next_logits = logits.to(copy=True, dtype=torch.float32)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        if generation_config.do_sample:
            probs = nn.functional.softmax(next_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        finished_flags.append(unfinished.max() == 0)
        at_max = max_length is not None and input_ids.shape[1] >= max_length
        if at_max or len(finished_flags) - checked == check_every:
            done = torch.stack(finished_flags[checked:]).cpu()  # the one sync of these tokens
            checked = len(finished_flags)
            if bool(done.any()):
                extra = len(done) - 1 - int(done.int().argmax())  # tokens decoded after every row finished
                if extra:
                    input_ids = input_ids[:, :-extra]
                    scores = scores[:-extra] if scores is not None else None
                    raw_logits = raw_logits[:-extra] if raw_logits is not None else None
                break
            if at_max:
                break
        logits = runner.feed(next_tokens[:, None])
    if streamer is not None:
        streamer.end()
    if want:
        return _output(input_ids, scores, raw_logits, cache)
    return input_ids


__all__ = ["CHECK_EVERY", "last_decode_loop", "static_decode", "static_decode_applies", "uses_static_decode"]

"""Decode throughput: the served teacher, transformers' generate() path and LinMU's fixed-buffer step.

Every measurement returns one JSON entry (tokens/s, ms per step, cache bytes, peak memory, the bytes a step
must move for the roofline). The headline teacher is the teacher as it is served (`linmu_cli.teacher_decode`:
static KV cache, the fastest measured q_len=1 decode attention, one CUDA graph per step); `teacher_hf` is
transformers' forward with its DynamicCache. LinMU runs `linmu_cli.fast_decode` over a LinMUCache, captured in a
CUDA graph on CUDA (what generate(cache_implementation="static") runs), and at batch 1 also the same step through
transformers' forward, eager (what generate() runs otherwise). Batch 1 decodes on from
the real prefill; larger batches on caches of the right shapes filled with random values (decode cost does
not depend on the values). The served teacher and LinMU share their decoder layers' norms and MLP
(`linmu_cli.decode_layer`); each of their entries names the path those ran (`norm_mlp_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from linmu_cli.bench.models import cache_kw, cache_of, model_bytes, next_positions, text_model
from linmu_cli.bench.timing import Clock, Memory, guarded, is_oom
from linmu_cli.decode_layer import norm_mlp_paths


@dataclass
class DecodeStart:
    """Where a prefill left a model: its cache, the token it produced and that token's M-RoPE positions."""

    cache: Any
    token: torch.Tensor
    positions: torch.Tensor

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as (cache, token, positions)."""
        return iter((self.cache, self.token, self.positions))


def decode_start(model: nn.Module, inputs: dict[str, Any]) -> DecodeStart:
    """Prefill `inputs` (untimed, no grad): the cache, the greedy next token and its M-RoPE positions, which is
    where a decode loop (the served teacher, `StaticDecoder`, transformers' forward) starts."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    return DecodeStart(cache_of(out), token, next_positions(model, ids.shape[1], ids.shape[0], ids.device))


def kv_bytes(cache: Any) -> int:
    """Bytes of a transformers cache's keys and values."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def storage_bytes(cache: Any) -> int:
    """Bytes of the distinct storages a cache's tensors live in: what it really keeps alive (a view of a
    prompt-length tensor counts in full)."""
    tensors = []
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "tensors"):  # LinMU's MateCacheLayer
            tensors += [t for _, t in layer.tensors()]
        else:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(t, torch.Tensor)]  # fmt: skip
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def random_kv_cache(model: nn.Module, batch: int, length: int, seed: int = 0) -> Any:
    """A transformers DynamicCache of `length` tokens per sequence filled with random keys / values."""
    from transformers import DynamicCache

    tc = model.config.get_text_config(decoder=True)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    ref = model.lm_head.weight
    gen = torch.Generator(device=ref.device).manual_seed(seed)
    cache = DynamicCache()
    shape = (batch, tc.num_key_value_heads, length, head_dim)
    for i in range(tc.num_hidden_layers):
        k = (torch.randn(shape, generator=gen, device=ref.device) * 0.5).to(ref.dtype)
        v = (torch.randn(shape, generator=gen, device=ref.device) * 0.5).to(ref.dtype)
        cache.update(k, v, i)
        del k, v
    return cache


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: decoder layers, final norm, LM head."""
    text = text_model(model)
    return model_bytes(nn.ModuleList([text.layers, text.norm, model.lm_head]))


def linmu_state_step_bytes(dec: Any) -> int:
    """Bytes of decode state one LinMU step moves (`StaticDecoder`): the whole state read, the SSM state and
    conv tail written back (the ring writes one slot)."""
    written = sum(t.numel() * t.element_size() for layer in dec.cache.layers for t in (layer.ssm, layer.conv)
                  if t is not None)  # fmt: skip
    return dec.nbytes() + written


def _n_steps(step_s: float, budget_s: float, cap: int, floor: int) -> int:
    return max(floor, min(cap, int(budget_s / max(step_s, 1e-6))))


class Decoding:
    """Decode-throughput measurements with shared settings."""

    def __init__(self, device: torch.device, new_tokens: int, seconds: float, use_graph: bool,
                 teacher_kernel: str = "auto"):  # fmt: skip
        self.device, self.new_tokens, self.seconds, self.use_graph = device, new_tokens, seconds, use_graph
        self.teacher_kernel = teacher_kernel
        self.clock = Clock(device)
        self._weights: dict[int, int] = {}

    def _time(self, step: Callable[[], Any]) -> tuple[int, float]:
        """Time `step` after the caller's warm-up: a 2-step probe picks how many steps fit the time budget."""
        c = self.clock
        c.sync()
        a = c.mark()
        for _ in range(2):
            step()
        b = c.mark()
        c.sync()
        steps = _n_steps(c.seconds(a, b) / 2, self.seconds, self.new_tokens, 4 if c.cuda else 2)
        a = c.mark()
        for _ in range(steps):
            step()
        b = c.mark()
        c.sync()
        return steps, c.seconds(a, b)

    def teacher(self, model: nn.Module, batch: int, prompt_len: int, start: DecodeStart | None = None,
                check_only: bool = False) -> dict:  # fmt: skip
        """The served teacher (`teacher_decode`): static KV cache, q_len=1 decode kernel, one CUDA graph."""
        from linmu_cli.teacher_decode import ServedTeacherDecoder

        extra = self.new_tokens + 16  # the timed steps, the probe, the warm-up and graph-capture steps
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                dec = ServedTeacherDecoder.from_cache(
                    model, start.cache, start.token, start.positions, extra, kernel=self.teacher_kernel
                )
                fill = "prefill"
            else:
                kernel = "sdpa_masked" if check_only else self.teacher_kernel
                dec = ServedTeacherDecoder.random(model, batch, prompt_len + 1, extra, kernel=kernel)
                fill = "random"
            if check_only:
                dec.step()
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            loop = "eager"
            if self.use_graph:
                dec.capture()  # no fallback: a failed capture is this entry's error
                loop = "CUDA graph"
            else:
                dec.step()
            steps, seconds = self._time(dec.step)
            cache_bytes, read = dec.nbytes(), dec.read_bytes()
            choice, paths = dec.choice, norm_mlp_paths()  # what this runner's step (or its capture) ran
            dec.release()
        mode = f"{loop} (static KV cache, {choice.name} decode attention)"
        entry = self._entry(batch, steps, seconds, fill, mode, cache_bytes, mem,
                            step_bytes=self.weight_bytes(model) + read)  # fmt: skip
        entry["attention_kernel"] = {
            "name": choice.name,
            "split_chunks": choice.chunks,
            "trials_ms": choice.trials,
            "trials_timing": choice.timing,
            "bytes_per_call": choice.bytes_per_call,  # one layer's valid keys + values
            "trials_bytes_per_s": choice.bytes_per_s(),
        }
        entry["norm_mlp_kernels"] = paths
        return entry

    def weight_bytes(self, model: nn.Module) -> int:
        """`decode_weight_bytes`, counted once per model."""
        key = id(model)
        if key not in self._weights:
            self._weights[key] = decode_weight_bytes(model)
        return self._weights[key]

    def teacher_hf(self, model: nn.Module, batch: int, prompt_len: int, start: DecodeStart | None = None,
                   check_only: bool = False) -> dict:  # fmt: skip
        """transformers forward with a DynamicCache (what `generate()` runs): the real prefill cache (`start`)
        or a random one."""
        kw = cache_kw(model)
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                cache, token, pos = start.cache, start.token, start.positions
                fill = "prefill"
            else:
                cache = random_kv_cache(model, batch, prompt_len + 1)
                token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
                pos = next_positions(model, prompt_len + 1, batch, self.device)
                fill = "random"
            cache_bytes = kv_bytes(cache)
            state = {"token": token, "pos": pos}

            def step() -> None:
                out = model(input_ids=state["token"], position_ids=state["pos"], use_cache=True, logits_to_keep=1,
                            **{kw: cache})  # fmt: skip
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] = state["pos"] + 1

            step()  # warm-up
            if check_only:
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            steps, seconds = self._time(step)
        entry = self._entry(batch, steps, seconds, fill, "transformers eager, DynamicCache", cache_bytes, mem,
                            prefill_held=cache_bytes if start is not None else 0,
                            step_bytes=self.weight_bytes(model) + cache_bytes)  # fmt: skip
        if start is not None:
            entry["prefill_cache_storage_bytes"] = storage_bytes(start.cache)
        return entry

    def linmu(self, model: nn.Module, batch: int, prompt_len: int, start: DecodeStart | None = None,
              check_only: bool = False) -> dict:  # fmt: skip
        """`fast_decode.StaticDecoder` stepping a LinMUCache: what generate(cache_implementation="static") runs, as
        one CUDA graph when enabled. From the real prefill it steps that cache in place (batch_1_hf continues it)."""
        from linmu_cli.fast_decode import StaticDecoder

        held = None
        with Memory(self.device) as mem, torch.no_grad():
            if start is not None:
                held = storage_bytes(start.cache)  # what generate() would keep: the prefill's LinMUCache
                dec = StaticDecoder.from_cache(model, start.cache, start.token, start.positions)
                fill = "prefill"
            else:
                dec = StaticDecoder.random(model, batch, position=prompt_len + 1)
                fill = "random"
            mode = "eager (fixed buffers)"
            if check_only:
                dec.step()
                self.clock.sync()
                return {"status": "ok", "batch": batch}
            if self.use_graph:
                try:
                    dec.capture()
                    mode = "CUDA graph (fixed buffers)"
                except Exception as exc:  # noqa: BLE001 - fall back, and say so
                    if is_oom(exc):
                        raise
                    dec.graph = None
                    mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
            else:
                dec.step()  # warm-up
            steps, seconds = self._time(dec.step)
            state_bytes, moved = dec.nbytes(), linmu_state_step_bytes(dec)
            paths = norm_mlp_paths()  # what this runner's step (or its capture) ran
            packed = dec.packed_bytes
            dec.release()
        entry = self._entry(batch, steps, seconds, fill, mode, state_bytes, mem,
                            step_bytes=self.weight_bytes(model) + moved)  # fmt: skip
        entry["norm_mlp_kernels"] = paths
        # the copy of the decode input projections the graph reads (model-resident, once per model: docs/benchmarks.md)
        entry["packed_decode_weight_bytes"] = packed
        if held is not None:
            entry["prefill_cache_storage_bytes"] = held
        return entry

    def linmu_hf(self, model: nn.Module, start: DecodeStart) -> dict:
        """LinMU at batch 1 through the same transformers forward and cache the teacher uses."""
        kw = cache_kw(model)
        cache = start.cache
        with Memory(self.device) as mem, torch.no_grad():
            state = {"token": start.token, "pos": start.positions}

            def step() -> None:
                out = model(input_ids=state["token"], position_ids=state["pos"], use_cache=True, logits_to_keep=1,
                            **{kw: cache})  # fmt: skip
                state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
                state["pos"] = state["pos"] + 1

            step()
            steps, seconds = self._time(step)
        return self._entry(1, steps, seconds, "prefill", "transformers eager, LinMUCache", cache.nbytes(), mem,
                           prefill_held=cache.nbytes())  # fmt: skip

    @staticmethod
    def _entry(batch: int, steps: int, seconds: float, fill: str, mode: str, cache_bytes: int, mem: Memory,
               prefill_held: int = 0, step_bytes: int | None = None) -> dict:  # fmt: skip
        peak = None if mem.peak is None else mem.peak + prefill_held
        entry = {"status": "ok", "batch": batch, "tokens_per_s": batch * steps / seconds,
                 "step_ms": 1000 * seconds / steps, "steps": steps, "cache_fill": fill, "mode": mode,
                 "cache_bytes": cache_bytes, "cache_bytes_per_seq": cache_bytes / batch, "peak_bytes": peak}  # fmt: skip
        if step_bytes is not None:  # roofline: bytes one step must move (weights + cache / state) per second
            entry["bytes_per_step"] = step_bytes
            entry["achieved_bytes_per_s"] = step_bytes * steps / seconds
        return entry


def search_batch(fits: Callable[[int], dict], cap: int) -> dict:
    """Double the batch from 1 while `fits(b)` succeeds (an OOM ends the search), up to `cap`."""
    tried, best, first_oom = [], None, None
    b = 1
    while b <= cap:
        res = guarded(lambda b=b: fits(b))
        tried.append(b)
        if res.get("status") != "ok":
            if res.get("status") == "OOM":
                first_oom = b
            else:
                return {"largest_fit": best, "first_oom": None, "tried": tried, "error": res.get("error")}
            break
        best = b
        b *= 2
    return {"largest_fit": best, "first_oom": first_oom, "tried": tried, "capped": first_oom is None}


__all__ = [
    "DecodeStart",
    "Decoding",
    "decode_start",
    "decode_weight_bytes",
    "kv_bytes",
    "linmu_state_step_bytes",
    "random_kv_cache",
    "search_batch",
    "storage_bytes",
]

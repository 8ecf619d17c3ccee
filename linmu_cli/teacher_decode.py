"""Greedy decoding of a Qwen2-VL / Qwen2.5-VL teacher as it is served: static KV cache, one CUDA graph per step.

`linmu bench`'s headline baseline (`teacher`). transformers' `generate()` path (`teacher_hf` in the bench)
grows a `DynamicCache` with `torch.cat` every step (a copy of the whole KV cache per token) and dispatches
every small op from Python; vLLM / SGLang users get neither. Here:

- the KV cache is pre-allocated to prompt + new tokens, (B, H_kv, capacity, d) per layer, and the new token's
  key / value are written in place at the current length (a device tensor advanced by the step itself);
- the step is the teacher's own modules (embeddings, norms, projections, MLPs, LM head, rotary) with its
  attention replaced by a q_len=1 decode kernel over the static cache, GQA folded into the query axis
  ((B, H_kv, group, d) queries: no K/V repeat); each decoder layer is written out by `linmu_cli.decode_layer`,
  as LinMU's step is (the residual adds fused into the RMSNorms, the MLP's SiLU and product in one kernel);
- on CUDA the step is captured once in a CUDA graph and replayed (one launch per token).

Decode attention kernels (`KERNELS`; `choose_kernel` times each on the real buffers and keeps the fastest
that agrees with the reference):

- `sdpa_masked`: `scaled_dot_product_attention` over the whole capacity with a validity mask (the
  memory-efficient kernel on CUDA); one CTA per (batch, kv head): the GPU is mostly idle at batch 1;
- `split_kv`: flash-decoding. The prompt part that is always valid is cut into S chunks (S chosen so that
  batch x kv heads x S fills the GPU twice), each chunk attended by the flash kernel with its log-sum-exp
  (`aten._scaled_dot_product_flash_attention`), the short tail (prompt rest + generated tokens) by masked
  float32 math, and the S + 1 partial results merged by their log-sum-exps;
- `matmul`: two batched matmuls + a masked float32 softmax (cuBLAS parallelizes over the key axis);
- `triton_split_kv`: `linmu_cli.ops.decode_attention`'s Triton flash-decoding kernel: one launch over
  (splits, batch x kv heads) reading each kv head's keys / values once for its whole query group, then a tiny
  merge kernel; the splits fill the GPU at batch 1 (CUDA only; it competes in `choose_kernel` like the others).

`choose_kernel` times each candidate as the step runs it, replayed from a CUDA graph: an eager loop can time
Python's launch rate rather than the kernel (the eager trial of split_kv's ~15 small ops read 0.60 ms on the 7B's
layer 0 at batch 1, 0.22 TB/s: docs/benchmarks.md, 2026-12-01).

tests/bench/test_bench.py checks the step's logits against the transformers forward on CPU (float32, every kernel);
tests/bench/test_bench_gpu.py does it on the GPU in bf16 and for the CUDA-graph replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from linmu_cli.cuda_graphs import record_cuda_graph
from linmu_cli.decode_layer import decode_layer, final_norm

Kernel = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------- kernels
@dataclass
class DecodeShape:
    """What a decode attention kernel needs to know besides q / k / v: the valid length and the split."""

    length: torch.Tensor  # (1,) long on the device: slot of the current token (valid: slots <= length)
    always_valid: int  # slots [0, always_valid) are valid at every step (the prompt)
    chunks: int  # split-KV chunks over [0, chunks * chunk)
    scale: float

    @property
    def chunk(self) -> int:
        return self.always_valid // self.chunks


def _valid(shape: DecodeShape, start: int, stop: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, stop, device=device) <= shape.length


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: DecodeShape) -> torch.Tensor:
    """SDPA over every slot with a boolean validity mask. q (B, Hkv, G, d); k, v (B, Hkv, cap, d)."""
    mask = _valid(shape, 0, k.shape[2], q.device)[None, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=shape.scale)


def _math_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, valid: torch.Tensor | None = None
):
    """(out float32, log-sum-exp float32) of softmax attention; `valid` masks keys (broadcast to the scores)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()), lse


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Flash attention with its log-sum-exp (CUDA, half precision); math elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out[0], out[1][..., : q.shape[2]]
    return _math_lse(q, k, v, scale)


def split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: DecodeShape) -> torch.Tensor:
    """Flash-decoding: S chunks of the always-valid prompt + a masked tail, merged by log-sum-exp."""
    b, hk, g, d = q.shape
    s, c = shape.chunks, shape.chunk
    head = s * c
    kh = k[:, :, :head].reshape(b * hk, s, c, d)  # views: (B, Hkv) merge, the slot axis splits into (S, C)
    vh = v[:, :, :head].reshape(b * hk, s, c, d)
    qh = q.reshape(b * hk, 1, g, d).expand(b * hk, s, g, d).contiguous()
    out_h, lse_h = _flash_lse(qh, kh, vh, shape.scale)  # (B*Hkv, S, G, d), (B*Hkv, S, G)
    valid = _valid(shape, head, k.shape[2], q.device)
    out_t, lse_t = _math_lse(q, k[:, :, head:], v[:, :, head:], shape.scale, valid)  # (B, Hkv, G, d|.)
    lse = torch.cat([lse_h.float().reshape(b, hk, s, g), lse_t[:, :, None]], dim=2)  # (B, Hkv, S+1, G)
    w = torch.softmax(lse, dim=2)[..., None]
    parts = torch.cat([out_h.float().reshape(b, hk, s, g, d), out_t[:, :, None]], dim=2)
    return (w * parts).sum(2).to(q.dtype)


def matmul_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: DecodeShape) -> torch.Tensor:
    """scores = q k^T (one bmm over all slots), masked float32 softmax, probabilities @ v."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * shape.scale
    s = s.masked_fill(~_valid(shape, 0, k.shape[2], q.device), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def triton_split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: DecodeShape) -> torch.Tensor:
    """The Triton split-KV kernel; it reads `shape.length` on the device (valid: slots <= length, hence
    len_offset=1) and picks its own splits from batch x kv heads against the SM count."""
    from linmu_cli.ops.decode_attention import _triton_impl

    return _triton_impl().split_kv_decode(q, k, v, shape.length, len_offset=1, scale=shape.scale)


KERNELS: dict[str, Kernel] = {
    "split_kv": split_kv,
    "sdpa_masked": sdpa_masked,
    "matmul": matmul_softmax,
    "triton_split_kv": triton_split_kv,
}


def split_chunks(batch: int, kv_heads: int, always_valid: int, device: torch.device) -> int:
    """Split-KV chunks: enough (batch x kv heads x S) blocks for twice the SMs, chunks of >= 256 slots."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, math.ceil(2 * sms / max(1, batch * kv_heads)))
    return max(1, min(want, always_valid // 256 or 1))


# ----------------------------------------------------------------------------------------------- decoder
def _text_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def _rope(cos: torch.Tensor, sin: torch.Tensor, section: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, d) cos / sin: transformers >= 5.2x merges M-RoPE sections in the rotary module, older ones
    return (3, B, 1, d) and merge in `apply_multimodal_rotary_pos_emb` (same result)."""
    if cos.dim() == 4:
        merge = lambda t: torch.cat([m[i % 3] for i, m in enumerate(t.split(section * 2, dim=-1))], dim=-1)  # noqa: E731
        cos, sin = merge(cos), merge(sin)
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class KernelChoice:
    """Which decode attention kernel runs and what each candidate measured (ms per layer call, or error)."""

    name: str
    trials: dict[str, float | str] = field(default_factory=dict)
    chunks: int = 1
    bytes_per_call: int = 0  # keys + values of the valid slots of one layer: what one call must read
    timing: str = ""

    def bytes_per_s(self) -> dict[str, float]:
        """Achieved bytes/s of each timed candidate (bytes_per_call / its time): the kernels' roofline."""
        return {
            n: self.bytes_per_call / (t / 1e3)
            for n, t in self.trials.items()
            if isinstance(t, float) and t > 0
        }


class ServedTeacherDecoder:
    """Greedy decode steps of a Qwen2-VL / Qwen2.5-VL teacher on a static KV cache (see the module docstring).

    Build it with `from_cache` (after a real prefill, from transformers' cache) or `random` (keys / values of
    the right shapes with random values), then `step()`; `capture()` records the step in a CUDA graph."""

    def __init__(self, model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor], prompt: int,
                 tokens: torch.Tensor, positions: torch.Tensor, kernel: str = "auto") -> None:  # fmt: skip
        self.model, self.keys, self.values = model, keys, values
        self.text = _text_model(model)
        tc = model.config.get_text_config(decoder=True)
        self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = keys[0].shape[-1]
        self.section = list((getattr(tc, "rope_parameters", None) or {}).get("mrope_section", [16, 24, 24]))
        self.capacity = keys[0].shape[2]
        self.tokens, self.positions = tokens, positions  # (B, 1), (3, B, 1) long
        self.length = torch.full(
            (1,), prompt, dtype=torch.long, device=tokens.device
        )  # slot of the next token
        self.prompt, self.taken = prompt, 0
        chunks = split_chunks(self.batch, self.kv_heads, prompt, tokens.device)
        self.shape = DecodeShape(self.length, prompt, chunks, self.head_dim**-0.5)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.choice = choose_kernel(self, kernel)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def nbytes(self) -> int:
        """Bytes of the static KV cache (all slots)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def read_bytes(self) -> int:
        """Bytes one step reads from the cache at the current length (keys + values of every layer)."""
        per_slot = (
            2 * len(self.keys) * self.batch * self.kv_heads * self.head_dim * self.keys[0].element_size()
        )
        return per_slot * (self.prompt + self.taken + 1)

    @classmethod
    def _alloc(cls, model: nn.Module, batch: int, capacity: int) -> tuple[list, list]:
        tc = model.config.get_text_config(decoder=True)
        d = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        ref = model.lm_head.weight
        shape = (batch, tc.num_key_value_heads, capacity, d)
        keys = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in range(tc.num_hidden_layers)]
        values = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in range(tc.num_hidden_layers)]
        return keys, values

    @classmethod
    def from_cache(cls, model: nn.Module, cache: Cache, tokens: torch.Tensor, positions: torch.Tensor, new_tokens: int,
                   kernel: str = "auto") -> ServedTeacherDecoder:  # fmt: skip
        """Copy a prefilled transformers cache (DynamicCache) into a static one of prompt + `new_tokens` slots."""
        layers = cache.layers
        prompt = layers[0].keys.shape[2]
        keys, values = cls._alloc(model, tokens.shape[0], prompt + new_tokens)
        for layer, k, v in zip(layers, keys, values, strict=True):
            k[:, :, :prompt].copy_(layer.keys)
            v[:, :, :prompt].copy_(layer.values)
            k[:, :, prompt:].zero_()  # masked slots still enter p @ v: garbage there could be NaN (0 * NaN)
            v[:, :, prompt:].zero_()
        return cls(model, keys, values, prompt, tokens.clone(), positions.clone(), kernel)

    @classmethod
    def random(cls, model: nn.Module, batch: int, prompt: int, new_tokens: int, seed: int = 0,
               kernel: str = "auto") -> ServedTeacherDecoder:  # fmt: skip
        """A static cache of `prompt` filled slots (random values; decode cost does not depend on them)."""
        keys, values = cls._alloc(model, batch, prompt + new_tokens)
        gen = torch.Generator(device=keys[0].device).manual_seed(seed)
        for t in (*keys, *values):
            t[:, :, :prompt].normal_(0, 0.5, generator=gen)
            t[:, :, prompt:].zero_()
        dev = keys[0].device
        vocab = model.lm_head.weight.shape[0]
        tokens = torch.randint(0, min(vocab, 1000), (batch, 1), generator=gen, device=dev)
        positions = torch.full((3, batch, 1), prompt, dtype=torch.long, device=dev)
        return cls(model, keys, values, prompt, tokens, positions, kernel)

    # ------------------------------------------------------------------ stepping
    def attend(self, layer: int, q: torch.Tensor, kernel: Kernel | None = None) -> torch.Tensor:
        """q (B, H, d) -> attention output (B, H, d) over layer `layer`'s valid slots."""
        b = q.shape[0]
        fn = kernel or KERNELS[self.choice.name]
        qg = q.view(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        return fn(qg, self.keys[layer], self.values[layer], self.shape).reshape(b, self.heads, self.head_dim)

    def _attention(self, i: int, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Layer `i`'s attention on the normed token x (B, 1, D): q / k / v, rotary, the new key / value
        written at `length`, the decode kernel over the static cache, o_proj -> (B, 1, D)."""
        b, d = self.batch, self.head_dim
        x = x[:, 0]
        q = _rotate(attn.q_proj(x).view(b, self.heads, d), cos, sin)
        k = _rotate(attn.k_proj(x).view(b, self.kv_heads, d), cos, sin)
        v = attn.v_proj(x).view(b, self.kv_heads, d)
        self.keys[i].index_copy_(2, self.length, k[:, :, None])
        self.values[i].index_copy_(2, self.length, v[:, :, None])
        return attn.o_proj(self.attend(i, q).reshape(b, 1, -1))

    def _step(self) -> torch.Tensor:
        """One token through the teacher's modules, each decoder layer written out by `decode_layer` (the fused
        norms and MLP LinMU's step runs too) around `_attention`."""
        text = self.text
        hidden = text.embed_tokens(self.tokens)
        cos, sin = _rope(*text.rotary_emb(hidden, self.positions), self.section)
        cos, sin = cos[:, 0, None], sin[:, 0, None]  # (B, 1, d): broadcast over heads
        residual = None
        for i, layer in enumerate(text.layers):
            attend = partial(self._attention, i, layer.self_attn, cos=cos, sin=sin)
            hidden, residual = decode_layer(layer, hidden, residual, attend)
        logits = self.model.lm_head(final_norm(text.norm, hidden, residual)[:, -1])
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.positions.add_(1)
        self.length.add_(1)
        return logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns that step's logits (B, vocab)."""
        if self.prompt + self.taken >= self.capacity:
            raise RuntimeError(f"static KV cache full ({self.capacity} slots): allocate more new tokens")
        self.taken += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Record one step in a CUDA graph (after `warmup` eager steps on a side stream, as torch requires)."""
        if self.tokens.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.graph, self.logits = record_cuda_graph(self._step, warmup=self.step, warmup_steps=warmup)

    def release(self) -> None:
        self.graph, self.logits, self.keys, self.values = None, None, [], []


def graph_ms(fn: Callable[[int], object], calls: int = 10, replays: int = 3) -> float:
    """ms per call of `fn(i)`, from replays of one CUDA graph of `calls` calls (warmed up on a side stream first,
    as capture requires; Triton compiles there). `i` lets the caller read a different layer's cache per call,
    as the step does, so a cache smaller than L2 is not timed from L2. A kernel that cannot be captured raises:
    the served step could not run it."""
    graph, _ = record_cuda_graph(lambda: [fn(i) for i in range(calls)],
                                 warmup=lambda: [fn(i) for i in range(min(calls, 2))], warmup_steps=1)  # fmt: skip
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / (calls * replays)
    del graph
    return ms


def choose_kernel(dec: ServedTeacherDecoder, requested: str = "auto") -> KernelChoice:
    """Time every kernel on the real buffers (layers in turn), replayed from a CUDA graph as the step runs it,
    and keep the fastest one whose output agrees with `sdpa_masked` on layer 0; `requested` names one kernel
    instead. On CPU `auto` takes `split_kv` untimed."""
    per_call = 2 * dec.batch * dec.kv_heads * dec.head_dim * dec.keys[0].element_size() * (dec.prompt + 1)
    if requested != "auto":
        if requested not in KERNELS:
            from linmu_cli.errors import LinmuError

            raise LinmuError(
                f"unknown teacher decode kernel {requested!r}; choose auto or {', '.join(KERNELS)}"
            )
        return KernelChoice(requested, {}, dec.shape.chunks, per_call)
    if dec.tokens.device.type != "cuda":
        return KernelChoice("split_kv", {"note": "CPU: not timed"}, dec.shape.chunks, per_call)
    gen = torch.Generator(device=dec.tokens.device).manual_seed(1)
    q = torch.randn(dec.batch, dec.heads, dec.head_dim, device=dec.tokens.device, generator=gen).to(
        dec.keys[0].dtype
    )
    trials: dict[str, float | str] = {}
    with torch.no_grad():
        ref = dec.attend(0, q, sdpa_masked).float()
        for name, fn in KERNELS.items():
            try:
                out = dec.attend(0, q, fn).float()
                err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                if err > 2e-2:
                    trials[name] = f"wrong: rel. error {err:.1e} against sdpa_masked"
                    continue
                trials[name] = graph_ms(lambda i, fn=fn: dec.attend(i % len(dec.keys), q, fn))
            except Exception as exc:  # noqa: BLE001 - a kernel that does not run here is reported, not used
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                trials[name] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
    timed = {n: t for n, t in trials.items() if isinstance(t, float)}
    timing = "CUDA graph of 10 calls (layers 0-9 in turn), replayed 3 times"
    return KernelChoice(min(timed, key=timed.get), trials, dec.shape.chunks, per_call, timing)


__all__ = [
    "KERNELS",
    "DecodeShape",
    "KernelChoice",
    "ServedTeacherDecoder",
    "choose_kernel",
    "graph_ms",
    "split_kv",
    "triton_split_kv",
]

"""Greedy / fed decode steps over a `LinMUCache`, recorded once in a CUDA graph on CUDA.

A LinMU model's decode state is a `LinMUCache` whose buffers are allocated at the end of the prefill and then
updated in place (linmu_cli/layers/cache.py): the SSM state, the conv tail, a ring of `text_window` key / value
slots with its validity mask and slot pointer. Every forward of one token runs the same M-MATE decode step
(`MateAttention.forward`), so a whole model step has fixed addresses and no host syncs: `StaticDecoder` runs that
step (the model's own embedding, norms, MLPs and LM head, each decoder layer written out by
`linmu_cli.decode_layer` as the served teacher's are) and, on CUDA, captures it in a CUDA graph: one launch per
token instead of thousands of small kernels.

`generate(cache_implementation="static")` steps its cache with one (`feed`, with the token generate() chose,
beams reordered in place); the bench steps the same class (`from_cache` after a real prefill, `random` for
states of the right shapes). Eager forwards and graph replays can interleave on one cache: they write the same
buffers.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from linmu_cli.cuda_graphs import record_cuda_graph
from linmu_cli.decode_layer import decode_layer, final_norm
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.layers.mate import pack_decode_weights


def _text_model(model: nn.Module) -> nn.Module:
    return model.family.text_model(model)


def _cache_kwarg(layer: nn.Module) -> str:
    """The decoder layer's cache keyword in this transformers release (`cache` from 5.24 on)."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


class StaticDecoder:
    """A step runner over a `LinMUCache` (see the module docstring): `step()` decodes one token for every row
    (its own argmax next), `feed(tokens)` the given ones; `capture()` records the step in a CUDA graph so that
    each later step is one replay. The cache is stepped in place, never copied."""

    def __init__(
        self, model: nn.Module, cache: LinMUCache, tokens: torch.Tensor, positions: torch.Tensor
    ) -> None:
        self.model, self.cache = model, cache
        self.tokens = tokens  # (B, 1) long: the token fed to the next step
        self.positions = positions  # (3, B, 1) long: its M-RoPE position (text: all three equal)
        # the step's token layout, built once: nothing in a step reads back from the device
        self.layout = TokenLayout.text_only(tokens.shape[0], 1, tokens.device)
        self._cache_kw = _cache_kwarg(_text_model(model).layers[0])
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._addresses: list[int] = []
        self.packed_bytes = 0  # decode weights packed for the graph (`capture(pack_weights=True)`)
        self._packs: list = []  # what the graph reads: kept alive as long as the graph

    def nbytes(self) -> int:
        """Bytes of decode state (what grows with the batch, not with the prompt)."""
        return self.cache.nbytes()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cache(cls, model: nn.Module, cache: LinMUCache, tokens: torch.Tensor,
                   positions: torch.Tensor) -> StaticDecoder:  # fmt: skip
        """A runner stepping a prefilled cache (in place); `tokens` / `positions` are the next token's."""
        if not isinstance(cache, LinMUCache):
            raise TypeError(f"a StaticDecoder steps a LinMUCache, not a {type(cache).__name__}")
        return cls(model, cache, tokens.clone(), positions.clone())

    @classmethod
    def random(cls, model: nn.Module, batch: int, position: int = 0, seed: int = 0,
               ssm_dtype: torch.dtype = torch.float32) -> StaticDecoder:  # fmt: skip
        """A cache for `batch` sequences of `position` tokens, filled with random values of the right shapes and
        dtypes (decode cost does not depend on them), and a runner over it."""
        text_config = model.family.text_config(model.config)
        heads, hk = text_config.num_attention_heads, text_config.num_key_value_heads
        d = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        mate = model.mate_config
        ref = model.lm_head.weight
        dev, dtype = ref.device, ref.dtype
        gen = torch.Generator(device=dev).manual_seed(seed)
        rnd = lambda *shape, dt=dtype: (torch.randn(*shape, generator=gen, device=dev) * 0.02).to(dt)  # noqa: E731
        cache = model.new_cache(ssm_dtype=ssm_dtype)
        for layer in cache.layers:
            if mate.use_flex:
                layer.ssm = rnd(batch, heads, d, d, dt=ssm_dtype)
                if mate.d_conv > 0:
                    layer.conv = rnd(batch, (2 * hk + heads) * d, mate.d_conv - 1)
            if mate.use_swin:
                ring = (batch, hk, mate.text_window, d)
                valid = torch.ones(batch, mate.text_window, dtype=torch.bool, device=dev)
                layer.set_ring(rnd(*ring), rnd(*ring), valid)
            layer.seen = position
        tokens = torch.randint(0, min(ref.shape[0], 1000), (batch, 1), generator=gen, device=dev)
        positions = torch.full((3, batch, 1), position, dtype=torch.long, device=dev)
        return cls(model, cache, tokens, positions)

    # ------------------------------------------------------------------ stepping
    def _step(self) -> torch.Tensor:
        """One token through the model's own modules, each decoder layer written out (`decode_layer`: the
        fused norms and MLP the served teacher runs too) around its M-MATE block's one decode step, which takes
        the cache, layout and position embeddings as the HF decoder layer passes them."""
        text = _text_model(self.model)
        hidden = text.embed_tokens(self.tokens)
        rope = text.rotary_emb(hidden, self.positions)
        cache = {self._cache_kw: self.cache}

        def attend(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
            return block(hidden_states=x, position_embeddings=rope, linmu_layout=self.layout, **cache)[0]

        residual = None
        for layer in text.layers:
            hidden, residual = decode_layer(layer, hidden, residual, partial(attend, block=layer.self_attn))
        logits = self.model.lm_head(final_norm(text.norm, hidden, residual)[:, -1])
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.positions.add_(1)
        return logits

    def _check_addresses(self) -> None:
        """A graph replays on the addresses it recorded: refuse if a buffer was reallocated since."""
        if self._buffer_addresses() != self._addresses:
            raise RuntimeError(
                "the LinMUCache's buffers moved since the CUDA graph was captured (a batch change or a new cache "
                "shape): capture again"
            )

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns that step's logits (B, vocab)."""
        if self.graph is None:
            return self._step()
        self._check_addresses()
        self.graph.replay()
        self.cache.advance(1)  # the layers' host-side token count does not run in a replay
        return self.logits

    @torch.no_grad()
    def capture(self, warmup: int = 2, keep_state: bool = False, pack_weights: bool = True) -> None:
        """Record one step in a CUDA graph (after `warmup` eager steps on a side stream, as torch requires).

        The warm-up and capture steps advance the state; `keep_state=True` puts every buffer back afterwards (in
        place, so the graph's addresses stay valid): what `generate()` needs after a real prefill.

        `pack_weights`: first keep every M-MATE block's decode input projections concatenated
        (`layers.mate.pack_decode_weights`): one GEMV per block instead of nine. Measured on an H200 at the 7B
        shape (2026-12-02): one block's graph-replayed step 0.138 -> 0.088 ms at batch 1, 0.180 -> 0.118 ms at
        batch 16, for 92 MB of copied weights per layer (2.58 GB at 7B, `packed_bytes`; the model keeps them
        until `layers.mate.drop_decode_weights(model)`; the runner holds the packs its graph reads).
        """
        if self.tokens.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if pack_weights:
            self.packed_bytes = pack_decode_weights(self.model)
            self._packs = [
                m.__dict__["_decode_pack"] for m in self.model.modules() if "_decode_pack" in m.__dict__
            ]
        seen = [layer.seen for layer in self.cache.layers]
        saved = [t.clone() for t in self._buffers()] if keep_state else None
        self.graph, self.logits = record_cuda_graph(self._step, warmup_steps=warmup)
        self._addresses = self._buffer_addresses()
        if saved is not None:
            for buf, old in zip(self._buffers(), saved, strict=True):
                buf.copy_(old)
        # the layers counted the warm-up steps and the recorded one; only the warm-up steps ran (or none, restored)
        for layer, n in zip(self.cache.layers, seen, strict=True):
            layer.seen = n if saved is not None else n + warmup

    def _buffers(self) -> list[torch.Tensor]:
        """Every tensor a step reads and updates in place."""
        return [self.tokens, self.positions, *[t for layer in self.cache.layers for _, t in layer.tensors()]]

    def _buffer_addresses(self) -> list[int]:
        return [t.data_ptr() for t in self._buffers()]

    # ------------------------------------------------------------------ as generate()'s step (docs/design.md §3-4)
    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode the given next tokens (B, 1), not the step's own argmax; returns logits (B, vocab).

        A copy: under a CUDA graph the logits buffer is overwritten by the next replay.
        """
        self.tokens.copy_(tokens)
        return self.step().clone()

    @torch.no_grad()
    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder the runner's own rows (token, position) in place; `LinMUCache.reorder_cache` calls it after
        reordering its layers."""
        self.tokens.copy_(self.tokens.index_select(0, index.to(self.tokens.device)))
        self.positions.copy_(self.positions.index_select(1, index.to(self.positions.device)))

    def release(self) -> None:
        self.graph, self.logits, self._addresses, self._packs = None, None, [], []


__all__ = ["StaticDecoder"]

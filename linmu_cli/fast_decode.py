"""Decoding a LinMU model on fixed buffers: no host syncs, no allocations that move, one CUDA graph.

`model.generate()` with the default `LinMUCache` pays, per token, Python dispatch of every small op of 28
layers (thousands of kernel launches) and re-allocates the Local-Swin ring. Decoding a LinMU model needs only
constant-size state, so a whole step can run on buffers whose addresses never change. The bench steps a
`StaticDecoder` directly; `model.generate(cache_implementation="static")` runs the same step (`feed`, with the
token generate() chose: every decoding strategy, beams reordered in place) after a normal prefill:

- Flex-MA: the SSM state (B, H, d, d) float32 and the conv tail, both updated in place by the decode step
  (`FlexMA.forward` with one token; mamba-ssm's `selective_state_update` on CUDA);
- Local-Swin: a ring of `text_window` key / value slots plus a validity mask; the new token's key overwrites
  the key that just left its window, then the token attends to the valid slots (`LocalSwin.ring_step`);
- the next token, its M-RoPE position and the ring slot live in device tensors advanced by the step itself.

On CUDA the step is captured once in a CUDA graph and replayed: one launch per token. The decoder layers,
norms, MLPs and the LM head are the model's own modules (it calls the transformers decoder layers), so the
step computes what `model(input_ids=token, cache=...)` computes (tests/test_bench.py checks the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from linmu_cli.layers.cache import LinMUCache, MateLayerState


@dataclass
class StaticLayerState:
    """Decode buffers of one M-MATE layer (duck-types the `ssm` / `conv` fields of `MateLayerState`)."""

    ssm: torch.Tensor | None  # (B, H, d, d) float32
    conv: torch.Tensor | None  # (B, channels, d_conv - 1)
    keys: torch.Tensor | None  # (B, H_kv, text_window, d), ring
    values: torch.Tensor | None
    key_valid: torch.Tensor | None  # (B, text_window) bool
    slot: torch.Tensor  # (1,) long, shared by all layers: ring slot of the token being decoded

    def nbytes(self) -> int:
        ts = (self.ssm, self.conv, self.keys, self.values, self.key_valid)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _text_model(model: nn.Module) -> nn.Module:
    return model.family.text_model(model)


def _sizes(model: nn.Module) -> dict:
    text_config = model.family.text_config(model.config)
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "layers": text_config.num_hidden_layers, "mate": model.mate_config}  # fmt: skip


class StaticDecoder:
    """Greedy decode steps of a LinMU model on fixed buffers (see the module docstring).

    Build it with `from_cache` (after a real prefill) or `random` (states of the right shapes with random
    values: decode cost does not depend on them), then call `step()` repeatedly; `capture()` records the step
    in a CUDA graph so that each later `step()` is one graph replay.
    """

    def __init__(self, model: nn.Module, states: list[StaticLayerState], tokens: torch.Tensor,
                 positions: torch.Tensor) -> None:  # fmt: skip
        self.model, self.states = model, states
        self.tokens = tokens  # (B, 1) long: the token fed to the next step
        self.positions = positions  # (3, B, 1) long: its M-RoPE position (text: all three equal)
        self.slot = states[0].slot
        self.window = model.mate_config.text_window
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def nbytes(self) -> int:
        """Bytes of decode state (what grows with the batch, not with the prompt)."""
        return sum(s.nbytes() for s in self.states)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cache(cls, model: nn.Module, cache: LinMUCache, tokens: torch.Tensor,
                   positions: torch.Tensor) -> StaticDecoder:  # fmt: skip
        """Copy a prefilled `LinMUCache` into fixed buffers; `tokens` / `positions` are the next token's."""
        sz = _sizes(model)
        window = sz["mate"].text_window
        bsz = tokens.shape[0]
        first = next(t for s in cache.layers for _, t in s.tensors())
        slot = torch.zeros(1, dtype=torch.long, device=first.device)
        states = []
        for layer in cache.layers:
            keys = values = valid = None
            if layer.keys is not None:
                held = layer.keys.shape[2]  # at most window - 1, oldest first: slots 0 .. held-1
                keys = layer.keys.new_zeros(bsz, sz["kv_heads"], window, sz["head_dim"])
                values = layer.values.new_zeros(bsz, sz["kv_heads"], window, sz["head_dim"])
                valid = torch.zeros(bsz, window, dtype=torch.bool, device=layer.keys.device)
                keys[:, :, :held], values[:, :, :held], valid[:, :held] = (
                    layer.keys,
                    layer.values,
                    layer.key_valid,
                )
                slot.fill_(held % window)
            # contiguous copies (fla's final state is a transposed view): the step kernel streams them row-major
            ssm = layer.ssm.clone(memory_format=torch.contiguous_format) if layer.ssm is not None else None
            conv = layer.conv.clone(memory_format=torch.contiguous_format) if layer.conv is not None else None
            states.append(StaticLayerState(ssm, conv, keys, values, valid, slot))
        return cls(model, states, tokens.clone(), positions.clone())

    @classmethod
    def random(cls, model: nn.Module, batch: int, position: int = 0, seed: int = 0) -> StaticDecoder:
        """Buffers for `batch` sequences filled with random values of the right shapes and dtypes."""
        sz = _sizes(model)
        mate, h, hk, d = sz["mate"], sz["heads"], sz["kv_heads"], sz["head_dim"]
        ref = model.lm_head.weight
        dev, dtype = ref.device, ref.dtype
        gen = torch.Generator(device=dev).manual_seed(seed)
        rnd = lambda *shape, dt=dtype: (torch.randn(*shape, generator=gen, device=dev) * 0.02).to(dt)  # noqa: E731
        slot = torch.zeros(1, dtype=torch.long, device=dev)
        states = []
        for _ in range(sz["layers"]):
            ssm = conv = keys = values = valid = None
            if mate.use_flex:
                ssm = rnd(batch, h, d, d, dt=torch.float32)
                if mate.d_conv > 0:
                    conv = rnd(batch, (2 * hk + h) * d, mate.d_conv - 1)
            if mate.use_swin:
                keys, values = rnd(batch, hk, mate.text_window, d), rnd(batch, hk, mate.text_window, d)
                valid = torch.ones(batch, mate.text_window, dtype=torch.bool, device=dev)
            states.append(StaticLayerState(ssm, conv, keys, values, valid, slot))
        vocab = ref.shape[0]
        tokens = torch.randint(0, min(vocab, 1000), (batch, 1), generator=gen, device=dev)
        positions = torch.full((3, batch, 1), position, dtype=torch.long, device=dev)
        return cls(model, states, tokens, positions)

    # ------------------------------------------------------------------ stepping
    def _step(self) -> torch.Tensor:
        text = _text_model(self.model)
        hidden = text.embed_tokens(self.tokens)
        rope = text.rotary_emb(hidden, self.positions)
        for layer, state in zip(text.layers, self.states, strict=True):
            hidden = layer(hidden, position_embeddings=rope, linmu_static=state)
        hidden = text.norm(hidden)
        logits = self.model.lm_head(hidden[:, -1])
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.positions.add_(1)
        self.slot.add_(1).remainder_(self.window)
        return logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns that step's logits (B, vocab)."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()

    @torch.no_grad()
    def capture(self, warmup: int = 2, keep_state: bool = False) -> None:
        """Record one step in a CUDA graph (after `warmup` eager steps on a side stream, as torch requires).

        The warm-up steps advance the state; `keep_state=True` puts every buffer back afterwards (in place, so
        the graph's addresses stay valid): what `generate()` needs after a real prefill.
        """
        if self.tokens.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        saved = [t.clone() for t in self._buffers()] if keep_state else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph
        if saved is not None:
            for buf, old in zip(self._buffers(), saved, strict=True):
                buf.copy_(old)

    # ------------------------------------------------------------------ as generate()'s cache (docs/design.md §3-4)
    def _buffers(self) -> list[torch.Tensor]:
        """Every tensor a step reads and updates in place (the slot once: all layers share it)."""
        out = [self.tokens, self.positions, self.slot]
        for s in self.states:
            out += [t for t in (s.ssm, s.conv, s.keys, s.values, s.key_valid) if t is not None]
        return out

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode the given next tokens (B, 1), not the step's own argmax; returns logits (B, vocab).

        A copy: under a CUDA graph the logits buffer is overwritten by the next replay.
        """
        self.tokens.copy_(tokens)
        return self.step().clone()

    @torch.no_grad()
    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder / pick batch rows in place (beam search), keeping every buffer's address."""
        for buf in [self.tokens, self.positions, *[t for s in self.states for t in (s.ssm, s.conv, s.keys,
                                                                                     s.values, s.key_valid)
                                                   if t is not None]]:  # fmt: skip
            dim = 1 if buf is self.positions else 0
            buf.copy_(buf.index_select(dim, index.to(buf.device)))

    def layer_states(self) -> list[MateLayerState]:
        """The state as `LinMUCache` layers (oldest key first): to continue with a multi-token forward."""
        out = []
        order = (self.slot + 1 + torch.arange(self.window - 1, device=self.slot.device)) % self.window
        for s in self.states:
            state = MateLayerState(ssm=s.ssm.clone() if s.ssm is not None else None,
                                   conv=s.conv.clone() if s.conv is not None else None)  # fmt: skip
            if s.keys is not None:
                state.keys = s.keys.index_select(2, order)
                state.values = s.values.index_select(2, order)
                state.key_valid = s.key_valid.index_select(1, order)
            out.append(state)
        return out

    def release(self) -> None:
        self.graph, self.logits, self.states = None, None, []


__all__ = ["StaticDecoder", "StaticLayerState"]

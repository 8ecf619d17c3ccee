"""Decode cache of a LinMU model: per layer an SSM state, a conv tail and a text-window KV ring, in fixed buffers.

Its size is fixed by the batch and the M-MATE sizes, never by the prompt length (docs/design.md §3-4). Each layer's
buffers are allocated by the first forward that writes them (the end of the prefill) and from then on updated in
place, by every forward, one token or many: the forward scan's state S (B, H, d_v, d_k), the last `d_conv - 1`
conv inputs, and a ring of `text_window` key / value slots with a validity mask (left padding never becomes a
valid key) and the slot the next token writes. Fixed addresses are what lets `linmu_cli.fast_decode` replay a
captured CUDA graph over the very cache `generate()` returns, and lets an eager forward interleave with it.

`MateCacheLayer` is a transformers `CacheLayerMixin` (cache_utils, in every supported release), so the cache
holds transformers cache-layer objects as `DynamicCache` does; `LinMUCache` is the `Cache` around them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:  # fast_decode imports the layers
    from linmu_cli.fast_decode import StaticDecoder

_BUFFERS = ("ssm", "conv", "keys", "values", "key_valid", "slot")


class MateCacheLayer(CacheLayerMixin):
    """The decode state of one M-MATE layer, updated in place (docs/design.md §3-4).

    Flex-MA touches it through `update_flex`, Local-Swin through `update_window` (the mixin's `update`): each branch
    reads its state once and writes it once. The ring holds `window` slots; `slot` (1,) long is the slot of the
    next token, i.e. the oldest one, which has just left that token's window. Read in age order (oldest first) it
    is the last `window - 1` keys, what a multi-token forward continues from.
    """

    is_sliding = True
    supports_early_init = False  # allocated by the first write, from what the layer computed

    def __init__(self, window: int | None = None, ssm_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.window, self.ssm_dtype = window, ssm_dtype  # window: the ring's slots (else the first writer's)
        self.ssm: torch.Tensor | None = None  # (B, H, d_v, d_k) ssm_dtype
        self.conv: torch.Tensor | None = None  # (B, channels, d_conv - 1)
        self.key_valid: torch.Tensor | None = None  # (B, window) bool
        self.slot: torch.Tensor | None = None  # (1,) long
        self.seen = 0  # tokens this layer's state has taken in: counted by the M-MATE block (`advance`)

    def advance(self, num_tokens: int) -> None:
        """Count a forward's tokens, once per layer, after both branches wrote (a graph replay counts too)."""
        self.seen += num_tokens

    def __repr__(self) -> str:
        return f"MateCacheLayer(window={self.window}, seen={self.seen}, bytes={self.nbytes()})"

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The buffers that exist, by name (the slot pointer included)."""
        return [(n, t) for n in _BUFFERS if (t := getattr(self, n)) is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())

    # ------------------------------------------------------------------ Flex-MA
    def update_flex(self, conv: torch.Tensor | None, ssm: torch.Tensor) -> None:
        """Write the conv tail and the SSM state after a forward, into the existing buffers when they fit (a decode
        step's state, and on the decode kernels its conv tail too, already is the buffer, updated in place)."""
        if conv is not None and conv is not self.conv:
            self.conv = _write(self.conv, conv.detach(), conv.dtype)
        if ssm is not self.ssm:
            self.ssm = _write(self.ssm, ssm.detach(), self.ssm_dtype)

    def ssm_buffer(self, batch: int, heads: int, d_v: int, d_k: int, device: torch.device) -> torch.Tensor:
        """The SSM state buffer, allocated (zeros) when a decode step comes before any prefill."""
        if self.ssm is None:
            self.ssm = torch.zeros(batch, heads, d_v, d_k, dtype=self.ssm_dtype, device=device)
        return self.ssm

    def conv_buffer(
        self, batch: int, channels: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The conv tail buffer (B, channels, width), allocated (zeros: the reference's empty tail) when a decode
        step on the decode kernels comes before any prefill."""
        if self.conv is None:
            self.conv = torch.zeros(batch, channels, width, dtype=dtype, device=device)
        return self.conv

    # ------------------------------------------------------------------ Local-Swin
    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, window: int | None = None
    ) -> None:
        """An empty ring of `window` slots shaped like `key_states` (B, H_kv, L, d), nothing valid."""
        self.window = window or self.window
        if not self.window:
            raise ValueError("a MateCacheLayer needs its ring size: MateCacheLayer(window=text_window)")
        bsz, kv_heads, _, dim = key_states.shape
        dev = key_states.device
        self.keys = key_states.new_zeros(bsz, kv_heads, self.window, dim)
        self.values = value_states.new_zeros(bsz, kv_heads, self.window, dim)
        self.key_valid = torch.zeros(bsz, self.window, dtype=torch.bool, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.is_initialized = True

    def set_ring(
        self, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor, slot: int = 0
    ) -> None:
        """Adopt ring buffers (B, H_kv, window, d) as they are, without a copy (the bench's random states)."""
        self.window = keys.shape[2]
        self.keys, self.values, self.key_valid = keys, values, key_valid
        self.slot = torch.full((1,), slot, dtype=torch.long, device=keys.device)
        self.is_initialized = True

    def _fits(self, key_states: torch.Tensor) -> bool:
        k = self.keys
        return k is not None and (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device) == (
            key_states.shape[0], key_states.shape[1], key_states.shape[3], key_states.dtype, key_states.device,
        )  # fmt: skip

    def update_window(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        key_valid: torch.Tensor,
        window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Add a chunk's keys (B, H_kv, L, d) after RoPE, values and validity (B, L); return what its queries
        attend to: (keys, values, valid, past), the first `past` positions being cached keys. `window`: the ring's
        slots (Local-Swin's text_window), given by the caller.

        One token (decode): written into the ring at `slot` in place (no host sync, fixed addresses: CUDA-graph
        safe), the ring itself returned, every slot in the window; the mask lets the token see itself even if it
        is padding. A chunk: the ring in age order followed by the chunk, then the last `window - 1` keys written
        back into the ring in age order (copies, in place: the prompt's keys are not kept alive).
        """
        length = key_states.shape[2]
        if not self._fits(key_states) or (window is not None and window != self.window):
            self.lazy_initialization(key_states, value_states, window)
        grad = torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)
        k_new, v_new = key_states.detach(), value_states.detach()  # the buffers never join an autograd graph
        if length == 1:
            self.keys.index_copy_(2, self.slot, k_new)
            self.values.index_copy_(2, self.slot, v_new)
            self.key_valid.index_copy_(1, self.slot, key_valid)
            mask = self.key_valid | (torch.arange(self.window, device=self.slot.device) == self.slot)
            keys, values = self.keys, self.values
            if grad:  # functional copies that carry the new token's gradient
                keys = keys.index_copy(2, self.slot, key_states)
                values = values.index_copy(2, self.slot, value_states)
            self.slot.add_(1).remainder_(self.window)
            return keys, values, mask, 0
        keys, values, valid, past = key_states, value_states, key_valid, 0
        if self.seen > 0:  # a continuation: the cached keys first (nothing cached yet: no masked-out prefix)
            past_k, past_v, past_valid = self.in_age_order()
            keys, values = torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)
            valid, past = torch.cat([past_valid, key_valid], dim=1), self.window - 1
        held = min(self.window - 1, keys.shape[2])
        self.key_valid[:, held:] = False
        if held > 0:
            self.keys[:, :, :held].copy_(keys[:, :, keys.shape[2] - held :].detach())
            self.values[:, :, :held].copy_(values[:, :, keys.shape[2] - held :].detach())
            self.key_valid[:, :held].copy_(valid[:, keys.shape[2] - held :])
        self.slot.fill_(held)
        return keys, values, valid, past

    def in_age_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last `window - 1` keys, values and validity, oldest first (copies: the ring may be overwritten)."""
        order = (self.slot + 1 + torch.arange(self.window - 1, device=self.slot.device)) % self.window
        return (self.keys.index_select(2, order), self.values.index_select(2, order),
                self.key_valid.index_select(1, order))  # fmt: skip

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' layer interface: `update_window` with every new key valid (or `key_valid=`)."""
        valid = kwargs.get("key_valid")
        if valid is None:
            valid = torch.ones(
                key_states.shape[0], key_states.shape[2], dtype=torch.bool, device=key_states.device
            )
        keys, values, _, _ = self.update_window(key_states, value_states, valid)
        self.seen += key_states.shape[2]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # no sequence dimension: the state's size never depends on the length

    def get_max_cache_shape(self) -> int:
        """The name `get_max_length` had before transformers 5.16 (abstract in some releases: defined here)."""
        return -1

    # ------------------------------------------------------------------ batch rows (generation utilities)
    def reset(self) -> None:
        """Zero every buffer in place (addresses kept); the ring's slot back to 0."""
        for _, t in self.tensors():
            t.zero_()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Pick batch rows in place (beam search): every buffer keeps its address (a captured graph stays valid)."""
        for name, t in self.tensors():
            if name != "slot":
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name, t in self.tensors():
            if name != "slot":
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name, t in self.tensors():
            if name != "slot":
                setattr(self, name, t[indices].contiguous())


def _write(buffer: torch.Tensor | None, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` copied into `buffer` in place when shapes match, else into a new contiguous buffer of `dtype`."""
    if buffer is not None and buffer.shape == value.shape and buffer.device == value.device:
        return buffer.copy_(value)
    return value.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


class LinMUCache(Cache):
    """Constant-size cache for `generate()`; created automatically by LinMU models.

    It subclasses transformers' `Cache` so generation utilities accept it; its layers are `MateCacheLayer`s.
    `static` is the CUDA-graph runner stepping this cache (`linmu_cli.fast_decode.StaticDecoder`) while
    generate(cache_implementation="static") decodes; it never holds state of its own.
    """

    is_compileable = False

    def __init__(self, num_layers: int, window: int | None = None, ssm_dtype: torch.dtype = torch.float32):
        # Cache.__init__ differs across transformers 5.x; set what its helpers read ourselves.
        self.layers = [MateCacheLayer(window, ssm_dtype) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False
        self.static_requested = False
        self.static: StaticDecoder | None = None
        # the model output class a runner step returns, and its cache field
        self.static_output: type | None = None
        self.static_output_field: str | None = None

    def __deepcopy__(self, memo: dict) -> LinMUCache:
        """A copy that owns its buffers, without the runner (it holds the model and a CUDA graph over the
        original's addresses)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, None if name == "static" else copy.deepcopy(value, memo))
        return new

    def __repr__(self) -> str:
        return f"LinMUCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, idx: int) -> MateCacheLayer:
        return self.layers[idx]

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def advance(self, num_tokens: int) -> None:
        """Count tokens a graph replay fed (an eager forward counts per layer in `MateAttention.forward`)."""
        for layer in self.layers:
            layer.advance(num_tokens)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def drop_runner(self) -> None:
        """Forget the CUDA-graph runner (before buffers move: a batch change); the state itself stays."""
        if self.static is not None:
            self.static.release()
            self.static = None

    # --- the part of transformers' Cache interface that generation and the Qwen models use ---
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for _, t in layer.tensors():
                if t.dim() > 1:
                    return t.shape[0]
        return 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place, so a captured CUDA graph keeps stepping the reordered rows."""
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self.static is not None:
            self.static.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.drop_runner()
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.drop_runner()
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent LinMU cache cannot be rolled back (no assisted / speculative decoding)"
        )


__all__ = ["LinMUCache", "MateCacheLayer"]

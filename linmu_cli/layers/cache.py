"""Decode cache of a LinMU model: per layer an SSM state, a conv tail and a text-window KV ring.

Its size is fixed by the batch and the M-MATE sizes, never by the prompt length (docs/design.md §3-4): the forward
scan's state S (H x d_v x d_k, float32), the last `d_conv - 1` conv inputs, and the keys / values of the last
`text_window - 1` tokens with a validity mask (left padding never becomes a valid key).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass
class MateLayerState:
    ssm: torch.Tensor | None = None  # (B, H, d_v, d_k) float32
    conv: torch.Tensor | None = None  # (B, channels, d_conv - 1)
    keys: torch.Tensor | None = None  # (B, H_kv, R, d) after RoPE
    values: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None  # (B, R) bool

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (n, t)
            for n in ("ssm", "conv", "keys", "values", "key_valid")
            if (t := getattr(self, n)) is not None
        ]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, tensor in self.tensors():
            setattr(self, name, fn(tensor))


class LinMUCache(Cache):
    """Constant-size cache for `generate()`; created automatically by LinMU models.

    It subclasses transformers' `Cache` so generation utilities accept it, but keeps its own per-layer states
    instead of growing key / value lists.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        # Cache.__init__ differs across transformers 5.x; set what its helpers read ourselves.
        self.layers = [MateLayerState() for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False
        self.seen_tokens = 0
        # generate(cache_implementation="static"): after the prefill the state moves into the fixed buffers of a
        # `linmu_cli.fast_decode.StaticDecoder` (`static`), stepped in place (one CUDA graph on CUDA)
        self.static_requested = False
        self.static = None

    def __deepcopy__(self, memo: dict) -> LinMUCache:
        """A copy that owns its state; fixed buffers come back as per-layer states (a StaticDecoder holds the
        model and a CUDA graph, neither of which a cache copy should duplicate)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "static":
                setattr(new, name, copy.deepcopy(value, memo))
        new.static = None
        if self.static is not None:
            new.layers = self.static.layer_states()
        return new

    def __repr__(self) -> str:
        return f"LinMUCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, idx: int) -> MateLayerState:
        return self.layers[idx]

    def advance(self, layer_idx: int, num_tokens: int) -> None:
        """Count the chunk once (by layer 0) so `get_seq_length` matches a KV cache's."""
        if layer_idx == 0:
            self.seen_tokens += num_tokens

    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for state in self.layers for _, t in state.tensors())
        return held + (self.static.nbytes() if self.static is not None else 0)

    def unfreeze(self) -> None:
        """Move a fixed-buffer state back into per-layer states (for a multi-token forward or a batch change)."""
        if self.static is not None:
            self.layers = self.static.layer_states()
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
        if self.static is not None:
            return self.static.batch
        for state in self.layers:
            for _, t in state.tensors():
                return t.shape[0]
        return 0

    def reset(self) -> None:
        self.unfreeze()
        self.layers = [MateLayerState() for _ in self.layers]
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.static is not None:
            self.static.select_rows(beam_idx)  # in place: the CUDA graph keeps its addresses
            return
        for state in self.layers:
            state.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.unfreeze()
        for state in self.layers:
            state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.unfreeze()
        for state in self.layers:
            state.map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent LinMU cache cannot be rolled back (no assisted / speculative decoding)"
        )

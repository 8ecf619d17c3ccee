"""Local-Swin: the local softmax-attention branch of an M-MATE block (docs/design.md §4).

Vision tokens attend inside 3D windows of their own segment (shifted by half a window on odd layers); text
tokens attend causally to the last `text_window` tokens of any kind. It keeps copies of the teacher's
Q, K, V, O and applies the teacher's (M-)RoPE exactly as the teacher does (`ops/rotary`: the reference, or on
CUDA with the block's fast kernels one Triton launch for q and k; one token's decode attention over the ring is
then one Triton kernel too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import MateCacheLayer
from linmu_cli.layers.flex_ma import fast_kernels
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.ops.rotary import apply_rotary
from linmu_cli.ops.window_attention import (
    decode_attention,
    sliding_block,
    sliding_window_attention,
    window_attention,
)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LocalSwin(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, mate: MateConfig,
                 shared_with: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.mate = mate
        if shared_with is not None:
            # shared_projections: Flex-MA's Q/K/V/O, held outside the module tree (no duplicate parameter names;
            # they are saved and trained as Flex-MA's)
            self.__dict__["_shared_with"] = [shared_with]
            return
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def __getattr__(self, name: str) -> Any:
        shared = self.__dict__.get("_shared_with")
        if shared is not None and name in _PROJECTIONS:
            return getattr(shared[0], name)
        return super().__getattr__(name)

    @property
    def shared(self) -> bool:
        return "_shared_with" in self.__dict__

    def projection_parts(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of q, k, v, for the block's one input GEMM."""
        return [(m.weight, m.bias) for m in (self.q_proj, self.k_proj, self.v_proj)]

    def forward(
        self,
        u: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        layer_idx: int,
        state: MateCacheLayer | None,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """u (B, L, hidden) -> per-head outputs (B, L, H, d), before the output projection.

        `qkv`: the q, k, v projections already computed (the block's one GEMM), before RoPE.
        """
        bsz, length, _ = u.shape
        d, scale = self.head_dim, self.head_dim**-0.5
        fast = fast_kernels(u, self.mate)
        q, k, v = self._qkv(u, position_embeddings, qkv, fast)

        # text: causal sliding window over the cached ring (the cache touched once, here) followed by this chunk
        keys, values, key_valid, past = k.transpose(1, 2), v.transpose(1, 2), layout.valid, 0
        window = self.mate.text_window
        if state is not None:
            keys, values, key_valid, past = state.update_window(keys, values, key_valid, window)
        if state is not None and length == 1:  # decode: the ring is the token's whole window, itself included
            out = decode_attention(q, keys, values, key_valid, scale, fast=fast)
        else:
            queries = q.transpose(1, 2)
            if past:
                queries = torch.cat([queries.new_zeros(bsz, self.heads, past, d), queries], dim=2)
            blocks = layout.text_blocks(sliding_block(window, past + length), past)  # None without vision
            out = sliding_window_attention(queries, keys, values, key_valid, window, scale, blocks)
            out = out[:, :, past:].transpose(1, 2)

        # vision: full attention inside (shifted) 3D windows of each segment, written over the text result
        shifted = self.mate.shift_windows and layer_idx % 2 == 1
        plan = layout.window_plan(self.mate.vision_window, shifted)
        if plan is not None:
            out = window_attention(q, k, v, plan, scale, out=out)
        return out

    def _qkv(self, u: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
             qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             fast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """q, k after the teacher's rotary (one Triton launch for both when `fast`; None: the block's switch
        `fast_kernels`), v, each (B, L, heads, d)."""
        bsz, length, _ = u.shape
        fast = fast_kernels(u, self.mate) if fast is None else fast
        cos, sin = position_embeddings
        q, k, v = qkv if qkv is not None else (self.q_proj(u), self.k_proj(u), self.v_proj(u))
        q = q.view(bsz, length, self.heads, self.head_dim)
        k = k.view(bsz, length, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin, fast=fast)
        return q, k, v.view(bsz, length, self.kv_heads, self.head_dim)

"""Local-Swin: the local softmax-attention branch of an M-MATE block (DESIGN.md §4).

Vision tokens attend inside 3D windows of their own segment (shifted by half a window on odd layers); text
tokens attend causally to the last `text_window` tokens of any kind. It keeps copies of the teacher's
Q, K, V, O and applies the teacher's (M-)RoPE exactly as the teacher does.
"""

from __future__ import annotations

import torch
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import MateLayerState
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.ops.window_attention import sliding_window_attention, window_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, d); cos / sin (B, L, d) as the Qwen text rotary embedding returns them."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class LocalSwin(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, mate: MateConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.mate = mate
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(
        self,
        u: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        layer_idx: int,
        state: MateLayerState | None,
    ) -> torch.Tensor:
        """u (B, L, hidden) -> per-head outputs (B, L, H, d), before the output projection."""
        bsz, length, _ = u.shape
        d, scale = self.head_dim, self.head_dim**-0.5
        cos, sin = position_embeddings
        q = apply_rope(self.q_proj(u).view(bsz, length, self.heads, d), cos, sin)
        k = apply_rope(self.k_proj(u).view(bsz, length, self.kv_heads, d), cos, sin)
        v = self.v_proj(u).view(bsz, length, self.kv_heads, d)

        # text: causal sliding window over the cached ring followed by this chunk
        keys, values, key_valid = k.transpose(1, 2), v.transpose(1, 2), layout.valid
        if state is not None and state.keys is not None:
            keys = torch.cat([state.keys.to(keys.dtype), keys], dim=2)
            values = torch.cat([state.values.to(values.dtype), values], dim=2)
            key_valid = torch.cat([state.key_valid, key_valid], dim=1)
        past = keys.shape[2] - length
        queries = q.transpose(1, 2)
        if past:
            queries = torch.cat([queries.new_zeros(bsz, self.heads, past, d), queries], dim=2)
        window = self.mate.text_window
        out = sliding_window_attention(queries, keys, values, key_valid, window, scale)[
            :, :, past:
        ].transpose(1, 2)
        if state is not None:
            start = max(keys.shape[2] - (window - 1), 0)
            state.keys, state.values = keys[:, :, start:].detach(), values[:, :, start:].detach()
            state.key_valid = key_valid[:, start:]

        # vision: full attention inside (shifted) 3D windows of each segment
        shifted = self.mate.shift_windows and layer_idx % 2 == 1
        plan = layout.window_plan(self.mate.vision_window, shifted)
        if plan is not None:
            vis = window_attention(q, k, v, plan, scale)
            out = torch.where(layout.is_vision()[..., None, None], vis, out)
        return out

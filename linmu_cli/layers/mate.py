"""The M-MATE block: drop-in replacement of one decoder self-attention layer (docs/design.md §3-5).

out_t = W_o^flex (a_t * flex_t) + W_o^swin ((1 - a_t) * swin_t), a_t = sigmoid(w . u_t + b), one weight per
token (or per token and head). Both branches are initialized from the teacher layer's attention weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import LinMUCache
from linmu_cli.layers.flex_ma import FlexMA, fast_kernels
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.layers.local_swin import LocalSwin
from linmu_cli.ops.fused_linear import fused_linear


class MateAttention(nn.Module):
    """Called exactly like transformers' Qwen2-VL attention; returns (output, None)."""

    def __init__(self, text_config: PretrainedConfig, mate: MateConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = text_config.hidden_size
        heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        self.mate, self.layer_idx, self.heads, self.head_dim = mate, layer_idx, heads, head_dim
        if mate.use_flex:
            self.flex = FlexMA(hidden, heads, kv_heads, head_dim, text_config.rms_norm_eps, mate)
        if mate.use_swin:
            shared = self.flex if mate.use_flex and mate.shared_projections else None
            self.swin = LocalSwin(hidden, heads, kv_heads, head_dim, mate, shared_with=shared)
        if mate.use_flex and mate.use_swin:
            self.fuse = nn.Linear(hidden, heads if mate.fusion == "head" else 1, bias=True)

    @classmethod
    def from_attention(
        cls, attn: nn.Module, text_config: PretrainedConfig, mate: MateConfig, layer_idx: int
    ) -> MateAttention:
        """A block whose branches copy `attn`'s projections; new parameters get their documented init."""
        ref = attn.q_proj.weight
        block = cls(text_config, mate, layer_idx).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for branch in (getattr(block, "flex", None), getattr(block, "swin", None)):
                if branch is None:
                    continue
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    src, dst = getattr(attn, name), getattr(branch, name)
                    dst.weight.copy_(src.weight)
                    if dst.bias is not None:
                        dst.bias.copy_(src.bias)
            if mate.use_flex:
                block.flex.init_new_parameters(getattr(text_config, "initializer_range", 0.02))
            if hasattr(block, "fuse"):
                block.fuse.weight.zero_()
                block.fuse.bias.fill_(math.log(mate.fusion_init / (1 - mate.fusion_init)))
        return block

    def _layout(self, hidden_states: torch.Tensor, kwargs: dict) -> TokenLayout:
        """The chunk's token layout, from the `linmu_layout` keyword: the one way it reaches a block (LinMU models
        build it once per forward, docs/design.md §2). Without it the block cannot tell vision from text: an error,
        never a silent "all text"."""
        bsz, length, _ = hidden_states.shape
        layout = kwargs.get("linmu_layout")
        if layout is None:
            raise ValueError(
                "an M-MATE block needs the token layout of its input: call it with linmu_layout=TokenLayout(...) "
                "(a LinMU model's forward builds it; for text only, TokenLayout.text_only(batch, length, device))"
            )
        if (layout.batch, layout.length) != (bsz, length):
            raise ValueError(
                f"token layout is for ({layout.batch}, {layout.length}) but the block got ({bsz}, {length})"
            )
        return layout

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LinMUCache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LinMUCache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """The block on a chunk, or on one token with a cache: the decode step, the only one (generate() runs it
        eagerly, `linmu_cli.fast_decode` records it in a CUDA graph), updating the layer's cache in place."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LinMUCache):
            raise TypeError(f"LinMU layers need a LinMUCache, got {type(cache).__name__}")
        layout = self._layout(hidden_states, kwargs)
        state = cache.layer(self.layer_idx) if cache is not None else None
        u = hidden_states
        flex_in = qkv = logit = None
        fast = self._fast(u)
        if fast:
            flex_in, qkv, logit = self._project(u, layout)
        flex = self.flex(u, layout, self.layer_idx, state, inputs=flex_in) if self.mate.use_flex else None
        swin = (
            self.swin(u, position_embeddings, layout, self.layer_idx, state, qkv=qkv)
            if self.mate.use_swin
            else None
        )
        if state is not None:
            state.advance(u.shape[1])
        return self._combine(u, flex, swin, logit, fast), None

    def _fast(self, u: torch.Tensor) -> bool:
        """A chunk on CUDA with a fast backend: one input GEMM, fused output. One decode token keeps the
        per-module projections (concatenating the weights would cost more than it saves)."""
        return fast_kernels(u, self.mate) and u.shape[1] > 1

    def _project(self, u: torch.Tensor, layout: TokenLayout):
        """Every input projection of the block from one GEMM over concatenated weights (names unchanged):
        Flex-MA's [x, B, C], gate, dt(s); Local-Swin's q, k, v (slices of Flex-MA's with shared projections);
        the fusion logit. Returns (FlexInputs or None, (q, k, v) or None, logit or None)."""
        # wide outputs first (Flex-MA's [x, B, C] and gate, Local-Swin's q, k, v), the narrow step sizes and
        # fusion logit last, so every wide slice starts at a 64-column boundary of the GEMM output
        flex_parts = self.flex.projection_parts(layout) if self.mate.use_flex else []
        n_wide = min(len(flex_parts), 1 + int(self.mate.output_gate))
        own_swin = self.mate.use_swin and not self.swin.shared
        swin_parts = self.swin.projection_parts() if own_swin else []
        fuse_parts = [(self.fuse.weight, self.fuse.bias)] if hasattr(self, "fuse") else []
        pieces = fused_linear(u, [*flex_parts[:n_wide], *swin_parts, *flex_parts[n_wide:], *fuse_parts])
        n_swin = len(swin_parts)
        flex_in = None
        if self.mate.use_flex:
            flex_in = self.flex.unpack(
                [*pieces[:n_wide], *pieces[n_wide + n_swin : len(flex_parts) + n_swin]]
            )
        qkv = None
        if own_swin:
            qkv = tuple(pieces[n_wide : n_wide + 3])
        elif self.mate.use_swin:  # shared: Flex-MA's conv input is [v, k, q]
            kv = self.flex.kv_heads * self.head_dim
            xbc = flex_in.xbc
            qkv = (xbc[..., 2 * kv :], xbc[..., kv : 2 * kv], xbc[..., :kv])
        logit = pieces[-1] if hasattr(self, "fuse") else None
        return flex_in, qkv, logit

    def _combine(self, u: torch.Tensor, flex: torch.Tensor | None, swin: torch.Tensor | None,
                 logit: torch.Tensor | None = None, fast: bool = False) -> torch.Tensor:  # fmt: skip
        if swin is None:
            return self.flex.o_proj(flex.flatten(2))
        if flex is None:
            return self.swin.o_proj(swin.flatten(2))
        a = torch.sigmoid(self.fuse(u) if logit is None else logit)[..., None]  # (B, L, 1 or H, 1)
        if not fast:  # the reference: the formula of docs/design.md §5 as written
            return self.flex.o_proj((a * flex).flatten(2)) + self.swin.o_proj(((1 - a) * swin).flatten(2))
        if self.swin.shared:  # one W_o: W_o (a flex + (1 - a) swin), the mix in one lerp kernel
            return self.flex.o_proj(torch.lerp(swin, flex, a.to(swin.dtype)).flatten(2))
        # two W_o: the second GEMM accumulates into the first's output (no separate add)
        out = self.flex.o_proj((a * flex).flatten(2))
        rows = ((1 - a) * swin).reshape(-1, self.heads * self.head_dim)
        return torch.addmm(out.reshape(-1, out.shape[-1]), rows, self.swin.o_proj.weight.t()).view(out.shape)


def set_ssd_backend(model: nn.Module, backend: str) -> None:
    """Run every M-MATE block of `model` on SSD backend `backend` ("auto", "torch", "fla", "mamba").

    The kernel choice is a runtime setting, like transformers' attn_implementation: it is not saved in the
    checkpoint (MateConfig.to_dict leaves it out), so a loaded model runs "auto" until this is called.
    """
    for module in model.modules():
        if isinstance(module, MateAttention):
            mate = module.mate.replace(ssd_backend=backend)  # validates the name
            for part in (module, getattr(module, "flex", None), getattr(module, "swin", None)):
                if part is not None:
                    part.mate = mate

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
from linmu_cli.layers.cache import LinMUCache, MateCacheLayer
from linmu_cli.layers.flex_ma import FlexInputs, FlexMA, fast_kernels
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.layers.local_swin import LocalSwin
from linmu_cli.ops.fused_linear import PackedLinear, fused_linear, group_part
from linmu_cli.ops.fusion_mix import fusion_mix

# what `_projection_groups` returns beside the groups: (Flex-MA's groups, the wide ones among them, Local-Swin's)
Counts = tuple[int, int, int]


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
            if mate.fusion_vision_init is not None:  # vision tokens' extra fusion bias (MateConfig)
                self.fuse_vision = nn.Parameter(torch.zeros(self.fuse.out_features))

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
                block.fuse.bias.fill_(_logit(mate.fusion_init))
            if hasattr(block, "fuse_vision"):
                block.fuse_vision.fill_(_logit(mate.fusion_vision_init) - _logit(mate.fusion_init))
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
        eagerly, `linmu_cli.fast_decode` records it in a CUDA graph), updating the layer's cache in place. On CUDA
        outside autograd that step runs the decode kernels (`_decode`); elsewhere the reference below."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LinMUCache):
            raise TypeError(f"LinMU layers need a LinMUCache, got {type(cache).__name__}")
        layout = self._layout(hidden_states, kwargs)
        state = cache.layer(self.layer_idx) if cache is not None else None
        u = hidden_states
        if self._decode_kernels(u, layout, state):
            return self._decode(u, position_embeddings, layout, state), None
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
        return self._combine(u, flex, swin, layout, logit, fast), None

    def _fast(self, u: torch.Tensor) -> bool:
        """A chunk on CUDA with a fast backend: one input GEMM, fused output. One decode token takes `_decode`
        instead (concatenating the weights per step would cost more than it saves: `pack_decode_weights`)."""
        return fast_kernels(u, self.mate) and u.shape[1] > 1

    def _decode_kernels(self, u: torch.Tensor, layout: TokenLayout, state: MateCacheLayer | None) -> bool:
        """One text token with a cache, on CUDA with a fast backend, outside autograd (the decode kernels have no
        backward): the decode step of `_decode`. Everything else (CPU, "torch", grad mode) is the reference."""
        one_token = state is not None and u.shape[1] == 1 and not layout.has_vision
        return one_token and self.mate.use_flex and not torch.is_grad_enabled() and fast_kernels(u, self.mate)

    def _projection_groups(self, layout: TokenLayout) -> tuple[list[list[nn.Linear]], Counts]:
        """The block's input projections in the column order of its one GEMM, one output slice per group:
        Flex-MA's [x, B, C], gate, dt(s); Local-Swin's q, k, v (unless shared); the fusion logit. Wide outputs first
        (Flex-MA's [x, B, C] and gate, Local-Swin's q, k, v), the narrow step sizes and fusion logit last, so every
        wide slice starts at a 64-column boundary of the GEMM output."""
        flex = self.flex.projection_groups(layout) if self.mate.use_flex else []
        n_wide = min(len(flex), 1 + int(self.mate.output_gate))
        swin = []
        if self.mate.use_swin and not self.swin.shared:
            swin = [[self.swin.q_proj], [self.swin.k_proj], [self.swin.v_proj]]  # Local-Swin's q, k, v
        fuse = [[self.fuse]] if hasattr(self, "fuse") else []
        return [*flex[:n_wide], *swin, *flex[n_wide:], *fuse], (len(flex), n_wide, len(swin))

    def _project(self, u: torch.Tensor, layout: TokenLayout):
        """Every input projection of the block from one GEMM over concatenated weights (names unchanged).
        Returns (FlexInputs or None, (q, k, v) or None, logit or None)."""
        groups, counts = self._projection_groups(layout)
        return self._split_projections(fused_linear(u, [group_part(g) for g in groups]), counts)

    def _split_projections(self, pieces: list[torch.Tensor], counts: Counts):
        """The GEMM's output slices (`_projection_groups` order) -> (FlexInputs, (q, k, v), logit), each or None."""
        n_flex, n_wide, n_swin = counts
        flex_in = None
        if self.mate.use_flex:
            flex_in = self.flex.unpack([*pieces[:n_wide], *pieces[n_wide + n_swin : n_flex + n_swin]])
        qkv = None
        if n_swin:
            qkv = tuple(pieces[n_wide : n_wide + 3])
        elif self.mate.use_swin:  # shared: Flex-MA's conv input is [v, k, q]
            qkv = self._shared_qkv(flex_in)
        logit = pieces[-1] if hasattr(self, "fuse") else None
        return flex_in, qkv, logit

    def _shared_qkv(self, flex_in: FlexInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local-Swin's q, k, v with shared projections: slices of Flex-MA's conv input [x, B, C] = [v, k, q]."""
        kv = self.flex.kv_heads * self.head_dim
        xbc = flex_in.xbc
        return xbc[..., 2 * kv :], xbc[..., kv : 2 * kv], xbc[..., :kv]

    def _decode(
        self,
        u: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        state: MateCacheLayer,
    ) -> torch.Tensor:
        """The decode step on the decode kernels (see `_decode_kernels`), writing the layer's cache in place.

        Inputs: one GEMV over the kept pack (`pack_decode_weights`; refreshed here when a weight changed), else
        the per-module projections. Local-Swin runs first, so that Flex-MA's fused kernel (`FlexMA.decode`) also
        does the fusion mix; then W_o^flex as one GEMV and W_o^swin accumulated into it with one addmm (one W_o
        with shared projections). Launches besides Local-Swin's: GEMV(s), conv, fused step, output GEMV(s)."""
        pack = self.__dict__.get("_decode_pack")
        if pack is not None:
            pack.refresh()
            flex_in, qkv, logit = self._split_projections(pack(u), self.__dict__["_decode_counts"])
        else:
            flex_in = self.flex.project(u, layout)
            qkv = self._shared_qkv(flex_in) if self.mate.use_swin and self.swin.shared else None
            logit = self.fuse(u) if hasattr(self, "fuse") else None
        swin = None
        if self.mate.use_swin:
            swin = self.swin(u, position_embeddings, layout, self.layer_idx, state, qkv=qkv)[:, 0]
        shared = self.mate.use_swin and self.swin.shared
        mixed = self.flex.decode(flex_in, layout, state, logit[:, 0] if swin is not None else None, swin,
                                 one_output=shared)  # fmt: skip
        state.advance(1)
        if swin is None or shared:
            return self.flex.o_proj(mixed)
        return self._two_output_projections(mixed[:, :1], mixed[:, 1:])

    def _two_output_projections(self, flex: torch.Tensor, swin: torch.Tensor) -> torch.Tensor:
        """W_o^flex flex + W_o^swin swin, (B, L, H d) each: the second GEMM accumulates into the first's output."""
        out = self.flex.o_proj(flex)
        rows = swin.reshape(-1, self.heads * self.head_dim)
        return torch.addmm(out.reshape(-1, out.shape[-1]), rows, self.swin.o_proj.weight.t()).view(out.shape)

    def _combine(self, u: torch.Tensor, flex: torch.Tensor | None, swin: torch.Tensor | None, layout: TokenLayout,
                 logit: torch.Tensor | None = None, fast: bool = False) -> torch.Tensor:  # fmt: skip
        if swin is None:
            return self.flex.o_proj(flex.flatten(2))
        if flex is None:
            return self.swin.o_proj(swin.flatten(2))
        logit = self.fuse(u) if logit is None else logit  # (B, L, 1 or H)
        if hasattr(self, "fuse_vision") and layout.has_vision:
            logit = logit + layout.is_vision()[..., None].to(logit.dtype) * self.fuse_vision
        if not fast:  # the reference: the formula of docs/design.md §5 as written
            a = torch.sigmoid(logit)[..., None]
            return self.flex.o_proj((a * flex).flatten(2)) + self.swin.o_proj(((1 - a) * swin).flatten(2))
        # the fast path: sigmoid and both W_o inputs in one Triton launch (`ops/fusion_mix`, one-launch backward)
        if self.swin.shared:  # one W_o: W_o (a flex + (1 - a) swin)
            return self.flex.o_proj(fusion_mix(flex, swin, logit, one_output=True)[0].flatten(2))
        mixed_flex, mixed_swin = fusion_mix(flex, swin, logit)
        return self._two_output_projections(mixed_flex.flatten(2), mixed_swin)


def _logit(p: float) -> float:
    """The fusion bias whose sigmoid is the Flex-MA weight `p`."""
    return math.log(p / (1 - p))


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


def pack_decode_weights(model: nn.Module) -> int:
    """Keep, on every M-MATE block of `model`, its decode input projections concatenated (a `PackedLinear`): the
    CUDA decode step then reads them with one GEMV instead of 9 GEMVs and a concatenation (6 and one with shared
    projections), with no copy per step. Inference only (the decode kernels never run under autograd). Returns
    the bytes kept.

    Cost: a second copy of those weights. At the Qwen2-VL-7B shape in bf16 that is 12,864 x 3,584 x 2 B = 92.2 MB
    per layer (Flex-MA's v, k, q, gate, dt: 8,220 rows; Local-Swin's q, k, v: 4,608; the fusion logit: 1; padding
    to 64 rows), 2.58 GB for 28 layers; 8,256 rows = 59.2 MB per layer (1.66 GB) with shared projections. It saves
    9 launches per layer (252 per token; 6 / 168 shared). Calling it again refreshes stale packs in place (what a
    CUDA graph over the model needs after its weights change: a replay reads the pack, not the parameters), and
    rebuilds those whose modules were replaced.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, MateAttention) and module.mate.use_flex:
            layout = TokenLayout.text_only(1, 1, next(module.parameters()).device)
            groups, counts = module._projection_groups(layout)
            pack = module.__dict__.get("_decode_pack")
            if pack is None or not pack.built_from(groups):
                pack = module.__dict__["_decode_pack"] = PackedLinear(groups)
            else:
                pack.refresh()
            module.__dict__["_decode_counts"] = counts  # how `_decode` splits the pack's output
            total += pack.nbytes()
    return total


def drop_decode_weights(model: nn.Module) -> None:
    """Free what `pack_decode_weights` kept (the decode step goes back to the per-module projections)."""
    for module in model.modules():
        module.__dict__.pop("_decode_pack", None)
        module.__dict__.pop("_decode_counts", None)

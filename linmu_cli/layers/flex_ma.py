"""Flex-MA: the global, linear-time branch of an M-MATE block (docs/design.md §3).

A Mamba2 / SSD state-space scan whose C, B, x projections are the teacher attention's Q, K, V (biases and
the d^-1/2 scale included). The forward scan covers every token; a second, separately parameterized scan runs
backward inside each visual segment only, strictly-future, restarted at each segment. Layer l visits each
segment in scan order `scan_orders[l % k]` (Rotary Major-Scan); text tokens never move.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import MateCacheLayer
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.ops.fused_linear import fused_linear, group_part
from linmu_cli.ops.gated_norm import gated_rmsnorm
from linmu_cli.ops.gather import permute_rows
from linmu_cli.ops.short_conv import conv_step, conv_tail, short_conv
from linmu_cli.ops.skip_add import skip_add, skip_gated_norm
from linmu_cli.ops.ssd import expand_heads, flex_decode_step, ssd_step
from linmu_cli.ops.ssd import ssd_scan_gqa as ssd_scan  # grouped entry (the bench floor patches this name)


class FlexInputs(NamedTuple):
    """Flex-MA's projected inputs: `xbc` = [x, B, C] (B, L, (2 H_kv + H) d) before the conv, the raw step
    sizes (B, L, H) of both scans (the backward one None without vision), the gate (B, L, H d) or None."""

    xbc: torch.Tensor
    dt_raw: torch.Tensor
    dtb_raw: torch.Tensor | None
    gate: torch.Tensor | None


def fast_kernels(u: torch.Tensor, mate: MateConfig) -> bool:
    """The one kernel switch of an M-MATE block: on CUDA the fast paths (one input GEMM, Triton conv and gated
    norm, grouped scans) run unless the runtime `ssd_backend` is "torch", which keeps the pure-PyTorch reference
    everywhere; CPU always runs the references and never touches Triton (docs/design.md §8)."""
    return u.is_cuda and mate.ssd_backend != "torch"


def _init_dt_bias(heads: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Inverse softplus of step sizes spread log-uniformly in [dt_min, dt_max] (Mamba's init)."""
    dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))


class FlexMA(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, mate: MateConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.mate = mate
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)  # -> C
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)  # -> B
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)  # -> x
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.conv_channels = (2 * kv_heads + heads) * head_dim
        if mate.d_conv > 0:
            self.conv = nn.Conv1d(
                self.conv_channels, self.conv_channels, mate.d_conv, groups=self.conv_channels
            )
        self.dt_proj = nn.Linear(hidden, heads, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.zeros(heads))
        if mate.bidirectional:
            self.dt_proj_bwd = nn.Linear(hidden, heads, bias=False)
            self.dt_bias_bwd = nn.Parameter(torch.zeros(heads))
            self.A_log_bwd = nn.Parameter(torch.zeros(heads))
        if mate.output_gate:
            self.gate_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        mate.normed_heads(heads)  # output_norm_heads <= heads, or a LinmuError before any weight moves
        self.norm_weight = nn.Parameter(torch.ones(heads * head_dim))

    @torch.no_grad()
    def init_new_parameters(self, init_std: float) -> None:
        """Initialize everything the teacher has no counterpart for (Mamba2 conventions; conv = identity)."""
        m = self.mate
        if m.d_conv > 0:
            self.conv.weight.zero_()
            self.conv.weight[:, 0, -1] = 1.0
            self.conv.bias.zero_()
        suffixes = ["", "_bwd"] if m.bidirectional else [""]
        for sfx in suffixes:
            getattr(self, f"dt_proj{sfx}").weight.zero_()
            getattr(self, f"dt_bias{sfx}").copy_(_init_dt_bias(self.heads, m.dt_min, m.dt_max))
            a = torch.empty(self.heads).uniform_(m.a_init_min, m.a_init_max)
            getattr(self, f"A_log{sfx}").copy_(torch.log(a))
        self.D.fill_(m.d_init)
        if m.output_gate:
            self.gate_proj.weight.normal_(0.0, init_std)
        self.norm_weight.fill_(1.0)

    @property
    def normed_heads(self) -> int:
        """How many heads (the first ones) the per-head RMSNorm covers (`MateConfig.normed_heads`): H by default, 0
        with `output_norm: false`; the others keep magnitude (gate and per-channel scale only)."""
        return self.mate.normed_heads(self.heads)

    def fast_path(self, u: torch.Tensor) -> bool:
        """Whether this branch runs its CUDA kernels on `u` (see `fast_kernels`)."""
        return fast_kernels(u, self.mate)

    def projection_groups(self, layout: TokenLayout) -> list[list[nn.Linear]]:
        """The input projections in the order `unpack` expects, one output slice per group: [x, B, C] = [v, k, q]
        (the conv input, one contiguous slice of the GEMM output), gate, dt, backward dt (only when it runs)."""
        groups = [[self.v_proj, self.k_proj, self.q_proj]]
        if self.mate.output_gate:
            groups.append([self.gate_proj])
        groups.append([self.dt_proj])
        if self.mate.bidirectional and layout.has_vision:
            groups.append([self.dt_proj_bwd])
        return groups

    def projection_parts(self, layout: TokenLayout) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each of `projection_groups` ([x, B, C] merged), for `fused_linear`."""
        return [group_part(g) for g in self.projection_groups(layout)]

    def unpack(self, pieces: list[torch.Tensor]) -> FlexInputs:
        """Projection outputs in `projection_parts` order -> FlexInputs."""
        rest = list(pieces[1:])
        gate = rest.pop(0) if self.mate.output_gate else None
        dt_raw = rest.pop(0)
        return FlexInputs(pieces[0], dt_raw, rest.pop(0) if rest else None, gate)

    def project(self, u: torch.Tensor, layout: TokenLayout, fused: bool = False) -> FlexInputs:
        """The input projections: module by module (the reference; forward hooks see each) or one GEMM."""
        if fused:
            return self.unpack(fused_linear(u, self.projection_parts(layout)))
        pieces = [torch.cat([self.v_proj(u), self.k_proj(u), self.q_proj(u)], dim=-1)]
        if self.mate.output_gate:
            pieces.append(self.gate_proj(u))
        pieces.append(self.dt_proj(u))
        if self.mate.bidirectional and layout.has_vision:
            pieces.append(self.dt_proj_bwd(u))
        return self.unpack(pieces)

    def forward(
        self,
        u: torch.Tensor,
        layout: TokenLayout,
        layer_idx: int,
        state: MateCacheLayer | None,
        inputs: FlexInputs | None = None,
    ) -> torch.Tensor:
        """u (B, L, hidden) -> per-head outputs (B, L, H, d), before the output projection.

        `inputs`: the projections already computed (the block's one GEMM); else computed here. Conv, the
        step sizes, both scans and the D skip stay at key/value-head width for x and B (GQA). On the fast path the
        backward scan's masked output and the D skip are one kernel (`linmu_cli.ops.skip_add`). The cache
        (`state`: conv tail and SSM state) is read once at the start and written once at the end.
        """
        bsz, length, _ = u.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        decode = state is not None and length == 1 and not layout.has_vision
        fast = self.fast_path(u) and not decode  # the kernel choice: one decode token keeps the reference ops
        conv_prev, ssm_prev = (state.conv, state.ssm) if state is not None else (None, None)
        if inputs is None:
            inputs = self.project(u, layout, fused=fast)
        xbc = inputs.xbc
        if not (fast and layout.all_valid):  # (all_valid may read the mask back once: never in decode)
            xbc = xbc * layout.valid[..., None].to(xbc.dtype)  # padding stays zero
        conv_next = None
        if self.mate.d_conv > 0:  # causal depthwise conv in token order, continuing from the cached tail
            if state is not None:
                conv_next = conv_tail(xbc, conv_prev, self.mate.d_conv).detach()
            xbc = short_conv(xbc, self.conv.weight, self.conv.bias, conv_prev, fast=fast)
        x, b, c = torch.split(xbc, [hk * d, hk * d, h * d], dim=-1)
        x, b, c = x.view(bsz, length, hk, d), b.view(bsz, length, hk, d), c.view(bsz, length, h, d)
        dt = F.softplus(inputs.dt_raw.float() + self.dt_bias) * layout.valid[..., None]
        a = -torch.exp(self.A_log.float())

        if decode:  # one recurrence step (ops/ssd/step.py) on the cache's buffer, in place outside autograd
            ssm = state.ssm_buffer(bsz, h, d, d, u.device)
            y, ssm_next = ssd_step(expand_heads(x, h)[:, 0], dt[:, 0], a, expand_heads(b, h)[:, 0],
                                   (c * d**-0.5)[:, 0], ssm, backend=self.mate.ssd_backend)  # fmt: skip
            y, back, keep = y[:, None], None, None
        else:
            # a reduced-precision cache state (LinMUCache ssm_dtype) enters the scan in float32
            if ssm_prev is not None and ssm_prev.dtype != torch.float32:
                ssm_prev = ssm_prev.float()
            y, ssm_next, back, keep = self._scan(
                xbc, dt, a, inputs.dtb_raw, layout, layer_idx, ssm_prev, state is not None, add_back=not fast
            )
        if state is not None:  # the one write of Flex-MA's cache, after every read of it
            state.update_flex(conv_next, ssm_next)

        # y + D * x with x at key/value width, broadcast over each group (no repeated copy of x)
        g = h // hk
        normed = self.normed_heads
        if fast and normed == h:  # one kernel: y + keep * back + D x, gate, per-head norm of every head
            return skip_gated_norm(y, back, keep, x, self.D, inputs.gate, self.norm_weight, self.eps)
        if fast:  # one kernel: y + keep * back + D x (the backward scan's output not added by `_scan`)
            y = skip_add(y, back, keep, x, self.D, fast=True)
        else:
            y = torch.addcmul(
                y.reshape(bsz, length, hk, g, d), self.D.to(y.dtype).view(hk, g, 1), x.unsqueeze(3)
            )
        if normed == 0:  # magnitude kept: gate and per-channel scale, no RMS
            y = y.view(bsz, length, h, d)
            if inputs.gate is not None:
                y = y * F.silu(inputs.gate).view(*y.shape)
            return y * self.norm_weight.to(y.dtype).view(h, d)
        # some heads normed (output_norm_heads < H): gated_rmsnorm runs its reference, which norms the first ones
        return gated_rmsnorm(y.view(bsz, length, h, d), inputs.gate, self.norm_weight, self.eps, fast=fast,
                             norm_heads=normed)  # fmt: skip

    def decode(
        self,
        inputs: FlexInputs,
        layout: TokenLayout,
        state: MateCacheLayer,
        logit: torch.Tensor | None = None,
        swin: torch.Tensor | None = None,
        one_output: bool = False,
    ) -> torch.Tensor:
        """One text token on the decode kernels (the M-MATE block runs it on CUDA outside autograd; `forward`'s
        decode branch is the reference): the conv step, which shifts the cached tail in place, then one kernel for
        the step size, the recurrence on the cache's state (in place), the D skip, the gate and the norm and, given
        Local-Swin's output `swin` (B, H, d) and the fusion `logit` (B, 1 or H), the fusion mix.

        Returns (B, n, H d) in the projections' dtype: y (n = 1); a y and (1 - a) swin (n = 2); with `one_output`
        a y + (1 - a) swin (n = 1, for one W_o)."""
        xbc = inputs.xbc[:, 0]
        bsz, h, d = xbc.shape[0], self.heads, self.head_dim
        valid = layout.valid[:, 0]
        conv = None
        if self.mate.d_conv > 0:
            conv = state.conv_buffer(bsz, self.conv_channels, self.mate.d_conv - 1, xbc.dtype, xbc.device)
            xbc = conv_step(xbc, conv, self.conv.weight, self.conv.bias, valid)
        ssm = state.ssm_buffer(bsz, h, d, d, xbc.device)
        gate = inputs.gate[:, 0] if inputs.gate is not None else None
        out = flex_decode_step(
            xbc, inputs.dt_raw[:, 0], gate, ssm, valid, self.dt_bias, self.A_log, self.D, self.norm_weight,
            kv_heads=self.kv_heads, eps=self.eps, norm=self.normed_heads > 0, norm_heads=self.normed_heads,
            mask_input=self.mate.d_conv == 0, logit=logit, swin=swin, one_output=one_output,
        )  # fmt: skip
        state.update_flex(conv, ssm)  # the one write: both buffers already hold the new state
        return out

    def _scan(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        a: torch.Tensor,
        dtb_raw: torch.Tensor | None,
        layout: TokenLayout,
        layer_idx: int,
        initial_state: torch.Tensor | None,
        final: bool,
        add_back: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Forward SSD scan over every token plus the segment-confined backward scan: (y (B, L, H, d), the
        forward scan's final state when `final`, else None, back, keep). With `add_back` (the reference) y holds
        the backward scan's masked output and back, keep are None; without it (the fast path, whose `skip_add`
        adds it with the D skip) back (B, L, H, d) and its per-token mask keep (B, L, 1, 1) come apart (None
        without a backward scan).

        The conv output xbc = [x, B, C] is put into scan order with one row gather (x and B at key/value
        width), using index maps the layout built once per forward (docs/design.md §3); the output comes
        back with one more. The backward scan gathers its inputs the same way, packed one segment per row
        (no resets, text skipped, no host sync), and adds its strictly-future output with one masked gather.
        """
        bsz, length, width = xbc.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        kv = hk * d
        flat, dt_flat = xbc.reshape(bsz * length, width), dt.reshape(bsz * length, h)
        order = self.mate.scan_orders[layer_idx % len(self.mate.scan_orders)]
        sg = layout.scan_gather(order)
        scanned = flat if sg is None else permute_rows(flat, sg.index, sg.inverse)
        dts = dt if sg is None else permute_rows(dt_flat, sg.index, sg.inverse).view(bsz, length, h)
        xs, bs, cs = torch.split(scanned.view(bsz, length, width), [kv, kv, h * d], dim=-1)
        y = ssd_scan(
            xs.view(bsz, length, hk, d), dts, a, bs.view(bsz, length, hk, d), cs.view(bsz, length, h, d),
            scale=d**-0.5, initial_state=initial_state, chunk_size=self.mate.chunk_size,
            return_final_state=final, backend=self.mate.ssd_backend,
        )  # fmt: skip
        y, final_state = y if final else (y, None)
        if sg is not None:
            y = permute_rows(y.reshape(bsz * length, h * d), sg.inverse, sg.index).view(bsz, length, h, d)

        # backward scan, confined to each visual segment, strictly future
        bg = layout.backward_gather(order) if self.mate.bidirectional else None
        if bg is not None:
            dt_b = F.softplus(dtb_raw.float() + self.dt_bias_bwd) * layout.valid[..., None]
            a_b = -torch.exp(self.A_log_bwd.float())
            rows, steps = bg.rows, bg.steps
            xb = flat[:, : 2 * kv].index_select(0, bg.index).view(rows, steps, 2, hk, d)
            cb = flat[:, 2 * kv :].index_select(0, bg.next_index).view(rows, steps, h, d)
            dtb = dt_b.reshape(bsz * length, h).index_select(0, bg.index).view(rows, steps, h)
            yb = ssd_scan(
                xb[:, :, 0], dtb, a_b, xb[:, :, 1], cb, scale=d**-0.5, chunk_size=self.mate.chunk_size,
                backend=self.mate.ssd_backend,
            )  # fmt: skip
            back = yb.reshape(rows * steps, h * d).index_select(0, bg.out_index).view(bsz, length, h, d)
            if not add_back:
                return y, final_state, back, bg.keep
            y = torch.addcmul(y, back, bg.keep.to(y.dtype))
        return y, final_state, None, None

"""Flex-MA: the global, linear-time branch of an M-MATE block (docs/design.md §3).

A Mamba2 / SSD state-space scan whose C, B, x projections are the teacher attention's Q, K, V (biases and
the d^-1/2 scale included). The forward scan covers every token; a second, separately parameterized scan runs
backward inside each visual segment only, strictly-future, restarted at each segment. Layer l visits each
segment in scan order `scan_orders[l % k]` (Rotary Major-Scan); text tokens never move.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linmu_cli.config import MateConfig
from linmu_cli.layers.cache import MateLayerState
from linmu_cli.layers.floor import mixers_skipped
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.ops.ssd import ssd_scan
from linmu_cli.ops.ssd_step import ssd_step


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, r], ...] for a (B, L, ...) tensor."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


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

    def _conv(self, xbc: torch.Tensor, state: MateLayerState | None) -> torch.Tensor:
        """Causal depthwise conv in token order, continuing from the cached tail."""
        k = self.mate.d_conv
        seq = xbc.transpose(1, 2)  # (B, C, L)
        prev = (
            state.conv
            if state is not None and state.conv is not None
            else seq.new_zeros(*seq.shape[:2], k - 1)
        )
        full = torch.cat([prev.to(seq.dtype), seq], dim=2)
        if state is not None:
            tail = full[:, :, full.shape[2] - (k - 1) :].detach()
            if state.conv is not None and state.conv.shape == tail.shape and seq.shape[2] == 1:
                state.conv.copy_(tail)  # decode: in place (fixed address, CUDA-graph safe)
            else:
                state.conv = tail.clone()  # a copy: a view would keep the whole prompt's inputs alive
        return F.conv1d(full, self.conv.weight, self.conv.bias, groups=self.conv_channels).transpose(1, 2)

    def forward(
        self, u: torch.Tensor, layout: TokenLayout, layer_idx: int, state: MateLayerState | None
    ) -> torch.Tensor:
        """u (B, L, hidden) -> per-head outputs (B, L, H, d), before the output projection."""
        bsz, length, _ = u.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        valid = layout.valid[..., None].to(u.dtype)
        xbc = (
            torch.cat([self.v_proj(u), self.k_proj(u), self.q_proj(u)], dim=-1) * valid
        )  # padding stays zero
        if self.mate.d_conv > 0:
            xbc = self._conv(xbc, state)
        x, b, c = torch.split(xbc, [hk * d, hk * d, h * d], dim=-1)
        group = h // hk
        x = x.view(bsz, length, hk, d).repeat_interleave(group, dim=2)
        b = b.view(bsz, length, hk, d).repeat_interleave(group, dim=2)
        c = c.view(bsz, length, h, d) * d**-0.5
        dt = F.softplus(self.dt_proj(u).float() + self.dt_bias) * layout.valid[..., None]
        a = -torch.exp(self.A_log.float())

        if mixers_skipped():  # bench floor (layers/floor.py): no scans, everything around them runs
            if self.mate.bidirectional and layout.has_vision:
                self.dt_proj_bwd(u)  # the backward branch's projection still counts
            y = x
        elif state is not None and length == 1 and not layout.has_vision:  # decode: one recurrence step
            ssm = state.ssm if state.ssm is not None else x.new_zeros(bsz, h, d, d, dtype=torch.float32)
            y, ssm = ssd_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], ssm, backend=self.mate.ssd_backend)
            state.ssm, y = ssm.detach(), y[:, None]
        else:
            y = self._scan(u, x, dt, a, b, c, layout, layer_idx, state)

        y = y + self.D.to(y.dtype)[:, None] * x
        if self.mate.output_gate:
            y = y * F.silu(self.gate_proj(u)).view(bsz, length, h, d)
        y = y.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.norm_weight.float().view(h, d)).to(u.dtype)

    def _scan(self, u, x, dt, a, b, c, layout: TokenLayout, layer_idx: int, state: MateLayerState | None):
        """Forward SSD scan over every token plus the segment-confined backward scan: (B, L, H, d)."""
        length = x.shape[1]
        # forward scan over every token, each segment in this layer's scan order
        order = self.mate.scan_orders[layer_idx % len(self.mate.scan_orders)]
        perm = layout.scan_index(order)
        xs, dts, bs, cs = (x, dt, b, c) if perm is None else (_gather_seq(t, perm[0]) for t in (x, dt, b, c))
        init = state.ssm if state is not None else None
        y = ssd_scan(
            xs, dts, a, bs, cs, initial_state=init, chunk_size=self.mate.chunk_size,
            return_final_state=state is not None, backend=self.mate.ssd_backend,
        )  # fmt: skip
        if state is not None:
            y, final = y
            state.ssm = final.detach()
        if perm is not None:
            y = _gather_seq(y, perm[1])

        # backward scan, confined to each visual segment, strictly future
        plan = layout.backward_plan(order) if self.mate.bidirectional else None
        if plan is not None:
            dt_b = F.softplus(self.dt_proj_bwd(u).float() + self.dt_bias_bwd) * layout.valid[..., None]
            a_b = -torch.exp(self.A_log_bwd.float())
            yb = ssd_scan(
                _gather_seq(x, plan.index), _gather_seq(dt_b, plan.index), a_b, _gather_seq(b, plan.index),
                _gather_seq(c, plan.next_index), reset=plan.reset, chunk_size=self.mate.chunk_size,
                backend=self.mate.ssd_backend,
            )  # fmt: skip
            yb = F.pad(yb, (0, 0, 0, 0, 1, 0))[:, :length] * (~plan.reset)[..., None, None]
            y = y + _gather_seq(yb, plan.inverse)
        return y

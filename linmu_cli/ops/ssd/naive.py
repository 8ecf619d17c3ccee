"""The SSD recurrence as written in docs/design.md §3, one token at a time in float32: the ground truth.

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t

:func:`ssd_step_naive` is one token; :func:`ssd_naive` runs it over a sequence (with resets and an initial
state). Every other path (chunked PyTorch, fla, mamba, the in-place decode step) is tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmu_cli.ops.gated_norm import gated_rmsnorm_reference
from linmu_cli.ops.ssd.utils import check_inputs


def ssd_step_naive(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence, functional (``state`` is not modified).

    Args:
        x: (b, h, p) values.
        dt: (b, h) positive step sizes.
        A: (h,) negative decay rates.
        B: (b, h, n) keys.
        C: (b, h, n) queries.
        state: (b, h, p, n) the state before this token.

    Returns:
        (y (b, h, p), new state (b, h, p, n)), both float32.
    """
    x, dt, A, B, C, S = (t.float() for t in (x, dt, A, B, C, state))
    decay = torch.exp(dt * A)  # (b, h)
    inp = (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (b, h, p, n)
    S = decay[..., None, None] * S + inp
    return torch.einsum("bhpn,bhn->bhp", S, C), S


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssd_step_naive` over every token; the state is zeroed before step t where ``reset[:, t]``.

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, h, n).
        reset: (b, l) bool or None: True starts a new sequence at that token.
        initial_state: (b, h, p, n) or None (zeros); dropped where ``reset[:, 0]``.

    Returns:
        (y (b, l, h, p), final state (b, h, p, n)), both float32.
    """
    check_inputs(x, dt, A, B, C, reset, initial_state)
    b, T, h, p = x.shape
    n = B.shape[-1]
    S = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(T):
        if reset is not None:
            S = torch.where(reset[:, t].to(torch.bool)[:, None, None, None], torch.zeros_like(S), S)
        y, S = ssd_step_naive(x[:, t], dt[:, t], A, B[:, t], C[:, t], S)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=torch.float32)
    return y, S


def flex_step_naive(
    xbc: torch.Tensor,
    dt_raw: torch.Tensor,
    gate: torch.Tensor | None,
    state: torch.Tensor,
    valid: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    kv_heads: int,
    eps: float,
    norm: bool = True,
    norm_heads: int | None = None,
    mask_input: bool = False,
    logit: torch.Tensor | None = None,
    swin: torch.Tensor | None = None,
    one_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.ssd.step.flex_decode_step` in float32, functional: (out (B, n, H d), new state (B, H, d, d)), both
    float32 (arguments as documented there)."""
    xbc, dt_raw, state, dt_bias, A_log, D, norm_weight = (
        t.float() for t in (xbc, dt_raw, state, dt_bias, A_log, D, norm_weight)
    )
    bsz, heads, d, _ = state.shape
    keep = valid.float()[:, None]
    if mask_input:
        xbc = xbc * keep
    x, k, q = torch.split(xbc, [kv_heads * d, kv_heads * d, heads * d], dim=-1)
    g = heads // kv_heads
    x = x.view(bsz, kv_heads, d).repeat_interleave(g, 1)
    k = k.view(bsz, kv_heads, d).repeat_interleave(g, 1)
    dt = F.softplus(dt_raw + dt_bias) * keep
    y, new = ssd_step_naive(x, dt, -torch.exp(A_log), k, q.view(bsz, heads, d) * d**-0.5, state)
    y = (y + D[:, None] * x)[:, None]  # (B, 1, H, d)
    gate = gate.float()[:, None] if gate is not None else None
    if norm:
        y = gated_rmsnorm_reference(y, gate, norm_weight, eps, norm_heads=norm_heads)
    else:
        y = (y * F.silu(gate).view(y.shape) if gate is not None else y) * norm_weight.view(heads, d)
    y = y.reshape(bsz, 1, heads * d)
    if logit is None:
        return y, new
    a = torch.sigmoid(logit.float())[:, :, None].expand(bsz, heads, d).reshape(bsz, 1, heads * d)
    rest = (1 - a) * swin.float().reshape(bsz, 1, heads * d)
    return (a * y + rest if one_output else torch.cat([a * y, rest], dim=1)), new


__all__ = ["flex_step_naive", "ssd_naive", "ssd_step_naive"]

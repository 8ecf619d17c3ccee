"""One decode step of the SSD recurrence, updating the state in place (the decode path of Flex-MA, docs/design.md §3).

    S <- exp(dt A) S + dt x B^T,    y = S C        (per batch row and head; S (b, h, p, n), float32 or bf16)

A single token needs no chunked scan: on CUDA with mamba-ssm importable this is mamba's Triton
`selective_state_update` (one kernel that reads and writes S once, in place, so CUDA graphs can capture it);
elsewhere a few in-place PyTorch ops in float32. Both give y in x's dtype.

In grad mode with inputs that require grad the step is functional (a new state; nothing is modified in place).
`naive.ssd_step_naive` is the reference both paths are tested against.

:func:`flex_decode_step` is Flex-MA's whole decode step after the conv (step size, GQA, the step, D skip, gated
norm, fusion mix) in one kernel of linmu's own (`decode.py`): what the M-MATE block runs on CUDA outside autograd;
`naive.flex_step_naive` is its reference. :func:`last_ssd_step_backend` reports it as "triton".
"""

from __future__ import annotations

import functools
import importlib

import torch

from linmu_cli.ops.ssd.backends import _backend_import_error
from linmu_cli.ops.ssd.mamba import _import_mamba

_LAST_STEP_BACKEND: str | None = None


def last_ssd_step_backend() -> str | None:
    """ "mamba" or "torch": which path ran the most recent :func:`ssd_step`; "triton" when the most recent decode
    step was :func:`flex_decode_step`."""
    return _LAST_STEP_BACKEND


@functools.cache
def _import_state_update():
    _import_mamba()  # registers the bare mamba_ssm package without its compiled extension
    return importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update


def step_backend(device: torch.device | str, requested: str = "auto") -> str:
    """The step kernel for `device`: mamba's on CUDA when it imports (unless `requested` is "torch")."""
    if torch.device(device).type != "cuda" or requested == "torch":
        return "torch"
    return "mamba" if _backend_import_error("mamba") is None else "torch"


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence; outside autograd `state` is updated in place (CUDA-graph safe).

    Args:
        x: (b, h, p) values.
        dt: (b, h) positive step sizes.
        A: (h,) negative decay rates.
        B: (b, h, n) keys.
        C: (b, h, n) queries.
        state: (b, h, p, n), the state before this token: float32, or bfloat16 / float16 (updated in float32,
            stored rounded; y comes from the float32 update, as mamba's kernel does).
        backend: "auto" (mamba's kernel on CUDA when it imports) or "torch"; other names mean "auto".

    Returns:
        (y (b, h, p) in x.dtype, new state). Outside autograd the new state is `state` itself; a row with
        dt = 0 and x = 0 (padding) keeps its state. A functional step returns a float32 state.
    """
    global _LAST_STEP_BACKEND
    functional = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, state))
    name = "torch" if functional else step_backend(x.device, backend)
    _LAST_STEP_BACKEND = name
    if name == "mamba":
        b, h, p = x.shape
        n = B.shape[-1]
        # dt and A are per head: stride-0 views over p (and n) make the kernel take its scalar-decay path.
        dt_e = dt.float()[..., None].expand(b, h, p)
        a_e = A.float()[:, None, None].expand(h, p, n)
        zero = torch.zeros((), device=x.device, dtype=torch.float32).expand(h, p)
        # D must be a tensor: mamba-ssm 2.3.2 unpacks `*(D.stride(0), D.stride(1)) if D is not None else 0`,
        # which raises "Value after * must be an iterable, not int" for D=None (seen on the H200).
        y = _import_state_update()(state, x, dt_e, a_e, B.to(x.dtype), C.to(x.dtype), D=zero, dt_bias=zero)
        return y, state
    dtf = dt.float()
    decay = torch.exp(dtf * A.float())[..., None, None]  # (b, h, 1, 1)
    inp = (dtf[..., None] * x.float())[..., None] * B.float()[:, :, None, :]  # (b, h, p, n)
    if functional:
        state = state.float() * decay + inp
        new = state
    elif state.dtype == torch.float32:
        new = state.mul_(decay).add_(inp)
    else:  # a reduced-precision state (LinMUCache ssm_dtype): updated in float32, rounded once when stored
        new = state.float().mul_(decay).add_(inp)
        state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C.float())
    return y.to(x.dtype), state


def flex_decode_step(
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
) -> torch.Tensor:
    """One token of Flex-MA after its conv, in one Triton kernel, `state` updated in place (CUDA-graph safe).

    Args:
        xbc: (B, (2 H_kv + H) d) the conv output [x, B, C] (x, B at key/value-head width), unit channel stride.
        dt_raw: (B, H) step sizes before softplus and `dt_bias`; gate: (B, H d) or None (no output gate).
        state: (B, H, d, d) float32 or bf16 (updated in float32, stored rounded).
        valid: (B,) bool: False (padding) gives dt = 0, so the state is kept.
        dt_bias, A_log, D: (H,); norm_weight: (H d,). kv_heads: H_kv; eps: the norm's epsilon.
        norm: the per-head RMSNorm (MateConfig.output_norm); norm_heads: with it, how many heads (the first ones)
            it covers, the others gate and scale only (MateConfig.output_norm_heads; None: every head).
        mask_input: zero padding's xbc (no conv ran).
        logit, swin: the fusion logit (B, 1) or (B, H) and Local-Swin's output (B, H, d), both or neither.
        one_output: with the mix, write a y + (1 - a) swin (one W_o) instead of a y and (1 - a) swin.

    Returns:
        (B, n, H d) in xbc's dtype: n = 1 (y, or the one mix) or 2 (a y and (1 - a) swin, for two W_o).
    """
    global _LAST_STEP_BACKEND
    from linmu_cli.ops.ssd import decode

    _LAST_STEP_BACKEND = "triton"
    return decode.flex_step(
        xbc, dt_raw, gate, state, valid, dt_bias, A_log, D, norm_weight, kv_heads=kv_heads, eps=eps, norm=norm,
        norm_heads=norm_heads, mask_input=mask_input, logit=logit, swin=swin, one_output=one_output,
    )  # fmt: skip


__all__ = ["flex_decode_step", "last_ssd_step_backend", "ssd_step", "step_backend"]

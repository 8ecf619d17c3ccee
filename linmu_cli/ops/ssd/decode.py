"""Flex-MA's one-token decode step in two Triton kernels (docs/design.md §3, §5): the conv step and the fused step.

Why: at batch 1 the decode step is launch-bound (one M-MATE layer ran ~45 small kernels around its projections and
its output GEMVs). Here the conv over the cached tail is one kernel, and one more does, per (batch row, head):

    dt = softplus(dt_raw + dt_bias) * valid,   S <- exp(dt A) S + dt x B^T,   y = S (C d^-1/2) + D x,
    y <- rmsnorm_head(y * silu(gate)) * w      (or y * silu(gate) * w without the norm, or for heads h >= norm_heads),
    a = sigmoid(logit):  out = a y, (1 - a) swin    (or the one mix a y + (1 - a) swin for a shared W_o)

with x, B read at key/value-head width (GQA: kv head = h // (H / H_kv)), the state S (B, H, d_v, d_k) float32 or
bf16 read once and written once in place (float32 arithmetic, stored rounded, y from the float32 update, as the
torch step does), everything else in registers. Both kernels are CUDA-graph capturable: fixed buffers, no host
reads. They have no backward: the block runs them only outside autograd.

Imported only on the fast path (CPU never imports Triton); under `TRITON_INTERPRET=1` (see
`linmu_cli.ops.decode_attention.triton`) they also run on CPU tensors, which is how CPU tests check them against
the references (`short_conv_reference` + `conv_tail`; `naive.flex_step_naive`). Callers go through
`ops.short_conv.conv_step` and `ops.ssd.step.flex_decode_step`, which record the path that ran.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET

CONV_BLOCK = 256  # channels per program: 2 per thread at 4 warps (no replicated element reads its own store)


@triton.jit
def _conv_step_kernel(
    X, TAIL, W, BIAS, VALID, OUT,
    stride_xb, stride_tb, stride_tc, stride_vb, stride_ob, channels,
    WIDTH: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One (batch row, block of channels): y = bias + sum_j w_j window_j over [tail, x]; the tail moves left by one
    column, x entering last. Each channel is one thread's: it reads column j before it writes j - 1."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < channels
    keep = tl.load(VALID + b * stride_vb).to(tl.float32)
    x = tl.load(X + b * stride_xb + offs, mask=mask, other=0.0).to(tl.float32) * keep  # padding enters as 0
    y = tl.load(W + offs * WIDTH + (WIDTH - 1), mask=mask, other=0.0).to(tl.float32) * x
    if HAS_BIAS:
        y += tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    tail = TAIL + b * stride_tb + offs * stride_tc
    for j in tl.static_range(WIDTH - 1):
        col = tl.load(tail + j, mask=mask, other=0.0)
        y += tl.load(W + offs * WIDTH + j, mask=mask, other=0.0).to(tl.float32) * col.to(tl.float32)
        if j > 0:
            tl.store(tail + (j - 1), col, mask=mask)
    if WIDTH > 1:
        tl.store(tail + (WIDTH - 2), x.to(TAIL.dtype.element_ty), mask=mask)
    tl.store(OUT + b * stride_ob + offs, y.to(OUT.dtype.element_ty), mask=mask)


def conv_step(
    x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor
) -> torch.Tensor:
    """x (B, C) the new conv input (rows may be strided), tail (B, C, W-1) updated in place, weight (C, 1, W),
    bias (C,) or None, valid (B,) bool -> the conv output (B, C) in x's dtype."""
    _check_call("conv_step", x, tail, weight, bias)
    bsz, channels = x.shape
    width = weight.shape[-1]
    if x.stride(1) != 1 or tail.shape != (bsz, channels, width - 1) or (width > 1 and tail.stride(2) != 1):
        raise ValueError(
            f"conv_step needs x (B, C) with unit channel stride and a tail (B, C, {width - 1}); got x "
            f"{tuple(x.shape)} strides {x.stride()}, tail {tuple(tail.shape)} strides {tail.stride()}"
        )
    if not weight.is_contiguous():
        raise ValueError("conv_step needs a contiguous conv weight (C, 1, W)")
    out = torch.empty(bsz, channels, device=x.device, dtype=x.dtype)
    grid = (bsz, triton.cdiv(channels, CONV_BLOCK))
    with _on_device(x):
        _conv_step_kernel[grid](
            x, tail, weight, bias if bias is not None else weight, valid, out,
            x.stride(0), tail.stride(0), tail.stride(1), valid.stride(0), out.stride(0), channels,
            WIDTH=width, BLOCK_C=CONV_BLOCK, HAS_BIAS=bias is not None, num_warps=4,
        )  # fmt: skip
    return out


@triton.jit
def _flex_step_kernel(
    XBC, DT, GATE, LOGIT, SWIN, VALID, S, OUT, DT_BIAS, A_LOG, D, NORM_W,
    stride_xb, stride_dtb, stride_gb, stride_lb, stride_lh, stride_wb, stride_wh, stride_wd, stride_vb,
    stride_sb, stride_sh, stride_sp, stride_sn, stride_ob, stride_om,
    kv_heads, group, dim, scale, eps, norm_heads,
    BLOCK_D: tl.constexpr, MASK_INPUT: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
    MIX: tl.constexpr, ONE_OUTPUT: tl.constexpr,
):  # fmt: skip
    """One (batch row, head): the formulas of the module docstring; the state tile is this program's alone."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // group
    kv_width = kv_heads * dim
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    keep = tl.load(VALID + b * stride_vb).to(tl.float32)
    row = XBC + b * stride_xb  # [x, B, C] = [v, k, q]: x and B at key/value-head width
    x = tl.load(row + kvh * dim + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(row + kv_width + kvh * dim + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(row + 2 * kv_width + h * dim + offs, mask=mask, other=0.0).to(tl.float32) * scale
    if MASK_INPUT:  # no conv: the reference zeroes padding's projections
        x = x * keep
        k = k * keep
        q = q * keep
    raw = tl.load(DT + b * stride_dtb + h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw))) * keep  # F.softplus (threshold 20)
    decay = tl.exp(-dt * tl.exp(tl.load(A_LOG + h).to(tl.float32)))  # exp(dt A), A = -exp(A_log)

    s_ptr = S + b * stride_sb + h * stride_sh + offs[:, None] * stride_sp + offs[None, :] * stride_sn
    s_mask = mask[:, None] & mask[None, :]
    s = tl.load(s_ptr, mask=s_mask, other=0.0).to(tl.float32)
    s = s * decay + (dt * x)[:, None] * k[None, :]
    tl.store(s_ptr, s.to(S.dtype.element_ty), mask=s_mask)
    y = tl.sum(s * q[None, :], axis=1) + tl.load(D + h).to(tl.float32) * x  # (d_v,); 0 past dim

    if HAS_GATE:
        z = tl.load(GATE + b * stride_gb + h * dim + offs, mask=mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    if NORM:  # the first norm_heads heads (MateConfig.output_norm_heads); the others keep their magnitude
        y = tl.where(h < norm_heads, y * tl.rsqrt(tl.sum(y * y, axis=0) / dim + eps), y)
    y = y * tl.load(NORM_W + h * dim + offs, mask=mask, other=0.0).to(tl.float32)

    out = OUT + b * stride_ob + h * dim + offs
    if MIX:
        a = tl.sigmoid(tl.load(LOGIT + b * stride_lb + h * stride_lh).to(tl.float32))
        sw = tl.load(SWIN + b * stride_wb + h * stride_wh + offs * stride_wd, mask=mask, other=0.0)
        sw = sw.to(tl.float32)
        if ONE_OUTPUT:
            tl.store(out, (a * y + (1.0 - a) * sw).to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(out, (a * y).to(OUT.dtype.element_ty), mask=mask)
            tl.store(out + stride_om, ((1.0 - a) * sw).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(out, y.to(OUT.dtype.element_ty), mask=mask)


def flex_step(
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
    """The fused step (module docstring); shapes as `ops.ssd.step.flex_decode_step` documents them."""
    _check_call("flex_step", xbc, dt_raw, gate, state, dt_bias, A_log, D, norm_weight, logit, swin)
    bsz, heads, dim, dim_k = state.shape
    if dim != dim_k or xbc.shape != (bsz, (2 * kv_heads + heads) * dim) or xbc.stride(1) != 1:
        raise ValueError(f"flex_step needs xbc (B, (2 H_kv + H) d) with unit stride and a state (B, H, d, d); got "
                         f"xbc {tuple(xbc.shape)} strides {xbc.stride()}, state {tuple(state.shape)}")  # fmt: skip
    if heads % kv_heads or dt_raw.shape != (bsz, heads) or dt_raw.stride(1) != 1:
        raise ValueError(f"dt_raw must be (B, H) = {(bsz, heads)} with unit stride, H a multiple of H_kv = "
                         f"{kv_heads}; got {tuple(dt_raw.shape)} strides {dt_raw.stride()}")  # fmt: skip
    if gate is not None and (gate.shape != (bsz, heads * dim) or gate.stride(1) != 1):
        raise ValueError(
            f"gate must be (B, H d) with unit stride; got {tuple(gate.shape)} strides {gate.stride()}"
        )
    mix = logit is not None
    if mix != (swin is not None):
        raise ValueError("the fusion mix needs both the logit and Local-Swin's output")
    outputs = 2 if mix and not one_output else 1
    out = torch.empty(bsz, outputs, heads * dim, device=xbc.device, dtype=xbc.dtype)
    lb = lh = 0
    if mix:  # logit (B, 1) per token or (B, H) per head; swin (B, H, d)
        lb, lh = logit.stride(0), (logit.stride(1) if logit.shape[1] > 1 else 0)
    norm_heads = heads if norm_heads is None else norm_heads
    if not 0 <= norm_heads <= heads:
        raise ValueError(f"norm_heads must lie in [0, {heads}]; got {norm_heads}")
    block = max(16, triton.next_power_of_2(dim))
    with _on_device(xbc):
        _flex_step_kernel[(bsz, heads)](
            xbc, dt_raw, gate if gate is not None else xbc, logit if mix else xbc, swin if mix else xbc, valid,
            state, out, dt_bias, A_log, D, norm_weight,
            xbc.stride(0), dt_raw.stride(0), gate.stride(0) if gate is not None else 0, lb, lh,
            *(swin.stride() if mix else (0, 0, 0)), valid.stride(0), *state.stride(), out.stride(0), out.stride(1),
            kv_heads, heads // kv_heads, dim, dim**-0.5, eps, norm_heads,
            BLOCK_D=block, MASK_INPUT=mask_input, HAS_GATE=gate is not None, NORM=norm and norm_heads > 0, MIX=mix,
            ONE_OUTPUT=one_output, num_warps=step_warps(block),
        )  # fmt: skip
    return out


def step_warps(block: int) -> int:
    """Warps of the fused step: 8 for a 128 x 128 state tile (140 registers a thread with a float32 state on sm_90,
    no spills; 4 warps would take 252), 4 below."""
    return 8 if block >= 128 else 4


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on `t`'s GPU (Triton launches on the current device: a layer on another GPU would get a wrong one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_call(name: str, first: torch.Tensor, *rest: torch.Tensor | None) -> None:
    """CUDA tensors (or the interpreter), and no autograd: the kernels have no backward (the references have)."""
    if not (first.is_cuda or INTERPRET):
        raise RuntimeError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (first, *rest)):
        raise RuntimeError(
            f"{name} has no backward: run it under torch.no_grad() (the reference path has one)"
        )


__all__ = ["conv_step", "flex_step"]

"""The decoder layer's RMSNorm (with its residual add) and SiLU-gate product as one Triton kernel each.

Why: at decode a step is launch-bound, and transformers' RMSNorm is ~8 kernels (to float32, pow, mean, add,
rsqrt, mul, to the dtype, mul by the weight), the residual add one more, `act_fn(gate) * up` two. Here each
is one launch: one program per row for the norm (the whole row in registers, D <= MAX_NORM_DIM), a 2D grid of
(row, column block) for the product. The math and its casts are `naive.py`'s, in the same order (float32
statistics, the normed row rounded to the input dtype before the weight multiply, SiLU rounded to the dtype
before the product), so in bf16 the results match transformers' up to the order of the float32 sum and the
rsqrt / exp approximations (tests/ops/test_rms_norm.py measures how often a bf16 result differs, on the GPU).

CUDA-graph capturable (no host syncs, outputs allocated by the caller's stream). Triton's CPU interpreter
(`TRITON_INTERPRET=1`, read when this module is imported) runs the same kernels for the tests; it truncates
float32 -> bf16 instead of rounding to nearest (see linmu_cli/ops/decode_attention/triton.py for its bf16
`tl.dot` caveat, which these kernels do not hit: they load bf16 and upcast, no dot), so under it a bf16
result may be 1-2 ulp from the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET  # the one place the interpreter is detected

MAX_NORM_DIM = 1 << 16  # one program holds a row in registers: up to 64k (Qwen2-VL-72B's hidden is 8192)
SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(
    X, R, W, OUT, SUM,
    stride_x, stride_r, stride_o, stride_s, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: (optionally) s = x + r rounded to x's dtype and stored, then RMSNorm(s) * weight."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + r).to(SUM.dtype.element_ty)  # the residual add rounds to the activations' dtype
        tl.store(SUM + row * stride_s + cols, total, mask=mask)
        x = total.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / n
    normed = (x * tl.rsqrt(variance + eps)).to(X.dtype.element_ty).to(tl.float32)  # hidden.to(input_dtype)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * normed).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(G, U, OUT, stride_g, stride_u, stride_o, n, BLOCK: tl.constexpr):
    """One (row, column block): silu(gate) rounded to the dtype, times up, rounded again."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) as (rows, D) with unit stride along D (a view when it can be one)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _check_device(*tensors: torch.Tensor) -> None:
    if not all(t.is_cuda for t in tensors) and not INTERPRET:
        raise RuntimeError("the Triton norm / MLP kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _norm_warps(block: int) -> int:
    """Warps for a row of `block` float32 values: ~16 per thread (8 warps at the 7B's 3584 -> 4096)."""
    return max(1, min(16, block // 512))


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} must be ({n},) for x {tuple(x.shape)}")
    if n > MAX_NORM_DIM:
        raise ValueError(f"the Triton RMSNorm holds a row in registers: D = {n} > {MAX_NORM_DIM}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} "
                         f"{x.dtype}")  # fmt: skip
    _check_device(x, weight, *([] if residual is None else [residual]))
    xr = _rows(x)
    rr = _rows(residual) if residual is not None else xr
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    total = torch.empty_like(x) if residual is not None else None
    o2 = out.view(-1, n)
    s2 = total.view(-1, n) if total is not None else o2
    block = triton.next_power_of_2(n)
    if xr.shape[0]:
        _rms_norm_kernel[(xr.shape[0],)](
            xr, rr, weight, o2, s2, xr.stride(0), rr.stride(0), o2.stride(0), s2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_norm_warps(block),
        )  # fmt: skip
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> RMSNorm(x) * weight in promote(weight, x) (`naive.rms_norm_naive`)."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) * weight, residual + x) in one pass (`naive.add_rms_norm_naive`)."""
    out, total = _norm(x, residual, weight, eps)
    return out, total


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, both (..., F) of one dtype (`naive.silu_mul_naive`)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    _check_device(gate, up)
    n = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    o2 = out.view(-1, n)
    if g2.shape[0] and n:
        grid = (g2.shape[0], triton.cdiv(n, SILU_BLOCK))
        _silu_mul_kernel[grid](g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), n, BLOCK=SILU_BLOCK,
                               num_warps=4)  # fmt: skip
    return out


__all__ = ["INTERPRET", "MAX_NORM_DIM", "add_rms_norm", "rms_norm", "silu_mul"]

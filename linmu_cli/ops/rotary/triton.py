"""The text rotary embedding of q and k in one Triton launch, forward and backward (Local-Swin, docs/design.md §4).

Why: at 65k tokens the PyTorch form (`naive.py`: a multiply, a chunk + cat, a multiply and an add, for q and
again for k) is several elementwise passes over q (65k x 3584 bf16 = 470 MB) and k. Here each program reads one
token's cos / sin once and every head of its q and k once (strided slices of the block's fused projection GEMM
are read in place), and writes contiguous outputs in the input dtype; the math is float32, rounded once.

The backward is the same kernel on the output gradient with the transposed rotation (`TRANSPOSE`): dx1 = dy1 c1
+ dy2 s2, dx2 = dy2 c2 - dy1 s1, i.e. the rotary with -sin when sin's two halves are equal, as Qwen's are.
cos / sin get no gradient (they come from position ids).

CUDA-graph capturable (no host sync). Under Triton's CPU interpreter (TRITON_INTERPRET=1, see
`linmu_cli.ops.decode_attention.triton`) bf16 loads are converted to float32 before any arithmetic, which it
handles correctly (only its `tl.dot` of raw bf16 is wrong), so the kernel has no interpreter branch.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET  # the one place the interpreter is detected

DEFAULT_NUM_WARPS = 4
MAX_BLOCK_H = 32  # heads per tile: 32 x 64 float32 pairs per 128 threads


@triton.jit
def _rotate_heads(X, XO, x_base, out_base, stride_h, stride_d, heads, c1, c2, a, b,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    """y1 = x1 c1 - x2 a, y2 = x2 c2 + x1 b for every head of one token, BLOCK_H heads at a time (bounded
    registers for any head count); the output row is contiguous."""
    offs = tl.arange(0, BLOCK_HALF)
    mask_d = offs < HALF
    for h0 in range(0, heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < heads)[:, None] & mask_d[None, :]
        src = X + x_base + offs_h[:, None] * stride_h + offs[None, :] * stride_d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * a[None, :]
        y2 = x2 * c2[None, :] + x1 * b[None, :]
        dst = XO + out_base + offs_h[:, None] * (2 * HALF) + offs[None, :]
        tl.store(dst, y1.to(XO.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_cb, stride_cl, stride_cd,
    stride_sb, stride_sl, stride_sd,
    length, q_heads, k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    TRANSPOSE: tl.constexpr,
):  # fmt: skip
    """One token (program b * length + l): its cos / sin read once, then all its q heads and k heads."""
    row = tl.program_id(0).to(tl.int64)
    b = row // length
    pos = row % length
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    cos = COS + b * stride_cb + pos * stride_cl + offs * stride_cd
    sin = SIN + b * stride_sb + pos * stride_sl + offs * stride_sd
    c1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # the backward: the rotation's transpose
        a = -s2
        bb = -s1
    else:
        a = s1
        bb = s2
    _rotate_heads(Q, QO, b * stride_qb + pos * stride_ql, row * q_heads * (2 * HALF), stride_qh, stride_qd,
                  q_heads, c1, c2, a, bb, HALF, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    _rotate_heads(K, KO, b * stride_kb + pos * stride_kl, row * k_heads * (2 * HALF), stride_kh, stride_kd,
                  k_heads, c1, c2, a, bb, HALF, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def _head_block(heads: int) -> int:
    return min(MAX_BLOCK_H, triton.next_power_of_2(heads))


def rotary_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    transpose: bool = False,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of q (B, L, H, d) and k (B, L, H_kv, d), any strides, in one launch -> contiguous (q, k) in
    their dtypes. cos / sin: (B, L, d) or broadcastable to it (a size-1 batch or length reads with stride 0),
    any float dtype. `transpose`: the backward's rotation (no autograd here: see `rotary_triton`)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, L, heads, d) with equal B, L, d"
        )
    bsz, length, q_heads, d = q.shape
    if d % 2:
        raise ValueError(f"the rotary needs an even head_dim, got {d}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype; got {q.dtype}, {k.dtype}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError("q, k, cos and sin must be on one device")
    if not (q.is_cuda or INTERPRET):
        raise RuntimeError("the Triton rotary kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    cos, sin = cos.expand(bsz, length, d), sin.expand(bsz, length, d)  # stride-0 views where broadcast
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if bsz * length == 0:  # an empty chunk: no launch (a grid of 0 programs is an error)
        return qo, ko
    half = d // 2
    _rotary_kernel[(bsz * length,)](
        q, k, cos, sin, qo, ko,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        length, q_heads, k.shape[2],
        HALF=half, BLOCK_HQ=_head_block(q_heads), BLOCK_HK=_head_block(k.shape[2]),
        BLOCK_HALF=triton.next_power_of_2(half), TRANSPOSE=transpose, num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


class _Rotary(torch.autograd.Function):
    """Forward and backward one launch each; the backward needs only cos / sin (no activation is saved)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        ctx.save_for_backward(cos, sin)
        return rotary_kernel(q, k, cos, sin)

    @staticmethod
    def backward(
        ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dq, dk = rotary_kernel(grad_q, grad_k, cos, sin, transpose=True)
        return dq, dk, None, None


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_kernel` with autograd through q and k. cos / sin that require grad are refused: the kernel
    computes no gradient for them (the teacher's come from position ids and never do)."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("the Triton rotary has no gradient for cos / sin; use the reference (fast=False)")
    return _Rotary.apply(q, k, cos, sin)


__all__ = ["DEFAULT_NUM_WARPS", "rotary_kernel", "rotary_triton"]

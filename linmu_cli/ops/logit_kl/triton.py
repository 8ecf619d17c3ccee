"""Stage 3's logit KL (and its gradient) as one Triton kernel: one program per token row, two passes over V.

Why: at 7B shape the logits are (8258, 152064) per sample. The torch formula (`naive.py`) writes float32
copies, two log-softmaxes, exp, difference and product (about 5 GB each) and as many again in autograd's
backward. Here pass 1 streams the row once for both softmaxes' max and sum (online, as flash attention does)
and the expectation E_p[t - s]; pass 2 streams it again and writes d loss / d student = w_r / sum(w) * T *
(softmax(s / T) - softmax(t / T)), in the student's dtype, during the forward: the backward only scales it by
the incoming gradient (in place). Reads the two bf16 row twice, writes one: ~12.5 GB a sample.

kl_r = E_p[t' - s'] - lse(t') + lse(s') with t' = t / T, s' = s / T and p = softmax(t'); every sum in float32.
Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when triton is imported) runs the same kernel for the
tests (tests/ops/logit_kl_cases.py).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per iteration: 37 iterations over Qwen2-VL's 152,064


@triton.jit
def _logit_kl_kernel(
    S, T, W, WSUM, KL, G,
    stride_s, stride_t, stride_g, n_cols, inv_temp, temperature,
    HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: kl_r into KL[r]; with HAS_GRAD the row's gradient into G (zeros where the weight is 0)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m_t = float("-inf")
    z_t = 0.0
    m_s = float("-inf")
    z_s = 0.0
    acc = 0.0  # sum of exp(t' - m_t) * (t' - s'), rescaled with z_t
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        t = (
            tl.load(T + row * stride_t + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            * inv_temp
        )
        s = (
            tl.load(S + row * stride_s + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            * inv_temp
        )
        new_t = tl.maximum(m_t, tl.max(t, axis=0))
        e_t = tl.exp(t - new_t)
        rescale = tl.exp(m_t - new_t)
        acc = acc * rescale + tl.sum(tl.where(mask, e_t * (t - s), 0.0), axis=0)
        z_t = z_t * rescale + tl.sum(e_t, axis=0)
        m_t = new_t
        new_s = tl.maximum(m_s, tl.max(s, axis=0))
        z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), axis=0)
        m_s = new_s
    lse_t = m_t + tl.log(z_t)
    lse_s = m_s + tl.log(z_s)
    w = tl.load(W + row).to(tl.float32)
    tl.store(KL + row, tl.where(w != 0.0, acc / z_t - lse_t + lse_s, 0.0))
    if HAS_GRAD:
        # d (T^2 sum_r w_r kl_r / sum w) / d s_rj = w_r / sum(w) * T * (q_rj - p_rj)
        coef = w / tl.maximum(tl.load(WSUM).to(tl.float32), 1e-12) * temperature
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            t = tl.load(T + row * stride_t + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            s = tl.load(S + row * stride_s + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            g = tl.where(coef != 0.0, coef * (tl.exp(s - lse_s) - tl.exp(t - lse_t)), 0.0)
            tl.store(G + row * stride_g + start + cols, g.to(G.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) as (rows, V) with unit column stride (a view when it can be)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss (float32 scalar) and, `with_grad`, its gradient w.r.t. `student` (student's shape and dtype) for
    an incoming gradient of 1."""
    s, t = _rows(student), _rows(teacher)
    w = weights.reshape(-1).to(torch.float32).contiguous()
    if not (s.shape == t.shape and w.numel() == s.shape[0]):
        raise ValueError(f"logit_kl: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and weights "
                         f"{tuple(weights.shape)} do not line up (..., V) / (..., V) / (...)")  # fmt: skip
    rows, n_cols = s.shape
    w_sum = w.sum()
    kl = torch.empty(rows, device=s.device, dtype=torch.float32)  # per row, 0 where the weight is 0
    grad = torch.empty((rows, n_cols), device=s.device, dtype=student.dtype) if with_grad else kl
    if rows:
        _logit_kl_kernel[(rows,)](
            s, t, w, w_sum, kl, grad,
            s.stride(0), t.stride(0), grad.stride(0) if with_grad else 0, n_cols, 1.0 / temperature, temperature,
            HAS_GRAD=with_grad, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
    loss = (kl * w).sum() / w_sum.clamp_min(1e-12) * temperature**2
    return loss, grad.view(student.shape) if with_grad else None


class LogitKL(torch.autograd.Function):
    """The loss with its gradient computed in the forward (the logits are not kept for the backward)."""

    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        loss, grad = kl_loss(student, teacher, weights, temperature, with_grad=True)
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.used:  # the saved gradient is scaled in place: a second backward would scale it twice
            raise RuntimeError(
                "logit_kl's Triton backward runs once per forward (retain_graph is not supported)"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


def logit_kl(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """`naive.logit_kl_naive` through the kernel; the gradient is computed only when autograd will want it."""
    if torch.is_grad_enabled() and student.requires_grad:
        return LogitKL.apply(student, teacher, weights, temperature)
    return kl_loss(student, teacher, weights, temperature, with_grad=False)[0]

"""The fusion mix in one Triton launch, forward and backward (`naive.py` is the definition).

Why: PyTorch ran sigmoid(logit), then a * flex and (1 - a) * swin as broadcasting (non-vectorized) multiplies over
65k x 3584 bf16 = 470 MB each at 65k tokens, plus the rsub; autograd's backward as many passes again with two
reductions for the logit's gradient. Here one program reads a tile of tokens of one head of flex and swin once
(strided views read in place) and its logits, and writes both W_o inputs (or, with one shared W_o, their sum).

Backward: one launch: d flex = a g_f, d swin = (1 - a) g_s, d logit = a (1 - a) sum_d (g_f flex - g_s swin) per
(token, head) in float32 (summed over heads by a tiny op when the logit is per token). Saves no new tensor.
CUDA-graph capturable. Runs under Triton's CPU interpreter (loads converted to float32 first).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET

BLOCK_T = 16  # tokens per program


@triton.jit
def _mix_fwd(
    F, S, LG, OF, OS,
    sfb, sfl, sfh, sfd, ssb, ssl, ssh, ssd, slb, sll, slh,
    rows, length, heads,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ONE_OUTPUT: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    od = tl.arange(0, BLOCK_D)
    m = mt[:, None] & (od < DIM)[None, :]
    lg = tl.load(LG + bi * slb + li * sll + h * slh, mask=mt, other=0.0).to(tl.float32)
    a = (1.0 / (1.0 + tl.exp(-lg)))[:, None]
    f = tl.load(F + (bi * sfb + li * sfl + h * sfh)[:, None] + od[None, :] * sfd, mask=m, other=0.0)
    s = tl.load(S + (bi * ssb + li * ssl + h * ssh)[:, None] + od[None, :] * ssd, mask=m, other=0.0)
    out = (t * heads + h)[:, None] * DIM + od[None, :]
    yf = a * f.to(tl.float32)
    ys = (1.0 - a) * s.to(tl.float32)
    if ONE_OUTPUT:
        tl.store(OF + out, (yf + ys).to(OF.dtype.element_ty), mask=m)
    else:
        tl.store(OF + out, yf.to(OF.dtype.element_ty), mask=m)
        tl.store(OS + out, ys.to(OS.dtype.element_ty), mask=m)


@triton.jit
def _mix_bwd(
    GF, GS, F, S, LG, DF, DS, DL,
    sfb, sfl, sfh, sfd, ssb, ssl, ssh, ssd, slb, sll, slh,
    rows, length, heads,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ONE_OUTPUT: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    od = tl.arange(0, BLOCK_D)
    m = mt[:, None] & (od < DIM)[None, :]
    lg = tl.load(LG + bi * slb + li * sll + h * slh, mask=mt, other=0.0).to(tl.float32)
    a = 1.0 / (1.0 + tl.exp(-lg))
    f = tl.load(F + (bi * sfb + li * sfl + h * sfh)[:, None] + od[None, :] * sfd, mask=m, other=0.0)
    s = tl.load(S + (bi * ssb + li * ssl + h * ssh)[:, None] + od[None, :] * ssd, mask=m, other=0.0)
    out = (t * heads + h)[:, None] * DIM + od[None, :]
    gf = tl.load(GF + out, mask=m, other=0.0).to(tl.float32)
    if ONE_OUTPUT:  # noqa: SIM108 - a constexpr branch: no load of GS
        gs = gf
    else:
        gs = tl.load(GS + out, mask=m, other=0.0).to(tl.float32)
    tl.store(DF + out, (a[:, None] * gf).to(DF.dtype.element_ty), mask=m)
    tl.store(DS + out, ((1.0 - a)[:, None] * gs).to(DS.dtype.element_ty), mask=m)
    dot = tl.sum(gf * f.to(tl.float32) - gs * s.to(tl.float32), axis=1)
    tl.store(DL + t * heads + h, a * (1.0 - a) * dot, mask=mt)


def _check(flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor) -> None:
    if flex.dim() != 4 or flex.shape != swin.shape:
        raise ValueError(f"flex {tuple(flex.shape)} and swin {tuple(swin.shape)} must be equal (b, l, H, d)")
    if (
        logit.dim() != 3
        or tuple(logit.shape[:2]) != tuple(flex.shape[:2])
        or logit.shape[2] not in (1, flex.shape[2])
    ):
        raise ValueError(
            f"logit {tuple(logit.shape)} must be (b, l, 1 or H) for branches {tuple(flex.shape)}"
        )
    if flex.dtype != swin.dtype:
        raise ValueError(f"flex and swin must share a dtype; got {flex.dtype}, {swin.dtype}")
    if not (flex.is_cuda or INTERPRET):
        raise RuntimeError("the Triton fusion-mix kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


def _strides(flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor) -> tuple[int, ...]:
    slh = logit.stride(2) if logit.shape[2] > 1 else 0  # a per-token logit is read by every head
    return (*flex.stride(), *swin.stride(), logit.stride(0), logit.stride(1), slh)


def _meta(flex: torch.Tensor, one_output: bool) -> dict:
    d = flex.shape[3]
    return {"DIM": d, "BLOCK_D": triton.next_power_of_2(d), "BLOCK_T": BLOCK_T, "ONE_OUTPUT": one_output}


def fusion_mix_kernel(
    flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor, one_output: bool = False
) -> tuple[torch.Tensor, ...]:
    """The forward launch (no autograd: see `fusion_mix_triton`): contiguous outputs in flex's dtype."""
    _check(flex, swin, logit)
    bsz, length, heads, _ = flex.shape
    rows = bsz * length
    of = torch.empty(flex.shape, dtype=flex.dtype, device=flex.device)
    os_ = of if one_output else torch.empty(flex.shape, dtype=flex.dtype, device=flex.device)
    if rows:
        _mix_fwd[(triton.cdiv(rows, BLOCK_T), heads)](
            flex,
            swin,
            logit,
            of,
            os_,
            *_strides(flex, swin, logit),
            rows,
            length,
            heads,
            **_meta(flex, one_output),
        )
    return (of,) if one_output else (of, os_)


def fusion_mix_backward(
    grad_f: torch.Tensor,
    grad_s: torch.Tensor | None,
    flex: torch.Tensor,
    swin: torch.Tensor,
    logit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward launch: (d flex, d swin) contiguous in their dtypes, d logit in logit's shape and dtype.
    `grad_s` None: the one-output form (its gradient is `grad_f`)."""
    bsz, length, heads, _ = flex.shape
    rows = bsz * length
    one = grad_s is None
    gf = grad_f.contiguous()
    gs = gf if one else grad_s.contiguous()
    df = torch.empty(flex.shape, dtype=flex.dtype, device=flex.device)
    ds = torch.empty(swin.shape, dtype=swin.dtype, device=swin.device)
    dl = torch.empty(bsz, length, heads, dtype=torch.float32, device=flex.device)
    if rows:
        _mix_bwd[(triton.cdiv(rows, BLOCK_T), heads)](
            gf, gs, flex, swin, logit, df, ds, dl, *_strides(flex, swin, logit), rows, length, heads,
            **_meta(flex, one),
        )  # fmt: skip
    if logit.shape[2] == 1:
        dl = dl.sum(-1, keepdim=True)
    return df, ds, dl.to(logit.dtype)


class _FusionMix(torch.autograd.Function):
    """Saves flex, swin and logit (which autograd's multiplies saved too); one launch each way."""

    @staticmethod
    def forward(ctx: Any, flex, swin, logit, one_output):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(flex, swin, logit)
        ctx.one_output = one_output
        return fusion_mix_kernel(flex, swin, logit, one_output)

    @staticmethod
    def backward(ctx: Any, grad_f, grad_s=None):  # noqa: ANN001 - autograd signature
        flex, swin, logit = ctx.saved_tensors
        if grad_f is None:
            grad_f = torch.zeros(flex.shape, dtype=flex.dtype, device=flex.device)
        if not ctx.one_output and grad_s is None:
            grad_s = torch.zeros(swin.shape, dtype=swin.dtype, device=swin.device)
        df, ds, dl = fusion_mix_backward(grad_f, None if ctx.one_output else grad_s, flex, swin, logit)
        return df, ds, dl, None


def fusion_mix_triton(
    flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor, one_output: bool = False
) -> tuple[torch.Tensor, ...]:
    """`fusion_mix_kernel` with autograd through flex, swin and logit."""
    return _FusionMix.apply(flex, swin, logit, one_output)


__all__ = ["fusion_mix_backward", "fusion_mix_kernel", "fusion_mix_triton"]

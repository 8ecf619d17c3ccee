"""Flex-MA's output adds in one Triton launch, forward and backward (`naive.py` is the definition).

Why: at 65k tokens (Qwen2-VL-7B: 4 key/value heads, 28 heads of 128) y is 65k x 3584 bf16 = 470 MB. PyTorch added
the backward scan's output with a masked `addcmul` (a broadcast of the per-token mask), then the D skip with a
second, broadcasting (non-vectorized) `addcmul` over each group of heads: two passes over y, 1.5 ms of a 25 ms
layer on an H200. Here one program reads a tile of tokens of one key/value head of x once (a strided slice of the
conv output, read in place), and for each head of its group y, back (strided views read in place) and the mask,
writing y + keep back + D x, float32 math rounded once.

Backward: one launch reading the output gradient once: d back = keep g (back's dtype), dx = sum over the group of
D[h] g (float32, rounded once), and each (token tile, head)'s partial sum_{t, d} g x (float32), which one tiny sum
reduces to dD; y's gradient is g itself. Saves no new tensor. CUDA-graph capturable (no host sync). Runs under
Triton's CPU interpreter (loads converted to float32 first).

`skip_gated_norm_*`: the same adds followed by Flex-MA's gate and per-head RMSNorm in the same program
(`_skip_fwd` with `NORM`), so the sum never goes to memory outside autograd. The gated norm it replaces (mamba-ssm's, one
program per row and head: 1.8 M programs of 128 elements at 65k tokens) moved ~1.4 GB in 1.1 ms on an H200, 30% of
the copy ceiling, after the adds had written and it had read the 470 MB sum. With a backward, the sum (rounded to
y's dtype, as the unfused path stored it) is saved in place of the norm's input; the backward (`_skip_bwd` with `NORM`)
reads it, the gate and the output gradient once per head and writes d sum, d gate, dx, and per-tile partials of
dD and d weight (float32, reduced by one sum each).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET

BLOCK_T = 16  # tokens per program: 16 x 128 elements per tile


@triton.jit
def _skip_fwd(
    Y, BK, KP, X, D, Z, W, OUT, S,
    syb, syl, syh, syd, sbb, sbl, sbh, sbd, skb, skl, sxb, sxl, sxg, sxd, szb, szl, szd,
    rows, length, heads, eps,
    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_BACK: tl.constexpr, HAS_KEEP: tl.constexpr, NORM: tl.constexpr, HAS_GATE: tl.constexpr,
    STORE_S: tl.constexpr,
):  # fmt: skip
    """Program (token tile, key/value head j): x and the mask of the tile read once; for each head of the group
    the sum y + keep back + D x (float32, rounded to the output dtype), written as the output, or with `NORM`
    gated (z silu(z)) and RMS-normalised per head (weight W) first, the sum itself written only when `STORE_S`."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    od = tl.arange(0, BLOCK_D)
    md = od < DIM
    m = mt[:, None] & md[None, :]
    x = tl.load(X + (bi * sxb + li * sxl + j * sxg)[:, None] + od[None, :] * sxd, mask=m, other=0.0)
    xf = x.to(tl.float32)
    if HAS_KEEP:
        kp = tl.load(KP + bi * skb + li * skl, mask=mt, other=0).to(tl.float32)[:, None]
    for r in tl.static_range(GROUP):
        h = j * GROUP + r
        y = tl.load(Y + (bi * syb + li * syl + h * syh)[:, None] + od[None, :] * syd, mask=m, other=0.0)
        acc = y.to(tl.float32)
        if HAS_BACK:
            bk = tl.load(BK + (bi * sbb + li * sbl + h * sbh)[:, None] + od[None, :] * sbd, mask=m, other=0.0)
            if HAS_KEEP:
                acc += kp * bk.to(tl.float32)
            else:
                acc += bk.to(tl.float32)
        acc += tl.load(D + h).to(tl.float32) * xf
        sr = acc.to(OUT.dtype.element_ty)
        row = (t * heads + h)[:, None] * DIM + od[None, :]
        if NORM:
            if STORE_S:
                tl.store(S + row, sr, mask=m)
            a = sr.to(tl.float32)
            if HAS_GATE:
                z = tl.load(
                    Z + (bi * szb + li * szl)[:, None] + (h * DIM + od)[None, :] * szd, mask=m, other=0.0
                )
                zf = z.to(tl.float32)
                a = a * zf * tl.sigmoid(zf)
            rstd = 1.0 / tl.sqrt(tl.sum(a * a, axis=1) / DIM + eps)
            w = tl.load(W + h * DIM + od, mask=md, other=0.0).to(tl.float32)
            tl.store(OUT + row, (a * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=m)
        else:
            tl.store(OUT + row, sr, mask=m)


@triton.jit
def _skip_bwd(
    G, S, Z, W, KP, X, D, DY, DBK, DZ, DX, DDP, DWP,
    skb, skl, sxb, sxl, sxg, sxd, szb, szl, szd,
    rows, length, heads, groups, eps,
    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_KEEP: tl.constexpr, STORE_DBK: tl.constexpr, NORM: tl.constexpr, HAS_GATE: tl.constexpr,
):  # fmt: skip
    """Program (token tile, key/value head j): the group's output gradients read once. Per head the gradient of the
    sum (the output gradient itself, or with `NORM` through the norm and the gate from the saved sum: then written
    as dy, with d gate and the partial d weight, float32, one row per token tile); d back = keep d sum when
    `STORE_DBK`; over the group dx (float32, rounded once) and each head's partial dD."""
    tile = tl.program_id(0)
    t = tile.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    od = tl.arange(0, BLOCK_D)
    md = od < DIM
    m = mt[:, None] & md[None, :]
    xf = tl.load(X + (bi * sxb + li * sxl + j * sxg)[:, None] + od[None, :] * sxd, mask=m, other=0.0)
    xf = xf.to(tl.float32)
    if HAS_KEEP:
        kp = tl.load(KP + bi * skb + li * skl, mask=mt, other=0).to(tl.float32)[:, None]
    dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(GROUP):
        h = j * GROUP + r
        row = (t * heads + h)[:, None] * DIM + od[None, :]
        ds = tl.load(G + row, mask=m, other=0.0).to(tl.float32)
        if NORM:
            g = ds
            sf = tl.load(S + row, mask=m, other=0.0).to(tl.float32)
            a = sf
            if HAS_GATE:
                zf = tl.load(
                    Z + (bi * szb + li * szl)[:, None] + (h * DIM + od)[None, :] * szd, mask=m, other=0.0
                )
                zf = zf.to(tl.float32)
                sg = tl.sigmoid(zf)
                a = sf * zf * sg
            rstd = (1.0 / tl.sqrt(tl.sum(a * a, axis=1) / DIM + eps))[:, None]
            n = a * rstd
            w = tl.load(W + h * DIM + od, mask=md, other=0.0).to(tl.float32)
            dn = g * w[None, :]
            ds = rstd * (dn - n * (tl.sum(dn * n, axis=1) / DIM)[:, None])
            tl.store(DWP + tile * heads * DIM + h * DIM + od, tl.sum(g * n, axis=0), mask=md)
            if HAS_GATE:
                tl.store(DZ + row, (ds * sf * sg * (1.0 + zf * (1.0 - sg))).to(DZ.dtype.element_ty), mask=m)
                ds = ds * zf * sg
            tl.store(DY + row, ds.to(DY.dtype.element_ty), mask=m)
        if STORE_DBK:
            if HAS_KEEP:
                tl.store(DBK + row, (kp * ds).to(DBK.dtype.element_ty), mask=m)
            else:
                tl.store(DBK + row, ds.to(DBK.dtype.element_ty), mask=m)
        dx += tl.load(D + h).to(tl.float32) * ds
        tl.store(DDP + tile * heads + h, tl.sum(tl.sum(ds * xf, axis=1), axis=0))
    tl.store(DX + (t * groups + j)[:, None] * DIM + od[None, :], dx.to(DX.dtype.element_ty), mask=m)


def _check(y: torch.Tensor, back: torch.Tensor | None, keep: torch.Tensor | None, x: torch.Tensor,
           D: torch.Tensor) -> None:  # fmt: skip
    if y.dim() != 4 or x.dim() != 4 or y.shape[:2] != x.shape[:2] or y.shape[3] != x.shape[3]:
        raise ValueError(
            f"y {tuple(y.shape)} and x {tuple(x.shape)} must be (b, l, H, d) and (b, l, H_kv, d)"
        )
    if y.shape[2] % x.shape[2]:
        raise ValueError(f"{y.shape[2]} heads are not a multiple of {x.shape[2]} key/value heads")
    if back is not None and back.shape != y.shape:
        raise ValueError(f"back {tuple(back.shape)} must be y's shape {tuple(y.shape)}")
    if keep is not None and (back is None or keep.numel() != y.shape[0] * y.shape[1]):
        raise ValueError(f"keep {tuple(keep.shape)} must be one mask value per token, with a `back`")
    if D.numel() != y.shape[2]:
        raise ValueError(f"D {tuple(D.shape)} must hold one value per head ({y.shape[2]})")
    if not (y.is_cuda or INTERPRET):
        raise RuntimeError("the Triton skip-add kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


def _mask(keep: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The per-token mask as (b, l) (a bool mask read as bytes, in place) and its strides; y and (0, 0) without."""
    if keep is None:
        return y, (0, 0)
    k = keep.reshape(y.shape[0], y.shape[1])
    if k.dtype == torch.bool:
        k = k.view(torch.uint8)
    return k, (k.stride(0), k.stride(1))


def _meta(y: torch.Tensor, x: torch.Tensor, has_back: bool, has_keep: bool) -> dict:
    d = y.shape[3]
    return {"GROUP": y.shape[2] // x.shape[2], "DIM": d, "BLOCK_D": triton.next_power_of_2(d),
            "BLOCK_T": BLOCK_T, "HAS_BACK": has_back, "HAS_KEEP": has_keep}  # fmt: skip


def skip_add_kernel(
    y: torch.Tensor, back: torch.Tensor | None, keep: torch.Tensor | None, x: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """The forward launch (no autograd: see `skip_add_triton`): a contiguous (b, l, H, d) output in y's dtype."""
    _check(y, back, keep, x, D)
    bsz, length, heads, _ = y.shape
    rows = bsz * length
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if rows == 0:
        return out
    kp, ks = _mask(keep, y)
    bk = back if back is not None else y
    _skip_fwd[(triton.cdiv(rows, BLOCK_T), x.shape[2])](
        y, bk, kp, x, D, y, y, out, out, *y.stride(), *bk.stride(), *ks, *x.stride(), 0, 0, 0, rows, length, heads,
        0.0, **_meta(y, x, back is not None, keep is not None), NORM=False, HAS_GATE=False, STORE_S=False,
    )  # fmt: skip
    return out


def skip_add_backward(
    grad: torch.Tensor, back_dtype: torch.dtype | None, keep: torch.Tensor | None, x: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward launch: (d back (contiguous, `back_dtype`; None without a back), dx (contiguous, x's shape and
    dtype), dD (D's shape and dtype, reduced in float32))."""
    bsz, length, heads, _ = grad.shape
    groups = x.shape[2]
    rows = bsz * length
    tiles = triton.cdiv(rows, BLOCK_T)
    g = grad.contiguous()
    dbk = torch.empty(g.shape, dtype=back_dtype, device=g.device) if back_dtype is not None else None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddp = torch.zeros(max(tiles, 1), heads, dtype=torch.float32, device=x.device)
    if rows:
        kp, ks = _mask(keep, g)
        meta = _meta(g, x, dbk is not None, keep is not None)
        del meta["HAS_BACK"]
        _skip_bwd[(tiles, groups)](
            g, g, g, D, kp, x, D, g, dbk if dbk is not None else g, g, dx, ddp, ddp, *ks, *x.stride(), 0, 0, 0, rows,
            length, heads, groups, 0.0, **meta, STORE_DBK=dbk is not None, NORM=False, HAS_GATE=False,
        )  # fmt: skip
    return dbk, dx, ddp.sum(0).to(D.dtype).view(D.shape)


class _SkipAdd(torch.autograd.Function):
    """Saves keep, x and D (which autograd's `addcmul`s saved too); one launch each way."""

    @staticmethod
    def forward(ctx: Any, y, back, keep, x, D):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(keep, x, D)
        ctx.back_dtype = back.dtype if back is not None else None
        return skip_add_kernel(y, back, keep, x, D)

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001 - autograd signature
        keep, x, D = ctx.saved_tensors
        dbk, dx, dd = skip_add_backward(grad, ctx.back_dtype, keep, x, D)
        return grad, dbk, None, dx, dd


def skip_add_triton(
    y: torch.Tensor, back: torch.Tensor | None, keep: torch.Tensor | None, x: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """`skip_add_kernel` with autograd through y, back, x and D (keep is a mask)."""
    return _SkipAdd.apply(y, back, keep, x, D)


def _check_norm(y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor) -> None:
    hd = y.shape[2] * y.shape[3]
    if gate is not None and (gate.shape[:2] != y.shape[:2] or gate.dim() != 3 or gate.shape[2] != hd):
        raise ValueError(f"gate {tuple(gate.shape)} must be (b, l, H d) = {(*y.shape[:2], hd)}")
    if weight.numel() != hd:
        raise ValueError(f"weight {tuple(weight.shape)} must hold H d = {hd} values")


def _gate_strides(gate: torch.Tensor | None) -> tuple[int, int, int]:
    return (gate.stride(0), gate.stride(1), gate.stride(2)) if gate is not None else (0, 0, 0)


def skip_gated_norm_kernel(
    y: torch.Tensor, back: torch.Tensor | None, keep: torch.Tensor | None, x: torch.Tensor, D: torch.Tensor,
    gate: torch.Tensor | None, weight: torch.Tensor, eps: float, store_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The forward launch (no autograd: see `skip_gated_norm_triton`): (the contiguous (b, l, H, d) output in y's
    dtype, the pre-norm sum the backward reads when `store_sum`, else None)."""
    _check(y, back, keep, x, D)
    _check_norm(y, gate, weight)
    bsz, length, heads, _ = y.shape
    rows = bsz * length
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    summed = torch.empty(y.shape, dtype=y.dtype, device=y.device) if store_sum else None
    if rows == 0:
        return out, summed
    kp, ks = _mask(keep, y)
    bk = back if back is not None else y
    z = gate if gate is not None else y
    _skip_fwd[(triton.cdiv(rows, BLOCK_T), x.shape[2])](
        y, bk, kp, x, D, z, weight, out, summed if summed is not None else out, *y.stride(), *bk.stride(), *ks,
        *x.stride(), *_gate_strides(gate), rows, length, heads, eps,
        **_meta(y, x, back is not None, keep is not None), NORM=True, HAS_GATE=gate is not None, STORE_S=store_sum,
    )  # fmt: skip
    return out, summed


def skip_gated_norm_backward(
    grad: torch.Tensor, summed: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor,
    keep: torch.Tensor | None, x: torch.Tensor, D: torch.Tensor, eps: float, back_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward launch: (dy, d back (dy itself without a mask; None without a back), d gate (contiguous, gate's
    dtype; None without a gate), dx (contiguous, x's shape and dtype), dD, d weight (reduced in float32))."""
    bsz, length, heads, d = grad.shape
    groups = x.shape[2]
    rows = bsz * length
    tiles = triton.cdiv(rows, BLOCK_T)
    g = grad.contiguous()
    dy = torch.empty(g.shape, dtype=summed.dtype, device=g.device)
    separate = back_dtype is not None and keep is not None
    dbk = torch.empty(g.shape, dtype=back_dtype, device=g.device) if separate else None
    dz = torch.empty(gate.shape, dtype=gate.dtype, device=g.device) if gate is not None else None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddp = torch.zeros(max(tiles, 1), heads, dtype=torch.float32, device=x.device)
    dwp = torch.zeros(max(tiles, 1), heads * d, dtype=torch.float32, device=x.device)
    if rows:
        kp, ks = _mask(keep, g)
        meta = _meta(g, x, back_dtype is not None, keep is not None)
        del meta["HAS_BACK"]
        _skip_bwd[(tiles, groups)](
            g, summed, gate if gate is not None else g, weight, kp, x, D, dy, dbk if dbk is not None else dy,
            dz if dz is not None else dy, dx, ddp, dwp, *ks, *x.stride(), *_gate_strides(gate), rows, length, heads,
            groups, eps, **meta, STORE_DBK=separate, NORM=True, HAS_GATE=gate is not None,
        )  # fmt: skip
    if back_dtype is not None and dbk is None:
        dbk = dy if back_dtype == dy.dtype else dy.to(back_dtype)
    dw = dwp.sum(0).to(weight.dtype).view(weight.shape)
    return dy, dbk, dz, dx, ddp.sum(0).to(D.dtype).view(D.shape), dw


class _SkipGatedNorm(torch.autograd.Function):
    """Saves the pre-norm sum (what the unfused gated norm saved as its input), the gate, weight, keep, x and D."""

    @staticmethod
    def forward(ctx: Any, y, back, keep, x, D, gate, weight, eps):  # noqa: ANN001 - autograd signature
        out, summed = skip_gated_norm_kernel(y, back, keep, x, D, gate, weight, eps, store_sum=True)
        ctx.save_for_backward(summed, gate, weight, keep, x, D)
        ctx.eps, ctx.back_dtype = eps, back.dtype if back is not None else None
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001 - autograd signature
        summed, gate, weight, keep, x, D = ctx.saved_tensors
        dy, dbk, dz, dx, dd, dw = skip_gated_norm_backward(
            grad, summed, gate, weight, keep, x, D, ctx.eps, ctx.back_dtype
        )
        return dy, dbk, None, dx, dd, dz, dw, None


def skip_gated_norm_triton(
    y: torch.Tensor, back: torch.Tensor | None, keep: torch.Tensor | None, x: torch.Tensor, D: torch.Tensor,
    gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> torch.Tensor:  # fmt: skip
    """`skip_gated_norm_kernel` with autograd through y, back, x, D, gate and weight; outside autograd the sum is
    never written."""
    tensors = (y, back, x, D, gate, weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SkipGatedNorm.apply(y, back, keep, x, D, gate, weight, eps)
    return skip_gated_norm_kernel(y, back, keep, x, D, gate, weight, eps)[0]


__all__ = [
    "skip_add_backward",
    "skip_add_kernel",
    "skip_add_triton",
    "skip_gated_norm_backward",
    "skip_gated_norm_kernel",
    "skip_gated_norm_triton",
]

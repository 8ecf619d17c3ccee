"""The grouped scan's per-head inputs in one Triton launch, forward and backward (`naive.py` is the definition).

Why: at 65k tokens (Qwen2-VL-7B: 4 key/value heads, 28 heads of 128) each per-head input is 65k x 3584 bf16 =
470 MB. PyTorch made fla's k = B * dt with a broadcasting (non-vectorized) multiply plus a cast of dt, v with an
expand + copy and g = dt * A with one more multiply, per scan direction; mamba's x * scale and B repeat the same
way. Here one program reads a tile of tokens of one key/value head once (strided slices of the scan-order gather
are read in place) and writes its whole group of heads, float32 math rounded once.

Backward: one launch reading the heads' gradients once: dx = scale * sum over the group of dv, dB = sum of
dk * dt (or dk), d dt = sum_n dk B per head (float32); g's share (dg A, and dA = sum dg dt) is two tiny ops.
CUDA-graph capturable (no host sync). Runs under Triton's CPU interpreter (loads converted to float32 first).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from linmu_cli.ops.decode_attention.triton import INTERPRET

BLOCK_T = 16  # tokens per program: 16 x 128 elements per tile


@triton.jit
def _scan_inputs_fwd(
    X, Bk, DT, A, V, K, G,
    sxb, sxl, sxg, sxd, sbb, sbl, sbg, sbd, sdb, sdl, sdh,
    rows, length, heads, x_scale,
    GROUP: tl.constexpr, DIM_X: tl.constexpr, DIM_B: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, DT_ON_B: tl.constexpr, HAS_G: tl.constexpr,
):  # fmt: skip
    """Program (token tile, key/value head j): x and B of the tile read once, heads j*GROUP .. written."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    ox = tl.arange(0, BLOCK_X)
    ob = tl.arange(0, BLOCK_B)
    mx = mt[:, None] & (ox < DIM_X)[None, :]
    mb = mt[:, None] & (ob < DIM_B)[None, :]
    x = tl.load(X + (bi * sxb + li * sxl + j * sxg)[:, None] + ox[None, :] * sxd, mask=mx, other=0.0)
    b = tl.load(Bk + (bi * sbb + li * sbl + j * sbg)[:, None] + ob[None, :] * sbd, mask=mb, other=0.0)
    xv = (x.to(tl.float32) * x_scale).to(V.dtype.element_ty)
    bf = b.to(tl.float32)
    for r in tl.static_range(GROUP):
        h = j * GROUP + r
        row = t * heads + h
        tl.store(V + row[:, None] * DIM_X + ox[None, :], xv, mask=mx)
        if DT_ON_B:
            dt = tl.load(DT + bi * sdb + li * sdl + h * sdh, mask=mt, other=0.0).to(tl.float32)
            tl.store(
                K + row[:, None] * DIM_B + ob[None, :], (bf * dt[:, None]).to(K.dtype.element_ty), mask=mb
            )
            if HAS_G:
                a = tl.load(A + h).to(tl.float32)
                tl.store(G + row, dt * a, mask=mt)
        else:
            tl.store(K + row[:, None] * DIM_B + ob[None, :], b.to(K.dtype.element_ty), mask=mb)


@triton.jit
def _scan_inputs_bwd(
    DV, DK, Bk, DT, DX, DB, DDT,
    sbb, sbl, sbg, sbd, sdb, sdl, sdh,
    rows, length, heads, groups, x_scale,
    GROUP: tl.constexpr, DIM_X: tl.constexpr, DIM_B: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, DT_ON_B: tl.constexpr,
):  # fmt: skip
    """Program (token tile, key/value head j): the group's dv, dk read once; dx, dB (contiguous, key/value width)
    and d dt of each head (float32) written."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    mt = t < rows
    bi = t // length
    li = t % length
    ox = tl.arange(0, BLOCK_X)
    ob = tl.arange(0, BLOCK_B)
    mx = mt[:, None] & (ox < DIM_X)[None, :]
    mb = mt[:, None] & (ob < DIM_B)[None, :]
    if DT_ON_B:
        bf = tl.load(Bk + (bi * sbb + li * sbl + j * sbg)[:, None] + ob[None, :] * sbd, mask=mb, other=0.0)
        bf = bf.to(tl.float32)
    dx = tl.zeros([BLOCK_T, BLOCK_X], dtype=tl.float32)
    db = tl.zeros([BLOCK_T, BLOCK_B], dtype=tl.float32)
    for r in tl.static_range(GROUP):
        h = j * GROUP + r
        row = t * heads + h
        dx += tl.load(DV + row[:, None] * DIM_X + ox[None, :], mask=mx, other=0.0).to(tl.float32)
        dk = tl.load(DK + row[:, None] * DIM_B + ob[None, :], mask=mb, other=0.0).to(tl.float32)
        if DT_ON_B:
            dt = tl.load(DT + bi * sdb + li * sdl + h * sdh, mask=mt, other=0.0).to(tl.float32)
            db += dk * dt[:, None]
            tl.store(DDT + row, tl.sum(dk * bf, axis=1), mask=mt)
        else:
            db += dk
    out = t * groups + j
    tl.store(DX + out[:, None] * DIM_X + ox[None, :], (dx * x_scale).to(DX.dtype.element_ty), mask=mx)
    tl.store(DB + out[:, None] * DIM_B + ob[None, :], db.to(DB.dtype.element_ty), mask=mb)


def _check(x: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | None, heads: int, dt_on_b: bool) -> None:
    if x.dim() != 4 or B.dim() != 4 or x.shape[:3] != B.shape[:3]:
        raise ValueError(f"x {tuple(x.shape)} and B {tuple(B.shape)} must be (b, l, g, d) with equal b, l, g")
    if heads % x.shape[2]:
        raise ValueError(f"{heads} heads are not a multiple of {x.shape[2]} key/value heads")
    if dt_on_b and (dt is None or tuple(dt.shape) != (*x.shape[:2], heads)):
        raise ValueError(
            f"dt must be (b, l, heads) = {(*x.shape[:2], heads)}, got {None if dt is None else tuple(dt.shape)}"
        )
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("the Triton scan-input kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


def _dims(x: torch.Tensor, B: torch.Tensor) -> dict:
    return {"DIM_X": x.shape[3], "DIM_B": B.shape[3], "BLOCK_X": triton.next_power_of_2(x.shape[3]),
            "BLOCK_B": triton.next_power_of_2(B.shape[3]), "BLOCK_T": BLOCK_T}  # fmt: skip


def scan_inputs_kernel(
    x: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | None, A: torch.Tensor | None, heads: int,
    x_scale: float = 1.0, dt_on_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The forward launch (no autograd: see `scan_inputs_triton`): contiguous v, k in x's dtype, g float32."""
    _check(x, B, dt, heads, dt_on_b)
    bsz, length, groups, _ = x.shape
    rows = bsz * length
    v = torch.empty(bsz, length, heads, x.shape[3], dtype=x.dtype, device=x.device)
    k = torch.empty(bsz, length, heads, B.shape[3], dtype=x.dtype, device=x.device)
    has_g = dt_on_b and A is not None
    g = torch.empty(bsz, length, heads, dtype=torch.float32, device=x.device) if has_g else None
    if rows == 0:
        return v, k, g
    dt_arg = dt if dt_on_b else x
    dts = dt.stride() if dt_on_b else (0, 0, 0)
    _scan_inputs_fwd[(triton.cdiv(rows, BLOCK_T), groups)](
        x, B, dt_arg, A if has_g else x, v, k, g if has_g else v,
        *x.stride(), *B.stride(), *dts, rows, length, heads, float(x_scale),
        GROUP=heads // groups, DT_ON_B=dt_on_b, HAS_G=has_g, **_dims(x, B),
    )  # fmt: skip
    return v, k, g


def scan_inputs_backward(
    dv: torch.Tensor, dk: torch.Tensor, x_shape: torch.Size, x_dtype: torch.dtype, B: torch.Tensor,
    dt: torch.Tensor | None, heads: int, x_scale: float = 1.0, dt_on_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The backward launch: (dx (x_shape, x_dtype), dB) contiguous at key/value width, d dt (b, l, heads) float32
    from k's share (None without `dt_on_b`)."""
    bsz, length, groups, _ = x_shape
    rows = bsz * length
    dv, dk = dv.contiguous(), dk.contiguous()
    dx = torch.empty(x_shape, dtype=x_dtype, device=B.device)
    db = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    ddt = torch.empty(bsz, length, heads, dtype=torch.float32, device=B.device) if dt_on_b else None
    if rows == 0:
        return dx, db, ddt
    _scan_inputs_bwd[(triton.cdiv(rows, BLOCK_T), groups)](
        dv, dk, B, dt if dt_on_b else dx, dx, db, ddt if dt_on_b else dx,
        *B.stride(), *(dt.stride() if dt_on_b else (0, 0, 0)), rows, length, heads, groups, float(x_scale),
        GROUP=heads // groups, DT_ON_B=dt_on_b, **_dims(dx, B),
    )  # fmt: skip
    return dx, db, ddt


class _ScanInputs(torch.autograd.Function):
    """Saves B, dt and A (no per-head tensor): the backward is one launch plus g's two tiny ops."""

    @staticmethod
    def forward(ctx: Any, x, B, dt, A, heads, x_scale, dt_on_b):  # noqa: ANN001 - autograd signature
        v, k, g = scan_inputs_kernel(x, B, dt, A, heads, x_scale, dt_on_b)
        ctx.save_for_backward(B, dt, A)
        ctx.meta = (x.shape, x.dtype, heads, x_scale, dt_on_b, g is not None)
        if g is None:
            return v, k
        return v, k, g

    @staticmethod
    def backward(ctx: Any, dv, dk, dg=None):  # noqa: ANN001 - autograd signature
        B, dt, A = ctx.saved_tensors
        shape, dtype, heads, x_scale, dt_on_b, has_g = ctx.meta
        if dv is None:
            dv = torch.zeros((*shape[:2], heads, shape[3]), dtype=dtype, device=B.device)
        if dk is None:
            dk = torch.zeros((*shape[:2], heads, B.shape[3]), dtype=dtype, device=B.device)
        dx, db, ddt = scan_inputs_backward(dv, dk, shape, dtype, B, dt, heads, x_scale, dt_on_b)
        da = None
        if has_g and dg is not None:
            ddt = ddt + dg.float() * A.float()
            da = (dg.float() * dt.float()).sum((0, 1)).to(A.dtype)
        if ddt is not None:
            ddt = ddt.to(dt.dtype)
        return dx, db, ddt, da, None, None, None


def scan_inputs_triton(
    x: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | None, A: torch.Tensor | None, heads: int,
    x_scale: float = 1.0, dt_on_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`scan_inputs_kernel` with autograd through x, B, dt and A."""
    A = A if dt_on_b and A is not None else None
    out = _ScanInputs.apply(x, B, dt if dt_on_b else None, A, heads, float(x_scale), dt_on_b)
    return (out[0], out[1], out[2] if A is not None else None)


__all__ = ["scan_inputs_backward", "scan_inputs_kernel", "scan_inputs_triton"]

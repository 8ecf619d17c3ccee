"""Split-KV (flash-decoding) q_len=1 attention in Triton: each kv head's keys / values are read once for all
the query heads of its GQA group, in one launch over (splits, batch x kv heads), then merged by a second tiny
kernel from the partial (max, sum, accumulator) of every split (no atomics).

Why: at batch 1 the served teacher's decode step is a read of the whole KV cache; one CTA per (row, kv head)
leaves most SMs idle and a repeat of K/V per query head reads it G times. Here the sequence is cut into
`num_splits` chunks chosen from batch x kv heads against the SM count, so the GPU is full at batch 1.

CUDA-graph capturable: the valid length is read on the device (`lengths`), the grid and the partial buffers
depend only on the static shapes (the cache capacity), and nothing syncs with the host.

Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when this module is imported) keeps bfloat16 as raw uint16
and multiplies the bit patterns in `tl.dot`, so under it the tiles are upcast to float32 right after the load
(`UPCAST`); the GPU path feeds bf16 / fp16 tiles to the tensor cores with float32 accumulation.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    """Whether `triton.jit` makes interpreted kernels here (triton.knobs from Triton 3.4, else the variable)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET: bool = _interpreting()
LOG2E = 1.4426950408889634
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3


@triton.jit
def _split_kv_kernel(
    Q, K, V, LEN, VALID, OUT, PO, PM, PL,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lb, stride_mb, stride_mn,
    stride_ob, stride_oh, stride_og, stride_od,
    len_offset, kv_heads, group, head_dim, capacity, chunk, num_splits, scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_VALID: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One (split, batch row x kv head): online softmax over its chunk's valid slots for the G query heads.

    HAS_VALID false (the teacher's prefix): the valid slots are [0, LEN[b] + len_offset); VALID, its strides
    and capacity are unused. HAS_VALID true (the ring): the slots of [0, capacity) whose VALID byte is not 0,
    anywhere in the cache (a ring's valid slots are no prefix after it wraps); LEN, stride_lb, len_offset are
    unused. Only there may a tile be all invalid, so only there is the running max made finite before use.
    SPLIT: write partial results for `_merge_kernel` (PO / PM / PL); else (one split) the normalized output
    to OUT directly."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    h = (row % kv_heads).to(tl.int64)
    if HAS_VALID:  # noqa: SIM108 - a compile-time branch: no length load on the masked path
        n_valid = capacity  # every slot is a candidate, VALID says which
    else:
        n_valid = tl.load(LEN + b * stride_lb).to(tl.int32) + len_offset
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_valid)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < head_dim
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        mask_n = n < hi
        if HAS_VALID:  # invalid slots are never read: NaN there cannot leak
            mask_n = mask_n & (tl.load(VALID + b * stride_mb + n * stride_mn, mask=mask_n, other=0) != 0)
        if EVEN_D:  # noqa: SIM108 - a compile-time branch: no d mask on the loads
            kv_mask = mask_n[:, None]
        else:
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (G, N), log2 domain
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a masked tile may have no valid slot yet: exp2(-inf - 0) = 0, no NaN (a prefix tile's first one is)
        if HAS_VALID:  # noqa: SIM108 - a compile-time branch: no extra select on the prefix path
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        part = (row * num_splits + split).to(tl.int64) * group + offs_g  # (row, split, g) of the partials
        tl.store(PM + part, m_i, mask=mask_g)
        tl.store(PL + part, l_i, mask=mask_g)
        tl.store(PO + part[:, None] * head_dim + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no valid slot at all: 0, as the merge gives
        tl.store(
            OUT + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :] * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=mask_g[:, None] & mask_d[None, :],
        )


@triton.jit
def _merge_kernel(
    PO, PM, PL, OUT,
    stride_ob, stride_oh, stride_og, stride_od,
    kv_heads, group, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (batch row x kv head, query head of the group): combine the splits' partial softmax results."""
    pid = tl.program_id(0)
    row = pid // group
    g = pid % group
    b = (row // kv_heads).to(tl.int64)
    h = (row % kv_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < head_dim
    part = (row * num_splits + offs_s).to(tl.int64) * group + g
    m = tl.load(PM + part, mask=mask_s, other=float("-inf"))
    l_s = tl.load(PL + part, mask=mask_s, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no valid slot at all: output 0, not NaN
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    acc = tl.load(
        PO + part[:, None] * head_dim + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
    )
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        OUT + b * stride_ob + h * stride_oh + g * stride_og + offs_d * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=mask_d,
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so small tests cover the merge


@functools.cache  # called on every eager call (warm-ups, trials): a pure function of sizes
def choose_num_splits(rows: int, capacity: int, sms: int, block_n: int = DEFAULT_BLOCK_N,
                      ctas_per_sm: int = 2, cta_overhead_tiles: float = 2.0, max_splits: int = 256) -> int:  # fmt: skip
    """Splits minimizing (waves of CTAs) x (tiles per CTA + a fixed cost per CTA), the smallest among equals.

    Every CTA streams the same number of slots, so a partial last wave costs a full one; the fixed cost (the
    query load, the pipeline's fill and drain, the partial results' store: ~2 tiles, a guess) keeps the split
    from going finer than the waves need. 2 CTAs per SM is a guess at occupancy (registers / shared memory of
    a 16 x d query block with pipelined block_n x d K / V tiles); both are to be checked against the sweep of
    benchmarks/decode_attention_kernels.py. `rows` is batch x kv heads; no split is left empty (chunks are
    whole tiles)."""
    slots = max(1, sms * ctas_per_sm)
    tiles = math.ceil(capacity / block_n)
    best, best_cost = 1, math.inf
    for s in range(1, min(max_splits, tiles) + 1):
        per = math.ceil(tiles / s)
        if math.ceil(tiles / per) != s:  # the same chunk as a smaller s: not a distinct choice
            continue
        cost = math.ceil(rows * s / slots) * (per + cta_overhead_tiles)
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The shapes and dtypes both entry points need: q (B, Hkv, G, d), k / v (B, Hkv, capacity, d)."""
    bsz, hkv, _, d = q.shape
    cap = k.shape[2]
    if k.shape != (bsz, hkv, cap, d) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} needs k / v of shape (B, Hkv, capacity, d); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    len_offset: int,
    valid: torch.Tensor | None,
    scale: float | None,
    num_splits: int | None,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """`_split_kv_kernel` (+ `_merge_kernel`) over a prefix (`lengths`, `valid` None) or a mask (`valid`,
    `lengths` None), inputs checked. The prefix path always writes partial results and merges them, even at
    one split; the masked one writes its output directly at one split."""
    if not (q.is_cuda or INTERPRET):
        raise RuntimeError("the Triton decode kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    bsz, hkv, group, d = q.shape
    cap = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    rows = bsz * hkv
    if num_splits is None:
        num_splits = choose_num_splits(rows, cap, _sm_count(q.device), block_n)
    chunk = math.ceil(math.ceil(cap / num_splits) / block_n) * block_n
    splits = math.ceil(cap / chunk)  # no empty split at the end
    has_valid = valid is not None
    split = splits > 1 or not has_valid
    dev = q.device
    out = torch.empty(bsz, hkv, group, d, device=dev, dtype=q.dtype)
    if split:
        po = torch.empty(rows, splits, group, d, device=dev, dtype=torch.float32)
        pm = torch.empty(rows, splits, group, device=dev, dtype=torch.float32)
        pl = torch.empty(rows, splits, group, device=dev, dtype=torch.float32)
    else:  # unused by the one-split kernel
        po = pm = pl = out
    if has_valid:
        flags = valid.view(torch.uint8)  # the same bytes, a type every Triton version loads
        stride_mb, stride_mn = flags.stride()
        lens, stride_lb, len_offset = flags, 0, 0  # LEN unused
    else:
        lens = lengths.reshape(-1)
        stride_lb = lens.stride(0) if lens.numel() > 1 else 0
        flags, stride_mb, stride_mn = lens, 0, 0  # VALID unused
    block_d = max(16, triton.next_power_of_2(d))
    _split_kv_kernel[(splits, rows)](
        q, k, v, lens, flags, out, po, pm, pl,
        *q.stride(), *k.stride(), *v.stride(),
        stride_lb, stride_mb, stride_mn, *out.stride(),
        len_offset, hkv, group, d, cap, chunk, splits, scale * LOG2E,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == d,
        UPCAST=INTERPRET, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_VALID=has_valid,
        SPLIT=split, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _merge(po, pm, pl, out, block_d)
    return out


def split_kv_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    len_offset: int = 0,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> torch.Tensor:
    """Grouped q_len=1 attention: q (B, Hkv, G, d), k / v (B, Hkv, capacity, d) -> (B, Hkv, G, d) in q's dtype.

    Row b attends slots [0, lengths[b] + len_offset) (`lengths` (B,) or (1,) integer, on q's device;
    `len_offset=1` takes teacher_decode's "slot of the current token" directly, without a kernel per layer to
    add 1). `num_splits` defaults to `choose_num_splits` for this GPU; the block sizes are compile-time."""
    _check_qkv(q, k, v)
    bsz = q.shape[0]
    if lengths.device != q.device or lengths.dtype.is_floating_point or lengths.numel() not in (1, bsz):
        raise ValueError("lengths must be a (B,) or (1,) integer tensor on q's device")
    return _launch(q, k, v, lengths, len_offset, None, scale, num_splits, block_n, num_warps, num_stages)


def _merge(po: torch.Tensor, pm: torch.Tensor, pl: torch.Tensor, out: torch.Tensor, block_d: int) -> None:
    """`_merge_kernel` over partial buffers (rows, splits, G[, d]) into out (B, Hkv, G, d)."""
    rows, splits, group, d = po.shape
    block_s = max(2, triton.next_power_of_2(splits))
    _merge_kernel[(rows * group,)](
        po, pm, pl, out, *out.stride(), out.shape[1], group, d, splits, BLOCK_S=block_s, BLOCK_D=block_d,
        num_warps=1 if block_s <= 16 else 4 if block_s <= 64 else 8,  # the (splits x d) float32 tile in registers
    )  # fmt: skip


def masked_split_kv_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> torch.Tensor:
    """`split_kv_decode` over the slots where `valid` (B, capacity) bool is True, wherever they are (Local-Swin's
    ring, docs/design.md §4): q (B, Hkv, G, d), k / v (B, Hkv, capacity, d) -> (B, Hkv, G, d) in q's dtype.

    Invalid slots are never read (NaN there cannot leak); a row with no valid slot gives zeros. One split is
    one kernel (`_split_kv_kernel` with HAS_VALID); more write partial results merged by `_merge_kernel`
    (two). `num_splits` defaults to `choose_num_splits`, as the teacher's kernel. CUDA-graph capturable: the
    mask is read on the device."""
    _check_qkv(q, k, v)
    bsz, cap = q.shape[0], k.shape[2]
    if valid.dtype != torch.bool or valid.shape != (bsz, cap) or valid.device != q.device:
        raise ValueError(f"valid must be a ({bsz}, {cap}) bool tensor on q's device; got {valid.dtype} "
                         f"{tuple(valid.shape)} on {valid.device}")  # fmt: skip
    return _launch(q, k, v, None, 0, valid, scale, num_splits, block_n, num_warps, num_stages)


__all__ = ["INTERPRET", "choose_num_splits", "masked_split_kv_decode", "split_kv_decode"]

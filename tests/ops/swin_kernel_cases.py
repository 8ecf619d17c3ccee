"""Inputs of tests/ops/test_swin_kernels.py, and (run as a script) the driver that executes Local-Swin's Triton
kernels (the fused rotary, forward and backward, and the masked split-KV decode over the ring) under Triton's
CPU interpreter. Why a subprocess: see decode_attention_cases.py (TRITON_INTERPRET must be set before triton is
imported).

    TRITON_INTERPRET=1 python tests/ops/swin_kernel_cases.py OUT.pt

writes {"rotary": {case id: (q, k, dq, dk)}, "ring": {case id: output}} or {"unavailable": reason}.
"""

from __future__ import annotations

import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (batch, length, q heads, kv heads, head_dim, cos / sin batch (1: broadcast), sin halves equal)
ROTARY_CASES = [
    (2, 5, 7, 1, 24, 2, True),  # GQA 7, half 12 (masked), strided slices of one projection output
    (3, 1, 4, 2, 16, 1, True),  # one decode token, cos / sin shared by the batch (stride 0)
    (1, 3, 40, 8, 8, 1, False),  # more heads than one tile (two); cos / sin any values: the exact transpose
]
# (batch, kv heads, group, ring slots, head_dim, splits or None = the SM heuristic)
RING_CASES = [
    (2, 2, 7, 40, 24, 1),  # GQA 7, head_dim off the power of 2: one split, one kernel
    (2, 2, 7, 40, 24, 3),  # the same through partial results and the merge
    (1, 1, 1, 50, 16, None),  # MHA, the heuristic's splits (4 on the interpreter)
    (3, 4, 7, 64, 32, 2),  # three rows: a wrapped ring, a sparse one, one with no valid slot
]
BLOCK_N = 16


def rotary_id(case: tuple, dtype: str) -> str:
    b, n, h, hk, d, cb, equal = case
    return f"b{b}-L{n}-h{h}-hk{hk}-d{d}-cb{cb}-{'qwen' if equal else 'general'}-{dtype}"


def ring_id(case: tuple, dtype: str) -> str:
    b, hk, g, r, d, s = case
    return f"b{b}-hk{hk}-g{g}-R{r}-d{d}-s{s}-{dtype}"


def rotary_inputs(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """q, k as column slices of one (B, L, N) projection output (as `MateAttention._project` hands them over),
    cos / sin (cb, L, d) in the model dtype (transformers' Qwen2-VL rotary returns them in x's dtype), and
    upstream gradients for q and k."""
    b, n, h, hk, d, cb, equal = case
    gen = torch.Generator(device=device).manual_seed(seed)
    fused = torch.randn(b, n, (h + 2 * hk) * d + 8, generator=gen, device=device).to(dtype)
    q = fused[..., : h * d].view(b, n, h, d)
    k = fused[..., h * d + 8 : (h + hk) * d + 8].view(b, n, hk, d)
    if equal:  # Qwen's: both halves of cos / sin from the same angles
        angles = torch.randn(cb, n, d // 2, generator=gen, device=device) * 3
        cos, sin = (
            torch.cat([angles, angles], -1).cos().to(dtype),
            torch.cat([angles, angles], -1).sin().to(dtype),
        )
    else:  # any (B, L, d): the backward must be the exact transpose, not just the rotary with -sin
        cos = torch.randn(cb, n, d, generator=gen, device=device).to(dtype)
        sin = torch.randn(cb, n, d, generator=gen, device=device).to(dtype)
    gq = torch.randn(b, n, h, d, generator=gen, device=device).to(dtype)
    gk = torch.randn(b, n, hk, d, generator=gen, device=device).to(dtype)
    return q, k, cos, sin, gq, gk


def ring_inputs(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """q (B, Hq, 1, d), a ring k, v (B, Hkv, R, d) with NaN / inf in its invalid slots, and its validity:
    row 0 wrapped (valid but a run in the middle), row 1 sparse, row 2 (if any) empty."""
    b, hk, g, r, d, _ = case
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hk * g, 1, d, generator=gen, device=device).to(dtype)
    k = torch.randn(b, hk, r, d, generator=gen, device=device).to(dtype)
    v = torch.randn(b, hk, r, d, generator=gen, device=device).to(dtype)
    valid = torch.ones(b, r, dtype=torch.bool, device=device)
    valid[0, r // 3 : r // 2] = False
    if b > 1:
        valid[1] = torch.rand(r, generator=gen, device=device) < 0.3
        valid[1, r - 1] = True
    if b > 2:
        valid[2] = False
    dead = ~valid[:, None, :, None].expand_as(k)
    return q, k.masked_fill(dead, float("nan")), v.masked_fill(dead, float("inf")), valid


def main(out_path: str) -> None:
    from decode_attention_cases import interpreter_unavailable

    if interpreter_unavailable(out_path):
        return
    from linmu_cli.ops.decode_attention import triton as attn
    from linmu_cli.ops.rotary import triton as rot

    assert rot.INTERPRET, "TRITON_INTERPRET=1 must be set before this script starts"
    rotary: dict[str, tuple[torch.Tensor, ...]] = {}
    for case in ROTARY_CASES:
        for name, dtype in DTYPES.items():
            q, k, cos, sin, gq, gk = rotary_inputs(case, dtype)
            q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
            qo, ko = rot.rotary_triton(q, k, cos, sin)
            dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
            rotary[rotary_id(case, name)] = (qo.detach(), ko.detach(), dq, dk)
    ring: dict[str, torch.Tensor] = {}
    for case in RING_CASES:
        b, hk, g, _, d, splits = case
        for name, dtype in DTYPES.items():
            q, k, v, valid = ring_inputs(case, dtype)
            ring[ring_id(case, name)] = attn.masked_split_kv_decode(
                q.reshape(b, hk, g, d), k, v, valid, scale=0.3, num_splits=splits, block_n=BLOCK_N
            )
    torch.save({"rotary": rotary, "ring": ring}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])

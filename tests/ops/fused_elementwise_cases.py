"""Inputs of tests/ops/test_fused_elementwise.py, and (run as a script) the driver that executes the scan-input,
fusion-mix and skip-add Triton kernels (`linmu_cli.ops.scan_inputs`, `linmu_cli.ops.fusion_mix`,
`linmu_cli.ops.skip_add`) forward and backward under Triton's CPU interpreter (a separate process: see
decode_attention_cases.py).

    TRITON_INTERPRET=1 python tests/ops/fused_elementwise_cases.py OUT.pt

writes {"scan": {id: (outputs, grads)}, "mix": {...}, "skip": {...}, "norm": {...}} (the skip add + gated norm) or
{"unavailable": reason}.
"""

from __future__ import annotations

import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (batch, length, kv heads, group, d of x, d of B, dt on B (fla) or not (mamba), with A, x scale)
SCAN_CASES = [
    (2, 37, 2, 3, 16, 16, True, True, 1.0),  # fla: k = B dt, g = dt A; length off the token tile
    (1, 20, 1, 7, 24, 24, True, False, 1.0),  # Qwen2-VL-7B's group of 7, d off the power of 2, no g
    (2, 19, 2, 2, 16, 16, False, False, 0.25),  # mamba: x repeated and scaled, B repeated
]
# (batch, length, heads, d, logit per "token" or "head", one output)
MIX_CASES = [(2, 21, 3, 16, "token", False), (1, 19, 4, 24, "head", False), (2, 17, 3, 16, "token", True)]
# the GPU test's: Qwen2-VL-7B's heads (4 key/value heads of 128, groups of 7) over a few thousand tokens
GPU_SCAN_CASES = [
    (2, 3001, 4, 7, 128, 128, True, True, 1.0),
    (1, 4099, 4, 7, 128, 128, False, False, 128**-0.5),
]
GPU_MIX_CASES = [(2, 3001, 28, 128, "token", False), (1, 2051, 28, 128, "head", False),
                 (1, 4099, 28, 128, "token", True)]  # fmt: skip
# (batch, length, kv heads, group, d, backward output: "keep" masked, "all" unmasked (keep None), "none")
SKIP_CASES = [
    (2, 37, 2, 3, 16, "keep"),  # length off the token tile
    (1, 20, 1, 7, 24, "keep"),  # Qwen2-VL-7B's group of 7, d off the power of 2
    (2, 19, 3, 1, 24, "none"),  # no backward scan (no vision): keep and back None; g = 1 (no GQA)
    (1, 17, 2, 2, 16, "all"),  # a back with keep None: added everywhere
]
GPU_SKIP_CASES = [(2, 3001, 4, 7, 128, "keep"), (1, 4099, 4, 7, 128, "none")]
# the skip add + gated norm: a skip-add case and whether a gate is given
NORM_CASES = [(*c, gated) for c in SKIP_CASES for gated in (True, False)]
GPU_NORM_CASES = [(*GPU_SKIP_CASES[0], True), (*GPU_SKIP_CASES[1], True), (*GPU_SKIP_CASES[0], False)]


def scan_id(case: tuple, dtype: str) -> str:
    return "-".join(map(str, case)) + f"-{dtype}"


mix_id = scan_id


def scan_inputs_of(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """x, B: strided slices of one (b, l, 2 g + 1, d) tensor (as the scan-order gather gives them); dt (b, l, h)
    float32 positive (a strided view); A (h,) negative; the output gradients (dv, dk, dg)."""
    b, length, g, group, dx, db, dt_on_b, with_a, _ = case
    h = g * group
    gen = torch.Generator(device=device).manual_seed(seed)
    wide = torch.randn(b, length, 2 * g + 1, max(dx, db), generator=gen, device=device).to(dtype)
    x, B = wide[:, :, :g, :dx], wide[:, :, g : 2 * g, :db]
    dt = torch.rand(b, length, h + 1, generator=gen, device=device)[..., :h] * 0.5 if dt_on_b else None
    A = -torch.rand(h, generator=gen, device=device) - 0.1 if with_a else None
    dv = torch.randn(b, length, h, dx, generator=gen, device=device).to(dtype)
    dk = torch.randn(b, length, h, db, generator=gen, device=device).to(dtype)
    dg = torch.randn(b, length, h, generator=gen, device=device) if with_a else None
    return x, B, dt, A, (dv, dk, dg)


def mix_inputs_of(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """flex (b, l, H, d) contiguous, swin a transposed view (as Local-Swin's output), logit a column slice of a
    wider tensor (as the block's one GEMM gives it), and the output gradients."""
    b, length, heads, d, mode, one = case
    gen = torch.Generator(device=device).manual_seed(seed)
    flex = torch.randn(b, length, heads, d, generator=gen, device=device).to(dtype)
    swin = torch.randn(b, heads, length, d, generator=gen, device=device).to(dtype).transpose(1, 2)
    n = 1 if mode == "token" else heads
    logit = (torch.randn(b, length, n + 3, generator=gen, device=device) * 2).to(dtype)[..., 1 : n + 1]
    grads = [
        torch.randn(b, length, heads, d, generator=gen, device=device).to(dtype)
        for _ in range(1 if one else 2)
    ]
    return flex, swin, logit, grads


skip_id = scan_id


def skip_inputs_of(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """y a transposed view (b, H, l, d -> b, l, H, d), back a head slice of a wider tensor, x a column slice of the
    (b, l, (2 H_kv + H) d) conv output viewed (b, l, H_kv, d) (as `FlexMA.forward` splits it), keep a (b, l, 1, 1)
    bool mask, D (H,) float32; and the output gradient."""
    b, length, kv, group, d, mode = case
    h = kv * group
    gen = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(b, h, length, d, generator=gen, device=device).to(dtype).transpose(1, 2)
    back = None
    if mode != "none":
        back = torch.randn(b, length, h + 2, d, generator=gen, device=device).to(dtype)[:, :, 1 : h + 1]
    keep = torch.rand(b, length, 1, 1, generator=gen, device=device) < 0.7 if mode == "keep" else None
    xbc = torch.randn(b, length, (2 * kv + h) * d, generator=gen, device=device).to(dtype)
    x = xbc[..., : kv * d].view(b, length, kv, d)
    D = torch.randn(h, generator=gen, device=device)
    grad = torch.randn(b, length, h, d, generator=gen, device=device).to(dtype)
    return y, back, keep, x, D, grad


norm_id = scan_id


def norm_inputs_of(case: tuple, dtype: torch.dtype, device="cpu", seed=0):
    """The skip-add inputs, plus the gate (a column slice of a wider (b, l, H d + 5) tensor, as the block's one GEMM
    gives it) or None, and the norm weight (H d,) float32 around 1."""
    *skip, gated = case
    y, back, keep, x, D, grad = skip_inputs_of(tuple(skip), dtype, device, seed)
    b, length, kv, group, d, _ = skip
    hd = kv * group * d
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    gate = (
        torch.randn(b, length, hd + 5, generator=gen, device=device).to(dtype)[..., 3 : 3 + hd]
        if gated
        else None
    )
    weight = torch.rand(hd, generator=gen, device=device) + 0.5
    return y, back, keep, x, D, gate, weight, grad


def in_float32(fn):
    """`fn` on float32 copies of its floating-point tensor arguments: float32 math with no rounding between the
    ops, the exact reference that a bf16 kernel and its bf16 reference are both measured against (autograd
    carries the gradients back to the bf16 leaves, rounding each once)."""

    def run(*args):
        return fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))

    return run


def leaves(*tensors):
    """Detached copies that require grad (None stays None)."""
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def run_scan(fn, case: tuple, dtype: torch.dtype, device="cpu"):
    """(outputs, grads of x, B, dt, A) of `fn` (the kernel's or the reference's entry)."""
    b, length, g, group, _, _, dt_on_b, _, scale = case
    x, B, dt, A, (dv, dk, dg) = scan_inputs_of(case, dtype, device)
    x, B, dt, A = leaves(x, B, dt, A)
    v, k, gg = fn(x, B, dt, A, g * group, scale, dt_on_b)
    loss = (v.float() * dv.float()).sum() + (k.float() * dk.float()).sum()
    if gg is not None:
        loss = loss + (gg * dg).sum()
    loss.backward()
    outs = [v.detach(), k.detach(), None if gg is None else gg.detach()]
    return outs, [None if t is None else t.grad for t in (x, B, dt, A)]


def run_mix(fn, case: tuple, dtype: torch.dtype, device="cpu"):
    """(outputs, grads of flex, swin, logit) of `fn`."""
    flex, swin, logit, grads = mix_inputs_of(case, dtype, device)
    flex, swin, logit = leaves(flex, swin, logit)
    outs = fn(flex, swin, logit, case[5])
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads, strict=True))
    loss.backward()
    return [o.detach() for o in outs], [flex.grad, swin.grad, logit.grad]


def run_skip(fn, case: tuple, dtype: torch.dtype, device="cpu"):
    """([output], grads of y, back, x, D) of `fn`."""
    y, back, keep, x, D, grad = skip_inputs_of(case, dtype, device)
    y, back, x, D = leaves(y, back, x, D)
    out = fn(y, back, keep, x, D)
    (out.float() * grad.float()).sum().backward()
    return [out.detach()], [None if t is None else t.grad for t in (y, back, x, D)]


def run_norm(fn, case: tuple, dtype: torch.dtype, device="cpu"):
    """([output], grads of y, back, x, D, gate, weight) of `fn`."""
    y, back, keep, x, D, gate, weight, grad = norm_inputs_of(case, dtype, device)
    y, back, x, D, gate, weight = leaves(y, back, x, D, gate, weight)
    out = fn(y, back, keep, x, D, gate, weight, 1e-5)
    (out.float() * grad.float()).sum().backward()
    return [out.detach()], [None if t is None else t.grad for t in (y, back, x, D, gate, weight)]


def main(out_path: str) -> None:
    from decode_attention_cases import interpreter_unavailable

    if interpreter_unavailable(out_path):
        return
    from linmu_cli.ops.fusion_mix import triton as mix_tri
    from linmu_cli.ops.scan_inputs import triton as scan_tri
    from linmu_cli.ops.skip_add import triton as skip_tri

    assert scan_tri.INTERPRET, "TRITON_INTERPRET=1 must be set before this script starts"
    scan, mix, skip, norm = {}, {}, {}, {}
    for case in SCAN_CASES:
        for name, dtype in DTYPES.items():
            scan[scan_id(case, name)] = run_scan(scan_tri.scan_inputs_triton, case, dtype)
    for case in MIX_CASES:
        for name, dtype in DTYPES.items():
            mix[mix_id(case, name)] = run_mix(mix_tri.fusion_mix_triton, case, dtype)
    for case in SKIP_CASES:
        for name, dtype in DTYPES.items():
            skip[skip_id(case, name)] = run_skip(skip_tri.skip_add_triton, case, dtype)
    for case in NORM_CASES:
        for name, dtype in DTYPES.items():
            norm[norm_id(case, name)] = run_norm(skip_tri.skip_gated_norm_triton, case, dtype)
    torch.save({"scan": scan, "mix": mix, "skip": skip, "norm": norm}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])

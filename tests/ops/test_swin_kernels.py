"""Local-Swin's Triton kernels against their references: the fused rotary of q and k (`linmu_cli.ops.rotary`,
forward and backward) and the masked split-KV decode over the text-window ring
(`linmu_cli.ops.decode_attention.triton.masked_split_kv_decode`, used by `ops.window_attention.decode_attention`).

On CPU through Triton's interpreter (small shapes: strided slices of one projection output, GQA 7, head_dim off
the power of 2, more heads than a tile, one decode token, broadcast cos / sin, a wrapped and a sparse ring with
NaN in its invalid slots, a row with none valid, one and several splits) and compiled for sm_90 without a GPU;
on the GPU in bf16 at the Qwen2-VL-7B shapes, with CUDA-graph captures and timings (`-s` prints them):

    python3 -m pytest -s -m gpu tests/ops/test_swin_kernels.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from decode_attention_cases import BYTE_LOAD, compile_for_sm90, run_interpreted
from helpers import rel_error
from swin_kernel_cases import (
    DTYPES,
    RING_CASES,
    ROTARY_CASES,
    ring_id,
    ring_inputs,
    rotary_id,
    rotary_inputs,
)

from linmu_cli.ops.decode_attention import masked_decode_attention_naive
from linmu_cli.ops.rotary import apply_rotary, last_rotary_backend, rotary_naive
from linmu_cli.ops.window_attention import decode_attention, last_decode_backend

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Both kernels' outputs on every case, from `swin_kernel_cases.py` run with TRITON_INTERPRET=1 in a
    subprocess; this process rebuilds the same inputs from the same seeds."""
    return run_interpreted(
        HERE / "swin_kernel_cases.py", tmp_path_factory.mktemp("swin_kernel") / "interpreted.pt"
    )


def _tol(dtype: torch.dtype) -> dict:
    # bf16: one rounding of the output (the interpreter truncates instead of rounding: up to 1 ulp, 2^-7 at 1)
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def _rotary_reference(q, k, cos, sin, gq, gk):
    """Outputs and input gradients of the reference, in float32 from the same (rounded) inputs."""
    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qo, ko = rotary_naive(qf, cos.float(), sin.float()), rotary_naive(kf, cos.float(), sin.float())
    dq, dk = torch.autograd.grad((qo, ko), (qf, kf), (gq.float(), gk.float()))
    return qo.detach(), ko.detach(), dq, dk


# ------------------------------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", ROTARY_CASES, ids=[rotary_id(c, "")[:-1] for c in ROTARY_CASES])
def test_triton_rotary_forward_and_backward_equal_the_reference_under_the_interpreter(
    interpreted, case, dtype
):
    inputs = rotary_inputs(case, DTYPES[dtype])
    got = interpreted["rotary"][rotary_id(case, dtype)]
    want = _rotary_reference(*inputs)
    for name, g, w, x in zip(("q", "k", "dq", "dk"), got, want, (*inputs[:2], *inputs[:2]), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous(), name
        torch.testing.assert_close(g.float(), w, **_tol(DTYPES[dtype]), msg=name)


def test_rotary_reference_is_transformers_qwen2_vl_text_rotary_bit_for_bit():
    """`rotary_naive` is the decoder's own `apply_rotary_pos_emb` (q, k laid out (B, L, heads, d)), in bf16."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen

    q, k, cos, sin, _, _ = rotary_inputs(ROTARY_CASES[0], torch.bfloat16)
    want_q, want_k = qwen.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    got_q, got_k = apply_rotary(q, k, cos, sin, fast=False)
    assert last_rotary_backend() == "torch"
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_apply_rotary_on_cpu_runs_the_reference_even_when_fast():
    """CPU never touches Triton: `fast` only chooses the kernel on CUDA."""
    q, k, cos, sin, _, _ = rotary_inputs(ROTARY_CASES[1], torch.float32)
    got = apply_rotary(q, k, cos, sin, fast=True)
    assert last_rotary_backend() == "torch"
    assert torch.equal(got[0], rotary_naive(q, cos, sin)) and torch.equal(got[1], rotary_naive(k, cos, sin))


def test_triton_rotary_refuses_cos_that_requires_grad():
    tri = pytest.importorskip("linmu_cli.ops.rotary.triton", reason="triton is not installed")
    q, k, cos, sin, _, _ = rotary_inputs(ROTARY_CASES[1], torch.float32)
    with pytest.raises(ValueError, match="no gradient for cos / sin"):
        tri.rotary_triton(q, k, cos.requires_grad_(), sin)


def _loads(ptx: str) -> set[str]:
    return set(re.findall(r"ld\.global[.\w]*", ptx))


def test_triton_rotary_compiles_for_the_h200_with_16_byte_loads():
    """The real path compiled for sm_90 as the JIT specializes it in a 7B prefill (q, k column slices of a
    (1, 65536, 12864) GEMM output): q moves in 16-byte vectors, no shared memory, forward and backward."""
    pytest.importorskip("triton", reason="triton is not installed")
    from linmu_cli.ops.rotary import triton as rot

    n, length = 12864, 65536
    vals = {name: ("*bf16", 0) for name in ("Q", "K", "COS", "SIN", "QO", "KO")}
    for p in "qk":
        vals |= {f"stride_{p}{a}": ("i32", x) for a, x in zip("blhd", (length * n, n, 128, 1), strict=True)}
    for p in "cs":
        vals |= {f"stride_{p}{a}": ("i32", x) for a, x in zip("bld", (length * 128, 128, 1), strict=True)}
    vals |= {"length": ("i32", length), "q_heads": ("i32", 28), "k_heads": ("i32", 4)}
    for transpose in (False, True):
        consts = {"HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 4, "BLOCK_HALF": 64, "TRANSPOSE": transpose}
        kernel = compile_for_sm90(rot._rotary_kernel, vals, consts, rot.DEFAULT_NUM_WARPS, 1)
        ptx = kernel.asm["ptx"]
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, _loads(ptx)
        assert "ld.global.b16" not in ptx and kernel.metadata.shared == 0


# ------------------------------------------------------------------------------------- decode over the ring
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", RING_CASES, ids=[ring_id(c, "")[:-1] for c in RING_CASES])
def test_triton_ring_decode_equals_the_reference_under_the_interpreter(interpreted, case, dtype):
    b, hk, g, _, d, _ = case
    q, k, v, valid = ring_inputs(case, DTYPES[dtype])
    got = interpreted["ring"][ring_id(case, dtype)]
    assert got.dtype == DTYPES[dtype] and got.shape == (b, hk, g, d)
    assert torch.isfinite(got).all()  # NaN / inf in the invalid slots never enter
    ref = masked_decode_attention_naive(q.float(), k.float(), v.float(), valid, 0.3)
    live = valid.any(1)
    got = got.float().reshape(b, hk * g, 1, d)
    torch.testing.assert_close(got[live], ref[live], **_tol(DTYPES[dtype]))
    assert (got[~live] == 0).all()  # no valid slot: zeros, as the teacher kernel's merge gives


def test_ring_decode_sdpa_path_equals_the_reference_on_a_wrapped_ring():
    """`decode_attention` without `fast` (CPU, autograd, `ssd_backend: torch`) over a ring whose valid slots
    are no prefix."""
    case = RING_CASES[0]
    b, hk, g, r, d, _ = case
    q, k, v, valid = ring_inputs(case, torch.float32)
    k, v = k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0)  # SDPA's masked softmax multiplies 0 * v
    got = decode_attention(q.reshape(b, 1, hk * g, d), k, v, valid, 0.3, fast=True)
    assert last_decode_backend() == "sdpa"  # CPU
    ref = masked_decode_attention_naive(q, k, v, valid, 0.3).reshape(b, 1, hk * g, d)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_triton_ring_decode_compiles_for_the_h200():
    """Compiled for sm_90 at the 7B decode shape (4 kv heads x 7 queries over a 512-slot ring, q from a
    (B, 1, 28, 128) tensor): bf16 tensor-core dots, pipelined (cp.async) K / V loads, shared memory within an
    H200 SM's 227 KiB; one split (the direct write) and several (partial results)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from linmu_cli.ops.decode_attention import triton as tri

    ring, heads, kv_heads, d = 512, 28, 4, 128
    vals = {n: ("*bf16", 0) for n in ("Q", "K", "V", "OUT")} | {n: ("*u8", 0) for n in ("LEN", "VALID")}
    vals |= {n: ("*fp32", 0) for n in ("PO", "PM", "PL")}
    for p in "qo":
        vals |= {f"stride_{p}{a}": ("i32", x) for a, x in zip("bhgd", (heads * d, 7 * d, d, 1), strict=True)}
    for p in "kv":
        strides = (kv_heads * ring * d, ring * d, d, 1)
        vals |= {f"stride_{p}{a}": ("i32", x) for a, x in zip("bhnd", strides, strict=True)}
    ints = {"stride_lb": 0, "stride_mb": ring, "stride_mn": 1, "len_offset": 0, "kv_heads": kv_heads,
            "group": 7, "head_dim": d, "capacity": ring, "chunk": 64, "num_splits": 8}  # fmt: skip
    vals |= {n: ("i32", x) for n, x in ints.items()} | {"scale_log2": ("fp32", 0.1)}
    for split in (False, True):
        consts = {"BLOCK_G": 16, "BLOCK_N": tri.DEFAULT_BLOCK_N, "BLOCK_D": 128, "EVEN_D": True, "UPCAST": False,
                  "PRECISION": "tf32", "HAS_VALID": True, "SPLIT": split}  # fmt: skip
        kernel = compile_for_sm90(tri._split_kv_kernel, vals, consts, tri.DEFAULT_NUM_WARPS,
                                  tri.DEFAULT_NUM_STAGES)  # fmt: skip
        ptx = kernel.asm["ptx"]
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
        assert "cp.async" in ptx and kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
        assert re.search(BYTE_LOAD, ptx)  # the validity mask's bytes (none on the teacher's path)


# ----------------------------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ms(fn, repeats: int = 20) -> float:
    """Median CUDA-event time of `fn` in ms (after a warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _qwen7b_rotary(length: int, batch: int = 1, seed: int = 0):
    """q, k as column slices of a (B, L, 12864) bf16 GEMM output (the fused projection of a 7B block), bf16
    cos / sin of Qwen's form, and upstream gradients."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    fused = torch.randn(batch, length, 12864, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = fused[..., 1024 : 1024 + 3584].view(batch, length, 28, 128)
    k = fused[..., 4608 : 4608 + 512].view(batch, length, 4, 128)
    angles = torch.randn(batch, length, 64, generator=gen, device="cuda") * 100
    cos, sin = (torch.cat([angles] * 2, -1).cos().bfloat16(), torch.cat([angles] * 2, -1).sin().bfloat16())
    return q, k, cos, sin


@pytest.mark.parametrize("length", [1, 4099])
@pytest.mark.gpu
@cuda
def test_triton_rotary_at_the_7b_shape_on_gpu(length):
    """bf16 forward and backward against the float32 reference, within one bf16 rounding; the training path
    (`apply_rotary` with autograd) reports the kernel."""
    q, k, cos, sin = _qwen7b_rotary(length, batch=2)
    qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = apply_rotary(qg, kg, cos, sin, fast=True)
    assert last_rotary_backend() == "triton" and qo.is_contiguous() and qo.dtype == torch.bfloat16
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (qg, kg), (gq, gk))
    want = _rotary_reference(q, k, cos, sin, gq, gk)
    errs = [rel_error(a, b) for a, b in zip((qo, ko, dq, dk), want, strict=True)]
    print(f"\nrotary L={length}: rel. errors q/k/dq/dk vs float32 {[f'{e:.1e}' for e in errs]}")
    assert all(e < 4e-3 for e in errs), errs  # bf16 rounding: 2^-9 relative


@pytest.mark.gpu
@cuda
def test_triton_rotary_time_at_65k_tokens_on_gpu():
    """The 65,573-token prefill of docs/benchmarks.md: one fused pass against the reference's elementwise
    passes (forward; and forward + backward). Prints the times; asserts only that the kernel is faster."""
    q, k, cos, sin = _qwen7b_rotary(65_573)
    fused = _ms(lambda: apply_rotary(q, k, cos, sin, fast=True))
    ref = _ms(lambda: apply_rotary(q, k, cos, sin, fast=False))
    qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
    gq, gk = (
        torch.randn(q.shape, device="cuda", dtype=q.dtype),
        torch.randn(k.shape, device="cuda", dtype=k.dtype),
    )

    def fwd_bwd(fast: bool):
        torch.autograd.grad(apply_rotary(qg, kg, cos, sin, fast=fast), (qg, kg), (gq, gk))

    fused_fb, ref_fb = _ms(lambda: fwd_bwd(True)), _ms(lambda: fwd_bwd(False))
    moved = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    print(f"\nrotary at 65,573 tokens: fused {fused:.3f} ms ({moved / fused / 1e9:.0f} GB/s), reference {ref:.3f} ms;"
          f" forward + backward fused {fused_fb:.3f} ms, reference {ref_fb:.3f} ms")  # fmt: skip
    assert fused < ref and fused_fb < ref_fb


def _ring_7b(batch: int, seed: int = 0):
    """A 7B decode token over a wrapped 512-slot bf16 ring: q (B, 1, 28, 128), k / v (B, 4, 512, 128), valid
    (B, 512) with a run of invalid slots in the middle of some rows and a few padding slots in others."""
    q, k, v, _ = ring_inputs((batch, 4, 7, 512, 128, None), torch.bfloat16, device="cuda", seed=seed)
    k, v = k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0)  # finite, as a real ring (SDPA timing)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    valid = torch.rand(batch, 512, generator=gen, device="cuda") > 0.05
    valid[::2, 100:300] = False
    valid[:, 37] = True  # the token's own slot
    return q.reshape(batch, 1, 28, 128), k, v, valid


@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.gpu
@cuda
def test_triton_ring_decode_at_the_7b_shape_on_gpu(batch):
    """The Triton path of `decode_attention` against the float32 reference and the SDPA path; prints the
    time of each split count and of SDPA (to choose the default: one split is one kernel)."""
    from linmu_cli.ops.decode_attention import triton as tri

    q, k, v, valid = _ring_7b(batch)
    scale = 128**-0.5
    with torch.no_grad():
        got = decode_attention(q, k, v, valid, scale, fast=True)
        assert last_decode_backend() == "triton"
        ref = masked_decode_attention_naive(q.float().transpose(1, 2), k.float(), v.float(), valid, scale)
        err = rel_error(got, ref.transpose(1, 2))
        qg = q.reshape(batch, 4, 7, 128)
        times = {f"splits={s}": _ms(lambda s=s: tri.masked_split_kv_decode(qg, k, v, valid, scale=scale,
                                                                          num_splits=s))  # fmt: skip
                 for s in (1, 2, 4, 8)}  # fmt: skip
        times["auto"] = _ms(lambda: decode_attention(q, k, v, valid, scale, fast=True))
        times["sdpa"] = _ms(lambda: decode_attention(q, k, v, valid, scale, fast=False))
    auto = tri.choose_num_splits(batch * 4, 512, tri._sm_count(q.device))
    print(f"\nring decode batch {batch}: rel. error {err:.1e}; auto = {auto} splits; "
          + ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in times.items()))  # fmt: skip
    assert torch.isfinite(got).all() and err < 1e-2, err


@pytest.mark.gpu
@cuda
def test_rotary_and_ring_decode_capture_in_a_cuda_graph():
    """The decode step's rotary and ring attention captured once, replayed after the ring, its validity and the
    token's inputs change in place (as a served step advances them): each replay equals the eager call."""
    batch = 2
    q0, k0, cos, sin = _qwen7b_rotary(1, batch=batch)
    q0, k0 = q0.clone(), k0.clone()
    _, ring_k, ring_v, valid = _ring_7b(batch)

    def step():
        q, k = apply_rotary(q0, k0, cos, sin, fast=True)
        return q, k, decode_attention(q, ring_k, ring_v, valid, 128**-0.5, fast=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static = step()
    gen = torch.Generator(device="cuda").manual_seed(5)
    for i in range(3):
        for t in (q0, k0, cos, sin, ring_k, ring_v):
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
        valid.copy_(torch.rand(valid.shape, generator=gen, device="cuda") > 0.3 * i)
        valid[:, 0] = True
        graph.replay()
        with torch.no_grad():
            eager = step()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(static, eager, strict=True)), i

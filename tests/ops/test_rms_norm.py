"""The decoder layer's fused RMSNorm (+ residual add) and SiLU product (`linmu_cli.ops.rms_norm`): the references
equal transformers' modules bit for bit; the Triton kernels equal the references on CPU through Triton's
interpreter (decode and wider shapes, D off the power of 2, strided rows, bf16 with a float32 weight) and drive
both decode runners there; they compile for the H200 without a GPU; on the GPU they match the references in
bf16 to the last bit almost everywhere (within 1 ulp everywhere) and capture in a CUDA graph.

Run the GPU part with `python3 -m pytest -s -m gpu tests/ops/test_rms_norm.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from decode_attention_cases import run_interpreted
from rms_norm_cases import (
    EPS,
    NORM_CASES,
    NORM_DTYPES,
    SILU_CASES,
    SILU_DTYPES,
    case_id,
    norm_inputs,
    runners,
    silu_inputs,
    tiny_models,
)

from linmu_cli.ops import rms_norm as ops
from linmu_cli.ops.rms_norm import add_rms_norm_naive, rms_norm_naive, silu_mul_naive

HERE = Path(__file__).resolve().parent


def rel_ulps(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - ref| / |ref| in units of `dtype`'s machine epsilon (2^-7 for bf16: one ulp is 0.5-1 of it)."""
    ref64 = ref.double()
    return (got.double() - ref64).abs() / (ref64.abs().clamp_min(1e-30) * torch.finfo(dtype).eps)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The kernels' outputs on every case, from `rms_norm_cases.py` run with TRITON_INTERPRET=1 in a subprocess;
    this process builds the same inputs from the same seeds and checks them against the references."""
    return run_interpreted(HERE / "rms_norm_cases.py", tmp_path_factory.mktemp("rms_norm") / "interpreted.pt")


def _close(got: torch.Tensor, ref: torch.Tensor, act_dtype: torch.dtype, roundings: int = 2) -> None:
    """float32: equal but for the order of the float32 sum. bf16: each of the kernel's `roundings` to bf16 (the
    normed row or the SiLU, then the product; under the interpreter also the residual sum) may land one ulp from
    the reference's (on the GPU the float32 sum order, rsqrt and exp differ; the interpreter truncates where
    the GPU rounds to nearest): within `roundings` epsilons of |ref|."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if act_dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    else:
        worst = rel_ulps(got, ref, act_dtype).max().item()
        assert worst <= roundings, worst


# ------------------------------------------------------------------------------ the references
@pytest.mark.parametrize("dtypes", list(NORM_DTYPES.values()), ids=list(NORM_DTYPES))
def test_the_references_are_transformers_modules_bit_for_bit(dtypes):
    """rms_norm_naive is `Qwen2VLRMSNorm` (and Qwen2.5-VL's), silu_mul_naive `Qwen2MLP`'s activation product,
    the residual add the decoder layer's."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2MLP, Qwen2VLRMSNorm, Qwen2VLTextConfig

    x, residual, weight = norm_inputs((3, 100), 0, dtypes)
    for cls in (Qwen2VLRMSNorm, Qwen2_5_VLRMSNorm):
        module = cls(100, eps=EPS).to(weight.dtype)
        module.weight.data.copy_(weight)
        assert torch.equal(rms_norm_naive(x, weight, EPS), module(x))
        out, total = add_rms_norm_naive(x, residual, weight, EPS)
        assert torch.equal(total, residual + x) and torch.equal(out, module(residual + x))
    mlp = Qwen2MLP(Qwen2VLTextConfig(hidden_size=100, intermediate_size=64)).to(dtypes[0])
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(mlp.down_proj(silu_mul_naive(gate, up)), mlp(x))


def test_the_dispatch_runs_the_references_on_cpu_and_says_so():
    x, residual, weight = norm_inputs((2, 3, 64), 0, NORM_DTYPES["bf16"])
    assert torch.equal(ops.rms_norm(x, weight, EPS), rms_norm_naive(x, weight, EPS))
    out, total = ops.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(out, add_rms_norm_naive(x, residual, weight, EPS)[0]) and torch.equal(
        total, x + residual
    )
    assert torch.equal(ops.silu_mul(x, residual), silu_mul_naive(x, residual))
    assert ops.last_backends() == {"rms_norm": "torch", "add_rms_norm": "torch", "silu_mul": "torch"}
    with pytest.raises(ValueError, match="unknown rms_norm backend 'cuda'"):
        ops.rms_norm(x, weight, EPS, backend="cuda")
    # use_backend overrides every call's own choice in its block, innermost first, and is undone after it
    with ops.use_backend("triton"), ops.use_backend("torch"):
        ops.silu_mul(x, residual, backend="triton")
    assert ops.last_backends()["silu_mul"] == "torch"
    with pytest.raises(RuntimeError, match="need CUDA tensors"), ops.use_backend("triton"):
        ops.silu_mul(x, residual)  # no interpreter in this process: refused, not run on the reference
    assert ops.last_backends()["silu_mul"] == "triton"
    ops.silu_mul(x, residual)
    assert ops.last_backends()["silu_mul"] == "torch"
    with pytest.raises(ValueError, match="unknown norm / MLP backend 'fast'"), ops.use_backend("fast"):
        pass


# ------------------------------------------------------------------------------ the kernels, interpreted
@pytest.mark.parametrize("name", list(NORM_DTYPES))
@pytest.mark.parametrize("case", NORM_CASES, ids=[case_id(*c, "")[:-1] for c in NORM_CASES])
def test_triton_rms_norm_equals_the_reference_under_the_interpreter(interpreted, case, name):
    x, residual, weight = norm_inputs(*case, NORM_DTYPES[name])
    act = NORM_DTYPES[name][0]
    out, none = interpreted["norm"][case_id(*case, name)]
    assert none is None
    _close(out, rms_norm_naive(x, weight, EPS), act)
    out, total = interpreted["norm"][case_id(*case, name) + "-add"]
    ref_out, ref_total = add_rms_norm_naive(x, residual, weight, EPS)
    _close(total, ref_total, act, roundings=1)
    _close(out, ref_out, act, roundings=3)  # the sum truncated too


@pytest.mark.parametrize("name", list(SILU_DTYPES))
@pytest.mark.parametrize("case", SILU_CASES, ids=[case_id(*c, "")[:-1] for c in SILU_CASES])
def test_triton_silu_mul_equals_the_reference_under_the_interpreter(interpreted, case, name):
    gate, up = silu_inputs(*case, SILU_DTYPES[name])
    _close(interpreted["silu"][case_id(*case, name)], silu_mul_naive(gate, up), SILU_DTYPES[name])


def test_the_public_calls_and_both_runners_on_the_kernels_under_the_interpreter(interpreted):
    """backend="triton" on CPU tensors (interpreted) is recorded as such; LinMU's StaticDecoder and the served
    teacher with the shared layer on the kernels give the logits of their reference steps (float32)."""
    pub = interpreted["public"]
    x, residual, weight = norm_inputs((2, 64), 0, NORM_DTYPES["fp32"])
    assert pub["paths"] == {"rms_norm": "triton", "add_rms_norm": "triton", "silu_mul": "triton"}
    torch.testing.assert_close(pub["rms_norm"], rms_norm_naive(x, weight, EPS), atol=1e-6, rtol=1e-6)
    for got, want in zip(pub["add_rms_norm"], add_rms_norm_naive(x, residual, weight, EPS), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pub["silu_mul"], silu_mul_naive(x, residual), atol=1e-6, rtol=1e-6)

    teacher, student = tiny_models()
    steps = interpreted["steps"]
    with torch.no_grad():
        for name, runner in runners(teacher, student).items():
            assert steps[f"{name}_paths"] == pub["paths"], name
            for i, got in enumerate(steps[name]):
                torch.testing.assert_close(got, runner.step(), atol=1e-5, rtol=1e-5, msg=f"{name} step {i}")


def test_triton_kernels_compile_for_the_h200_without_a_gpu():
    """The real (not interpreted) kernels, compiled for sm_90 at the 7B decode shape in bf16: 16-byte loads
    and stores (no scalar 2-byte ones). Catches a kernel that only the interpreter accepts."""
    pytest.importorskip("triton", reason="triton is not installed")
    from decode_attention_cases import compile_for_sm90

    from linmu_cli.ops.rms_norm import triton as tri

    vals = {n: ("*bf16", 0) for n in ("X", "R", "W", "OUT", "SUM")}
    vals |= {n: ("i32", 3584) for n in ("stride_x", "stride_r", "stride_o", "stride_s", "n")}
    vals["eps"] = ("fp32", EPS)
    for residual in (False, True):
        k = compile_for_sm90(tri._rms_norm_kernel, vals, {"HAS_RESIDUAL": residual, "BLOCK": 4096},
                             tri._norm_warps(4096), 1)  # fmt: skip
        ptx = k.asm["ptx"]
        assert "ld.global.b16" not in ptx and "ld.global.v4" in ptx and "st.global.v4" in ptx, residual
    vals = {n: ("*bf16", 0) for n in ("G", "U", "OUT")} | {n: ("i32", 18944) for n in ("stride_g", "stride_u",
                                                                                      "stride_o", "n")}  # fmt: skip
    ptx = compile_for_sm90(tri._silu_mul_kernel, vals, {"BLOCK": tri.SILU_BLOCK}, 4, 1).asm["ptx"]
    assert "ld.global.b16" not in ptx and "ld.global.v4" in ptx and "st.global.v4" in ptx


# ----------------------------------------------------------------------------------------------------- GPU
def _gpu_cases():
    """(x shape) at the 7B's decode batches and a prefill-sized block."""
    return [(1, 1, 3584), (16, 1, 3584), (4096, 3584)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", _gpu_cases(), ids=lambda s: "x".join(map(str, s)))
def test_triton_norms_match_the_reference_in_bf16_on_gpu(shape):
    """bf16 at the 7B's hidden size: within 1 ulp of the reference everywhere, bit-equal almost everywhere
    (the float32 sum order and rsqrt differ; printed: the share of elements that are not bit-equal)."""
    x, residual, weight = norm_inputs(shape, 0, NORM_DTYPES["bf16"], device="cuda")
    got = ops.rms_norm(x, weight, EPS)
    assert ops.last_backends()["rms_norm"] == "triton"
    ref = rms_norm_naive(x, weight, EPS)
    _close(got, ref, torch.bfloat16)
    out, total = ops.add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_total = add_rms_norm_naive(x, residual, weight, EPS)
    assert torch.equal(total, ref_total)  # one bf16 add: exact
    _close(out, ref_out, torch.bfloat16)
    differ = (out != ref_out).float().mean().item()
    print(f"\n{shape}: {differ:.2e} of add_rms_norm's bf16 outputs not bit-equal to the reference")
    assert differ < 1e-2
    x32, r32, w32 = norm_inputs(shape, 0, NORM_DTYPES["fp32"], device="cuda")
    for a, b in zip(
        ops.add_rms_norm(x32, r32, w32, EPS), add_rms_norm_naive(x32, r32, w32, EPS), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 16, 4096])
def test_triton_silu_mul_matches_the_reference_in_bf16_on_gpu(rows):
    gate, up = silu_inputs((rows, 18944), False, torch.bfloat16, device="cuda")
    got = ops.silu_mul(gate, up)
    assert ops.last_backends()["silu_mul"] == "triton"
    ref = silu_mul_naive(gate, up)
    _close(got, ref, torch.bfloat16)
    differ = (got != ref).float().mean().item()
    print(f"\n{rows} rows: {differ:.2e} of silu_mul's bf16 outputs not bit-equal to the reference")
    assert differ < 1e-2
    gate, up = silu_inputs((rows, 2000), True, torch.bfloat16, device="cuda")  # halves of one tensor
    _close(ops.silu_mul(gate, up), silu_mul_naive(gate, up), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernels_capture_in_a_cuda_graph():
    """Recorded once, replayed after the inputs change in place: each replay equals the eager calls."""
    from linmu_cli.cuda_graphs import record_cuda_graph

    x, residual, weight = norm_inputs((16, 1, 3584), 0, NORM_DTYPES["bf16"], device="cuda")
    gate, up = silu_inputs((16, 1, 18944), False, torch.bfloat16, device="cuda")

    def body():
        return (
            ops.rms_norm(x, weight, EPS),
            *ops.add_rms_norm(x, residual, weight, EPS),
            ops.silu_mul(gate, up),
        )

    graph, outs = record_cuda_graph(body)
    for step in range(3):
        for t in (x, residual, gate, up):
            t.mul_(1.5 - 0.25 * step)
        graph.replay()
        for a, b in zip(outs, body(), strict=True):
            assert torch.equal(a, b), step

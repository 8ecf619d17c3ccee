"""Stage 3's logit KL (`linmu_cli.ops.logit_kl`): the reference is KL(teacher || student) as torch's own
`kl_div` defines it; the Triton kernel equals the reference on CPU through Triton's interpreter (loss and
gradient, fp32 and bf16, V off the block, zero-weight rows, an incoming gradient other than 1, no_grad); it
compiles for the H200 without a GPU; the recipe key reaches it; on the GPU it matches the reference at the 7B
shape and prints its time and memory beside the reference's.

Run the GPU part with `python3 -m pytest -s -m gpu tests/ops/test_logit_kl.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from decode_attention_cases import run_interpreted
from logit_kl_cases import CASES, DTYPES, TEMPERATURES, case_id, kl_inputs

from linmu_cli.distillation.recipe import KL_BACKENDS, LossConfig
from linmu_cli.errors import LinmuError
from linmu_cli.ops import logit_kl as ops
from linmu_cli.ops.logit_kl import logit_kl_naive

HERE = Path(__file__).resolve().parent


def reference(student, teacher, weights, temperature, grad_scale=0.5):
    """The reference loss and its gradient (autograd through float32 log-softmaxes) in the student's dtype."""
    leaf = student.detach().clone().requires_grad_(True)
    loss = logit_kl_naive(leaf, teacher, weights, temperature)
    (loss * grad_scale).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_the_reference_is_torchs_kl_div(temperature):
    student, teacher, weights = kl_inputs((2, 7), 500, torch.float32)
    per_token = F.kl_div(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
        reduction="none", log_target=True,
    ).sum(-1)  # fmt: skip
    want = (per_token * weights).sum() / weights.sum() * temperature**2
    torch.testing.assert_close(logit_kl_naive(student, teacher, weights, temperature), want)
    assert ops.logit_kl(student, teacher, weights, temperature) == logit_kl_naive(
        student, teacher, weights, temperature
    )
    assert ops.last_backend() == "torch"  # auto on CPU: never Triton


def test_bad_calls_are_refused():
    student, teacher, weights = kl_inputs((3,), 50, torch.float32)
    with pytest.raises(ValueError, match="unknown logit-KL backend 'cuda'"):
        ops.logit_kl(student, teacher, weights, backend="cuda")
    with pytest.raises(ValueError, match="differentiates the student only"):
        ops.logit_kl(student, teacher.requires_grad_(True), weights, backend="triton")
    with pytest.raises(ValueError, match="unknown logit-KL backend"), ops.use_backend("fast"):
        pass
    assert KL_BACKENDS == ops.BACKENDS  # the recipe's copy of the names (it does not import the op)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The kernel's results on every case, from `logit_kl_cases.py` run with TRITON_INTERPRET=1 in a
    subprocess; this process builds the same inputs from the same seeds and checks them against the reference."""
    return run_interpreted(HERE / "logit_kl_cases.py", tmp_path_factory.mktemp("logit_kl") / "interpreted.pt")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "lead,vocab", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c
)
def test_the_kernel_matches_the_reference_under_the_interpreter(interpreted, lead, vocab, dtype):
    """Loss to float32 summation order; gradient to that in float32, in bf16 within one rounding of the
    reference's (both round a float32 value once); rows of weight 0 get an exactly zero gradient."""
    for temperature in TEMPERATURES:
        student, teacher, weights = kl_inputs(lead, vocab, DTYPES[dtype])
        want_loss, want_grad = reference(student, teacher, weights, temperature)
        key = case_id(lead, vocab, dtype, temperature)
        loss, grad = interpreted["cases"][key]
        torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(interpreted["no_grad"][key], want_loss, rtol=2e-5, atol=1e-6, msg=key)
        assert grad.dtype == student.dtype and grad.shape == student.shape
        scale = want_grad.abs().max().item()
        tol = 1e-5 * scale if dtype == "fp32" else 2**-7 * scale
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2**-7, atol=tol, msg=key)
        assert torch.count_nonzero(grad.reshape(-1, vocab)[weights.reshape(-1) == 0]) == 0, key
    assert set(interpreted["paths"]) == {"triton"}


def test_the_kernel_compiles_for_the_h200_without_a_gpu():
    """The real (not interpreted) kernel, compiled for sm_90 at the 7B vocabulary in bf16, with and without the
    gradient pass: vectorized 16-byte loads (no scalar 2-byte ones). Catches code only the interpreter accepts."""
    pytest.importorskip("triton", reason="triton is not installed")
    from decode_attention_cases import compile_for_sm90

    from linmu_cli.ops.logit_kl import triton as tri

    vals = {n: ("*bf16", 0) for n in ("S", "T", "G")} | {n: ("*fp32", 0) for n in ("W", "WSUM", "KL")}
    vals |= {n: ("i32", 152064) for n in ("stride_s", "stride_t", "stride_g", "n_cols")}
    vals |= {"inv_temp": ("fp32", 0.5), "temperature": ("fp32", 2.0)}
    for with_grad in (False, True):
        ptx = compile_for_sm90(
            tri._logit_kl_kernel, vals, {"HAS_GRAD": with_grad, "BLOCK": tri.BLOCK}, 8, 1
        ).asm["ptx"]
        assert "ld.global.b16" not in ptx and "ld.global.v4" in ptx, with_grad
        assert ("st.global.v4" in ptx) == with_grad


def test_the_recipe_key_reaches_the_op(monkeypatch):
    """`loss.kl_backend` is checked like every key and is what the end-to-end objective's KL runs on."""
    from linmu_cli.distillation.losses import logit_kl
    from linmu_cli.ops.logit_kl import triton as tri

    assert LossConfig(kl=1.0).kl_backend == "auto"
    with pytest.raises(LinmuError, match="kl_backend"):
        LossConfig(kl=1.0, kl_backend="cuda")
    calls = []
    monkeypatch.setattr(tri, "logit_kl", lambda *a: calls.append(a) or logit_kl_naive(*a))
    student, teacher, weights = kl_inputs((2, 3), 40, torch.float32)
    got = logit_kl(student, teacher, weights, 2.0, LossConfig(kl=1.0, kl_backend="triton").kl_backend)
    assert calls and ops.last_backend() == "triton"
    assert got == logit_kl_naive(student, teacher, weights, 2.0)


# ----------------------------------------------------------------------------------------------------- GPU
def _timed(fn, reps: int = 3) -> tuple[float, float]:
    """(best seconds, peak GiB above the start) of fn() on the GPU."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best, (torch.cuda.max_memory_allocated() - base) / 2**30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernel_matches_the_reference_at_7b_shape_on_gpu():
    """bf16 logits of one 8,258-token sample over Qwen2-VL's 152,064-token vocabulary at T = 2: the loss to
    float32 summation order, the gradient within one bf16 rounding; prints forward + backward time and peak
    memory of both paths as one JSON line."""
    student, teacher, weights = kl_inputs((1, 8258), 152064, torch.bfloat16, device="cuda")
    want_loss, want_grad = reference(student, teacher, weights, 2.0, grad_scale=1.0)
    leaf = student.detach().clone().requires_grad_(True)
    loss = ops.logit_kl(leaf, teacher, weights, 2.0)
    assert ops.last_backend() == "triton"
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-6)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(leaf.grad.float(), want_grad.float(), rtol=2**-7, atol=2**-7 * scale)
    del want_grad

    def step(backend: str):
        def run():
            leaf.grad = None
            ops.logit_kl(leaf, teacher, weights, 2.0, backend=backend).backward()

        return run

    out = {}
    for backend in ("torch", "triton"):
        seconds, peak = _timed(step(backend))
        out[backend] = {"fwd_bwd_s": round(seconds, 5), "peak_gib": round(peak, 2)}
    with torch.no_grad():
        out["triton_no_grad_s"] = round(_timed(lambda: ops.logit_kl(student, teacher, weights, 2.0))[0], 5)
    bytes_moved = 2 * 2 * student.numel() * 2 + student.numel() * 2  # two passes over both inputs, one write
    out["triton_bytes_per_s"] = round(bytes_moved / out["triton"]["fwd_bwd_s"], -9)
    print("\nlogit_kl (1, 8258, 152064) bf16:", json.dumps(out))
    assert out["triton"]["fwd_bwd_s"] < out["torch"]["fwd_bwd_s"]

"""GPU: the CUDA SSD paths (fla-core, mamba-ssm, mamba's decode step) against the naive scan through the same
helper as the CPU paths (`assert_matches_naive`), bf16 inputs, relative-norm tolerance. The larger-shape and
backward comparisons against the chunked reference stay in tests/ops/test_ssd_gpu.py.

Run with `python3 -m pytest -s -m gpu tests/ops/test_ssd_gpu_paths.py` to see the errors."""

from __future__ import annotations

import pytest
import torch
from ssd_reference import assert_matches_naive, make_inputs, step_over_sequence

from linmu_cli.ops.ssd import available_ssd_backends, ssd_fla, ssd_mamba, ssd_step, step_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the fla / mamba paths are Triton kernels: CUDA only"
    ),
]

TOL = 2e-2


def bf16_inputs(reset_prob: float):
    x, dt, A, B, C, reset, init = make_inputs(2, 300, 4, 64, 64, seed=1, reset_prob=reset_prob, with_init=True,
                                              device="cuda")  # fmt: skip
    if reset is not None:
        reset[1, 0] = True
    return x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), reset, init


def require(name: str) -> None:
    status = available_ssd_backends()[name]
    if status != "ok":
        pytest.skip(f"SSD backend {name!r} does not import here: {status}")


@pytest.mark.parametrize("reset_prob", [0.0, 0.01], ids=["noreset", "reset"])
@pytest.mark.parametrize("name", ["fla", "mamba"])
def test_cuda_scan_matches_the_naive_scan(name, reset_prob):
    require(name)
    fn = ssd_fla if name == "fla" else ssd_mamba
    with torch.no_grad():
        assert_matches_naive(lambda *a: fn(*a, return_final_state=True), bf16_inputs(reset_prob), max_rel=TOL,
                             name=name)  # fmt: skip


def test_mamba_decode_step_over_a_sequence_matches_the_naive_scan():
    if step_backend("cuda") != "mamba":
        pytest.skip("mamba-ssm's selective_state_update does not import here")
    with torch.no_grad():
        assert_matches_naive(step_over_sequence(ssd_step), bf16_inputs(0.01), max_rel=TOL, name="mamba step")

"""Inputs of tests/ops/test_rms_norm.py, and (run as a script) the driver that executes the Triton RMSNorm /
SiLU-product kernels under Triton's CPU interpreter.

A separate process for the reason decode_attention_cases.py gives: TRITON_INTERPRET must be set before `triton`
is imported, and the test session may have imported it already.

    TRITON_INTERPRET=1 python tests/ops/rms_norm_cases.py OUT.pt

writes {"norm": {id: (out, sum or None)}, "silu": {id: out}, "steps": {runner: [logits of each step]}} or
{"unavailable": reason}.
"""

from __future__ import annotations

import sys

import torch

# (shape of x, row stride padding or 0): the 7B's hidden size at decode (1 row, 3584 of a 4096 block), a batch
# with D off the power of 2, rows of a wider tensor (row stride > D), several leading axes
NORM_CASES = [((1, 1, 3584), 0), ((3, 100), 0), ((4, 96), 7), ((2, 3, 64), 0)]
# x dtype, weight dtype: transformers' promotion (`weight * hidden.to(input_dtype)`) included
NORM_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
               "bf16-fp32w": (torch.bfloat16, torch.float32)}  # fmt: skip
# (shape of gate / up, whether they are the halves of one (rows, 2F) tensor, as a merged gate+up GEMM gives)
SILU_CASES = [((1, 1, 18944), False), ((3, 2500), False), ((2, 1000), True)]
SILU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS = 1e-6
STEPS = 3


def case_id(shape: tuple, extra: object, dtype: str) -> str:
    return f"{'x'.join(map(str, shape))}-{extra}-{dtype}"


def norm_inputs(shape: tuple, pad: int, dtypes: tuple[torch.dtype, torch.dtype], device="cpu", seed=0):
    """x, residual (..., D) (rows of a (rows, D + pad) tensor when `pad`), weight (D,): activations of the
    decode step's scale (|x| up to a few, the weight around 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    xd, wd = dtypes
    d = shape[-1]
    wide = (torch.randn(*shape[:-1], d + pad, generator=gen, device=device) * 2).to(xd)
    x = wide[..., :d]
    residual = (torch.randn(*shape, generator=gen, device=device) * 3).to(xd)
    weight = (1 + 0.1 * torch.randn(d, generator=gen, device=device)).to(wd)
    return x, residual, weight


def silu_inputs(shape: tuple, halves: bool, dtype: torch.dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    if halves:
        both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, device=device) * 4).to(dtype)
        return both[..., : shape[-1]], both[..., shape[-1] :]
    gate = (torch.randn(*shape, generator=gen, device=device) * 4).to(dtype)  # |gate| to ~12: exp's range
    return gate, torch.randn(*shape, generator=gen, device=device).to(dtype)


def tiny_models():
    """The tiny Qwen2-VL teacher (float32, seed 0) and its LinMU conversion."""
    from linmu_cli.config import MateConfig
    from linmu_cli.models import convert_model
    from linmu_cli.tiny import build_tiny_teacher

    teacher, _ = build_tiny_teacher("qwen2_vl", seed=0)
    return teacher, convert_model(teacher, MateConfig(text_window=4))


def runners(teacher, student) -> dict:
    """LinMU's StaticDecoder and the served teacher over random states of seed 0, batch 2."""
    from linmu_cli.fast_decode import StaticDecoder
    from linmu_cli.teacher_decode import ServedTeacherDecoder

    return {"linmu": StaticDecoder.random(student, batch=2, position=20),
            "teacher": ServedTeacherDecoder.random(teacher, batch=2, prompt=20, new_tokens=STEPS)}  # fmt: skip


def runner_steps() -> dict[str, list[torch.Tensor]]:
    """Logits of STEPS steps of each runner with the shared layer's norms / MLP on the Triton kernels
    (interpreted here; the test runs the references), and the paths they recorded."""
    from linmu_cli import decode_layer

    teacher, student = tiny_models()
    out = {}
    with torch.no_grad():
        for name, runner in runners(teacher, student).items():
            out[name] = [runner.step().clone() for _ in range(STEPS)]
            out[f"{name}_paths"] = decode_layer.norm_mlp_paths()
    return out


def main(out_path: str) -> None:
    from decode_attention_cases import interpreter_unavailable

    if interpreter_unavailable(out_path):
        return
    from linmu_cli.ops import rms_norm as ops
    from linmu_cli.ops.rms_norm import triton as tri

    assert tri.INTERPRET, "TRITON_INTERPRET=1 must be set before this script starts"
    norm, silu = {}, {}
    for shape, pad in NORM_CASES:
        for name, dtypes in NORM_DTYPES.items():
            x, residual, weight = norm_inputs(shape, pad, dtypes)
            norm[case_id(shape, pad, name)] = (tri.rms_norm(x, weight, EPS), None)
            norm[case_id(shape, pad, name) + "-add"] = tri.add_rms_norm(x, residual, weight, EPS)
    for shape, halves in SILU_CASES:
        for name, dtype in SILU_DTYPES.items():
            silu[case_id(shape, halves, name)] = tri.silu_mul(*silu_inputs(shape, halves, dtype))
    # the public calls, and the runners with the shared layer on the kernels (auto picks torch on CPU)
    x, residual, weight = norm_inputs((2, 64), 0, NORM_DTYPES["fp32"])
    public = {"rms_norm": ops.rms_norm(x, weight, EPS, backend="triton"),
              "add_rms_norm": ops.add_rms_norm(x, residual, weight, EPS, backend="triton"),
              "silu_mul": ops.silu_mul(x, residual, backend="triton"), "paths": ops.last_backends()}  # fmt: skip
    with ops.use_backend("triton"):
        steps = runner_steps()
    torch.save({"norm": norm, "silu": silu, "public": public, "steps": steps}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])

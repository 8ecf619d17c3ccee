"""Inputs of tests/ops/test_logit_kl.py, and (run as a script) the driver that executes the Triton logit-KL
kernel under Triton's CPU interpreter.

A separate process for the reason decode_attention_cases.py gives: TRITON_INTERPRET must be set before `triton`
is imported, and the test session may have imported it already.

    TRITON_INTERPRET=1 python tests/ops/logit_kl_cases.py OUT.pt

writes {"cases": {id: (loss, grad of the student)}, "no_grad": {id: loss}, "paths": [...]} or
{"unavailable": reason}.
"""

from __future__ import annotations

import sys

import torch

# (leading shape, V): one sample's rows, V off the kernel's block (4096) and below it, a batch of 2, one row
CASES = [((2, 7), 5000), ((3,), 300), ((2, 3), 4096), ((1, 1), 9000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURES = (1.0, 2.0)


def case_id(lead: tuple, vocab: int, dtype: str, temperature: float) -> str:
    return f"{'x'.join(map(str, lead))}x{vocab}-{dtype}-T{temperature:g}"


def kl_inputs(lead: tuple, vocab: int, dtype: torch.dtype, device="cpu", seed=0):
    """student, teacher (*lead, V) logits of a language model's scale (|logit| to ~15, the teacher peaked)
    with the student near it, and per-token weights with a zero (padding) and a fractional (vision) weight."""
    gen = torch.Generator(device=device).manual_seed(seed)
    teacher = torch.randn(*lead, vocab, generator=gen, device=device) * 4
    student = teacher + torch.randn(*lead, vocab, generator=gen, device=device) * 1.5
    weights = torch.rand(*lead, generator=gen, device=device) + 0.5
    flat = weights.view(-1)
    flat[0] = 0.0
    if flat.numel() > 2:
        flat[-1] = 0.25
    return student.to(dtype), teacher.to(dtype), weights


def main(out_path: str) -> None:
    from decode_attention_cases import interpreter_unavailable

    if interpreter_unavailable(out_path):
        return
    import triton as _triton  # noqa: F401  (imported after the probe: TRITON_INTERPRET is read at import)

    from linmu_cli.ops import logit_kl as ops

    cases, no_grad, paths = {}, {}, []
    for lead, vocab in CASES:
        for name, dtype in DTYPES.items():
            for temperature in TEMPERATURES:
                student, teacher, weights = kl_inputs(lead, vocab, dtype)
                student.requires_grad_(True)
                loss = ops.logit_kl(student, teacher, weights, temperature, backend="triton")
                (loss * 0.5).backward()  # an incoming gradient other than 1
                key = case_id(lead, vocab, name, temperature)
                cases[key] = (loss.detach(), student.grad)
                with torch.no_grad():
                    no_grad[key] = ops.logit_kl(student, teacher, weights, temperature, backend="triton")
                paths.append(ops.last_backend())
    torch.save({"cases": cases, "no_grad": no_grad, "paths": paths}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])

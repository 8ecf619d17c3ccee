"""Stage 3's logit distillation loss: KL(teacher || student) at a temperature, weighted per token.

`naive.py` is the one definition of the math (float32 log-softmaxes, autograd's backward); `triton.py` computes
the loss and its gradient in one kernel that streams each row of the (tokens, vocabulary) logits twice, never
materialising a float32 copy (docs/design.md §7). The backend is picked per call (`auto`: Triton on CUDA, the
reference elsewhere: CPU never reaches Triton outside the interpreter tests), forced in a block with
`use_backend`, and recorded: `last_backend()` says which path ran last (distill_throughput's stage records).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from linmu_cli.ops.logit_kl.naive import logit_kl_naive

BACKENDS = ("auto", "torch", "triton")
_LAST: list[str] = []
_FORCED: list[str] = []  # backends of the enclosing `use_backend` blocks, innermost last


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Every call in the block takes `backend` whatever its own argument (an A/B, the interpreter tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown logit-KL backend {backend!r}; choose {', '.join(BACKENDS)}")
    _FORCED.append(backend)
    try:
        yield
    finally:
        _FORCED.pop()


def last_backend() -> str | None:
    """The path the last `logit_kl` call took: "triton" or "torch" (None before any)."""
    return _LAST[-1] if _LAST else None


def logit_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """sum_r w_r KL(softmax(t_r / T) || softmax(s_r / T)) / sum_r w_r * T^2 over the token rows r.

    student, teacher (..., V) logits of any float dtype; weights (...) per token. Only the student gets a
    gradient: a teacher or weights that require one are refused (the kernel computes none for them)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown logit-KL backend {backend!r}; choose {', '.join(BACKENDS)}")
    backend = _FORCED[-1] if _FORCED else backend
    chosen = ("triton" if student.is_cuda else "torch") if backend == "auto" else backend
    _LAST[:] = [chosen]
    if chosen == "torch":
        return logit_kl_naive(student, teacher, weights, temperature)
    if teacher.requires_grad or weights.requires_grad:
        raise ValueError("logit_kl's Triton backend differentiates the student only: detach the teacher logits "
                         "and the weights, or use backend='torch'")  # fmt: skip
    from linmu_cli.ops.logit_kl import triton as impl  # triton is optional on CPU

    return impl.logit_kl(student, teacher, weights, temperature)


__all__ = ["BACKENDS", "last_backend", "logit_kl", "logit_kl_naive", "use_backend"]

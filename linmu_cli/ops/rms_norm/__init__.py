"""The decoder layer's RMSNorms (the residual add fused into them) and its MLP's SiLU gate, for decoding.

Both decode runners (`linmu_cli.fast_decode`, `linmu_cli.teacher_decode`) step the same decoder-layer code
(`linmu_cli.decode_layer`), which calls these. `naive.py` is the one definition of the math (transformers'
Qwen2-VL RMSNorm and MLP activation, casts in their order); `triton.py` runs it in one kernel per op. The
backend is picked per call, on the tensors' device (`auto`: Triton on CUDA, the reference elsewhere: CPU never
reaches Triton outside the interpreter tests), and recorded: `last_backends()` says which path each op took
last, what the bench JSON reports next to its other kernel names; `use_backend` overrides the choice in a
block (an A/B on the references, the interpreter tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from linmu_cli.ops.rms_norm.naive import add_rms_norm_naive, rms_norm_naive, silu_mul_naive

BACKENDS = ("auto", "torch", "triton")
_LAST: dict[str, str] = {}
_FORCED: list[str] = []  # backends of the enclosing `use_backend` blocks, innermost last


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Every call in the block takes `backend` whatever its own argument: how a caller that does not pass one
    (the decode runners, through `linmu_cli.decode_layer`) is measured on the references for an A/B
    (benchmarks/decode_step_profile.py) or run on the interpreted kernels (tests/ops/rms_norm_cases.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown norm / MLP backend {backend!r}; choose {', '.join(BACKENDS)}")
    _FORCED.append(backend)
    try:
        yield
    finally:
        _FORCED.pop()


def last_backends() -> dict[str, str]:
    """{"rms_norm" / "add_rms_norm" / "silu_mul": "triton" or "torch"}: the path each op took last."""
    return dict(_LAST)


def _triton_impl() -> ModuleType:
    """The Triton module, imported on first use (triton is optional on CPU; tests run an interpreted copy)."""
    from linmu_cli.ops.rms_norm import triton as impl

    return impl


def _pick(op: str, x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; choose {', '.join(BACKENDS)}")
    backend = _FORCED[-1] if _FORCED else backend
    chosen = ("triton" if x.is_cuda else "torch") if backend == "auto" else backend
    _LAST[op] = chosen
    return chosen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm(x) * weight over the last axis, as `Qwen2VLRMSNorm` (x (..., D), weight (D,))."""
    if _pick("rms_norm", x, backend) == "triton":
        return _triton_impl().rms_norm(x, weight, eps)
    return rms_norm_naive(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) * weight, residual + x): a decoder layer's residual add and the next norm."""
    if _pick("add_rms_norm", x, backend) == "triton":
        return _triton_impl().add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_naive(x, residual, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up: the activation of `Qwen2MLP` (`act_fn(gate_proj(x)) * up_proj(x)`)."""
    if _pick("silu_mul", gate, backend) == "triton":
        return _triton_impl().silu_mul(gate, up)
    return silu_mul_naive(gate, up)


__all__ = ["BACKENDS", "add_rms_norm", "add_rms_norm_naive", "last_backends", "rms_norm", "rms_norm_naive",
           "silu_mul", "silu_mul_naive", "use_backend"]  # fmt: skip

"""The references: Qwen2-VL's RMSNorm (with the residual add before it) and its MLP activation, as transformers
computes them. The one definition of the math; the Triton kernels (`triton.py`) are tested against these.

transformers' `Qwen2VLRMSNorm.forward` (Qwen2.5-VL's is the same, both copied from Llama's): the variance and the
scaling in float32, the normed activations cast back to the input dtype, then multiplied by the weight in the
promoted dtype (`weight * hidden.to(input_dtype)`: bf16 x bf16 rounds once more). The decoder layer adds the
residual in the activations' dtype (`residual + hidden_states`), and `Qwen2MLP` computes
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with `act_fn = ACT2FN["silu"]` (`nn.functional.silu`): SiLU rounded
to the dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in promote(weight, x): `Qwen2VLRMSNorm.forward` line for line."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def add_rms_norm_naive(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the decoder layer's residual add, then the next RMSNorm."""
    total = residual + x
    return rms_norm_naive(total, weight, eps), total


def silu_mul_naive(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: `Qwen2MLP`'s activation (what its `down_proj` reads)."""
    return F.silu(gate) * up


__all__ = ["add_rms_norm_naive", "rms_norm_naive", "silu_mul_naive"]

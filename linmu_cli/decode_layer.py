"""One decoder layer's decode step, written out once for both decode runners.

The served teacher (`teacher_decode.ServedTeacherDecoder`) and LinMU (`fast_decode.StaticDecoder`) share every
part of a Qwen2-VL decoder layer but its attention: input RMSNorm -> attention -> residual add ->
post-attention RMSNorm -> MLP -> residual add. Written out here (instead of the HF layer's forward) so that both
run the same fused kernels (`linmu_cli.ops.rms_norm`: the residual add joined to the next RMSNorm, SiLU and
the gate product in one) and differ only in the `attend` callable they pass.

The residual stream is carried un-added between layers, as vLLM does: a layer returns its MLP output and the
stream it has not yet been added to, so that the add runs inside the next layer's input norm (or the final norm,
`final_norm`). The math is the HF layer's (tests/test_decode_layer.py: equal to its forward in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import activations

from linmu_cli.ops.rms_norm import add_rms_norm, last_backends, rms_norm, silu_mul

# the MLP activations that are SiLU: ACT2FN["silu"] is transformers' SiLUActivation in 5.x, nn.SiLU before
_SILU = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))
Attend = Callable[[torch.Tensor], torch.Tensor]  # normed hidden (B, 1, D) -> attention output (B, 1, D)


def _norm_args(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """(weight, eps) of a transformers RMSNorm (`Qwen2VLRMSNorm` / `Qwen2_5_VLRMSNorm`)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or getattr(norm, "weight", None) is None:
        raise TypeError(f"the decode step needs an RMSNorm with `weight` and `variance_epsilon`, not "
                        f"{type(norm).__name__}")  # fmt: skip
    return norm.weight, eps


def decode_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`Qwen2MLP.forward` with its activation and product fused: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    if not isinstance(mlp.act_fn, _SILU):
        raise TypeError(f"the decode step fuses the MLP's SiLU; this model's is {type(mlp.act_fn).__name__}")
    return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def decode_layer(
    layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, attend: Attend
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer on the carried stream: `hidden` is the previous layer's MLP output (the embeddings at
    the first layer, `residual` None) and `residual` the stream it adds to. Returns (MLP output, stream)."""
    weight, eps = _norm_args(layer.input_layernorm)
    if residual is None:
        x, residual = rms_norm(hidden, weight, eps), hidden
    else:
        x, residual = add_rms_norm(hidden, residual, weight, eps)
    weight, eps = _norm_args(layer.post_attention_layernorm)
    x, residual = add_rms_norm(attend(x), residual, weight, eps)
    return decode_mlp(layer.mlp, x), residual


def final_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The text model's final RMSNorm over the last layer's output (its residual add fused in)."""
    weight, eps = _norm_args(norm)
    if residual is None:
        return rms_norm(hidden, weight, eps)
    return add_rms_norm(hidden, residual, weight, eps)[0]


def norm_mlp_paths() -> dict[str, str]:
    """Which path the decode step's norms and MLP activation took last ("triton" / "torch"), for the bench."""
    last = last_backends()
    return {op: last.get(op, "not run") for op in ("rms_norm", "add_rms_norm", "silu_mul")}


__all__ = ["Attend", "decode_layer", "decode_mlp", "final_norm", "norm_mlp_paths"]

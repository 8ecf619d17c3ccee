"""Flex-MA's short causal depthwise conv over (B, L, channels): a PyTorch reference and fla's Triton kernel.

y[:, t, c] = bias[c] + sum_j weight[c, 0, j] * x[:, t - (W - 1) + j, c], with the `W - 1` inputs before the
chunk taken from `prev` (the decode cache's conv tail) or zeros. The reference is `F.conv1d` on a transposed
copy (what Flex-MA always ran); on CUDA fla-core's `causal_conv1d` reads the (B, L, C) activations in place,
strided views included, with no transposes (docs/design.md §3, §8). CPU never touches Triton.

One decode token (:func:`conv_step`) is one kernel of linmu's own (ops/ssd/decode.py) that also shifts the cached
tail in place: the reference is `short_conv_reference` + `conv_tail`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_LAST_CONV_BACKEND: str | None = None


def last_conv_backend() -> str | None:
    """ "fla" or "torch": which path the most recent :func:`short_conv` took; "triton" after :func:`conv_step`."""
    return _LAST_CONV_BACKEND


@functools.cache
def _import_fla_conv():
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d


@functools.cache
def conv_kernel_error() -> str | None:
    """None when fla's conv kernel imports (call only with CUDA), else why not."""
    try:
        _import_fla_conv()
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"{type(e).__name__}: {e}"
    return None


def short_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """x (B, L, C); weight (C, 1, W); prev (B, C, W - 1) or None -> (B, L, C)."""
    k = weight.shape[-1]
    seq = x.transpose(1, 2)
    if prev is None:
        prev = seq.new_zeros(*seq.shape[:2], k - 1)
    full = torch.cat([prev.to(seq.dtype), seq], dim=2)
    return F.conv1d(full, weight, bias, groups=weight.shape[0]).transpose(1, 2)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prev: torch.Tensor | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """The conv on fla's kernel when `fast`, on CUDA, with no cached tail and the kernel importable; else the
    reference. `last_conv_backend()` says which ran (a fast request that cannot run is not an error: the
    reference is exact, and the choice is reported)."""
    global _LAST_CONV_BACKEND
    if fast and prev is None and x.is_cuda and conv_kernel_error() is None:
        _LAST_CONV_BACKEND = "fla"
        # weights in the activations' dtype (float32 master weights in training): the kernel was verified
        # against the reference that way on the H200; autograd carries the gradient back through the cast
        w = weight.squeeze(1).to(x.dtype)
        y, _ = _import_fla_conv()(x, w, bias.to(x.dtype) if bias is not None else None, backend="triton")
        return y
    _LAST_CONV_BACKEND = "torch"
    return short_conv_reference(x, weight, bias, prev)


def conv_tail(x: torch.Tensor, prev: torch.Tensor | None, width: int) -> torch.Tensor:
    """The last `width - 1` conv inputs (B, C, width - 1) after this chunk: the decode cache's conv state."""
    seq = x.transpose(1, 2)
    if prev is None:
        prev = seq.new_zeros(*seq.shape[:2], width - 1)
    full = torch.cat([prev.to(seq.dtype), seq[:, :, -(width - 1) :]], dim=2)
    return full[:, :, full.shape[2] - (width - 1) :]


def conv_step(
    x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor
) -> torch.Tensor:
    """The conv on one decode token in one Triton kernel (CUDA, or Triton's interpreter), the tail updated in place.

    x (B, C) the new input (unit channel stride; a strided slice of the block's GEMV output is fine), zeroed where
    `valid` (B,) is False as the reference masks padding; tail (B, C, W - 1) the cached inputs (the cache's conv
    buffer), afterwards the last W - 1 inputs; weight (C, 1, W); bias (C,) or None. Returns (B, C) in x's dtype.
    """
    global _LAST_CONV_BACKEND
    from linmu_cli.ops.ssd import decode

    _LAST_CONV_BACKEND = "triton"
    return decode.conv_step(x, tail, weight, bias, valid)


__all__ = ["conv_step", "conv_tail", "last_conv_backend", "short_conv", "short_conv_reference"]

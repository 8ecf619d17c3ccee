"""q_len=1 decode attention over a static KV cache with GQA (the served teacher's, issue #12).

`naive.py` is the dense float32 reference; `triton.py` the split-KV kernel (each kv head's K/V read once for
its whole query group, the sequence split so the GPU is full at batch 1, partial results merged by a second
kernel). `decode_attention` dispatches; `linmu_cli.teacher_decode` registers the Triton kernel as
`triton_split_kv` among the kernels it times. `triton.masked_split_kv_decode` (reference
`masked_decode_attention_naive`) attends a validity mask instead of a prefix: Local-Swin's decode over its ring
(`linmu_cli.ops.window_attention.decode_attention`).
"""

from __future__ import annotations

from types import ModuleType

import torch

from linmu_cli.ops.decode_attention.naive import (
    decode_attention_naive,
    masked_decode_attention_naive,
    valid_lengths,
)

BACKENDS = ("auto", "naive", "triton")


def _triton_impl() -> ModuleType:
    """The Triton module, imported on first use (triton is optional on CPU; tests swap in an interpreted copy)."""
    from linmu_cli.ops.decode_attention import triton as impl

    return impl


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_len: torch.Tensor | int,
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over the first `valid_len` slots of a static cache.

    Args:
        q: (B, Hq, 1, d); k, v: (B, Hkv, capacity, d), Hq a multiple of Hkv (query head i reads kv head
            i // (Hq / Hkv)).
        valid_len: (B,) or (1,) long tensor on q's device (CUDA-graph safe: read on the device), or an int;
            at least 1. teacher_decode's `length` (the current token's slot) is valid_len - 1.
        backend: "triton" (split-KV kernel; CUDA, or CPU under TRITON_INTERPRET=1), "naive" (dense float32
            reference), "auto" (triton on CUDA, naive elsewhere).
        scale: softmax scale, head_dim ** -0.5 by default.

    Returns:
        (B, Hq, 1, d) in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode attention backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "naive"
    if backend == "naive":
        return decode_attention_naive(q, k, v, valid_len, scale)
    b, hq, one, d = q.shape
    if one != 1 or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} must be (B, Hq, 1, d) with Hq a multiple of Hkv = {k.shape[1]}")
    lengths = valid_lengths(valid_len, 1, q.device) if not isinstance(valid_len, torch.Tensor) else valid_len
    qg = q.reshape(b, k.shape[1], hq // k.shape[1], d)
    return _triton_impl().split_kv_decode(qg, k, v, lengths, scale=scale).reshape(b, hq, 1, d)


__all__ = [
    "BACKENDS",
    "decode_attention",
    "decode_attention_naive",
    "masked_decode_attention_naive",
    "valid_lengths",
]

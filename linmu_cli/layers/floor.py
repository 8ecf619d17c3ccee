"""Benchmark-only: run an M-MATE model with its sequence mixers skipped (the "floor" of `linmu bench`).

The layers know nothing of it. Inside `skip_mixers()` the op entry points they call are replaced by stand-ins
that return their input: Flex-MA's SSD scan and decode step (its output is then its input x, repeated to every
head) and Local-Swin's sliding-window, 3D-window and decode attentions (its output is then the rotated queries).
The token layout hands out no scan-order gathers, backward gathers, text blocks or window plans, which exist only
for those mixers. Everything else runs as usual: every projection, the conv, step sizes, gate and per-head norm,
RoPE and the KV ring, the fusion, the vision tower, norms and MLPs. The outputs are meaningless; the time is the
least any implementation of the two mixers could add to.

The patch is process-wide while the block runs (a benchmark runs one model at a time); nesting is fine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from linmu_cli.layers import flex_ma, local_swin
from linmu_cli.layers.layout import TokenLayout
from linmu_cli.ops.ssd import expand_heads

_DEPTH = 0


def _scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
          *args: Any, initial_state: torch.Tensor | None = None, return_final_state: bool = False,
          **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`ssd_scan_gqa`'s stand-in: y = x at every head; the state passes through unchanged (zeros if none)."""
    y = expand_heads(x, C.shape[2])
    if not return_final_state:
        return y
    b, _, h, n = C.shape
    state = (
        initial_state if initial_state is not None else x.new_zeros(b, h, x.shape[-1], n, dtype=torch.float32)
    )
    return y, state


def _step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
          state: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`ssd_step`'s stand-in: y = x, the state untouched."""
    return x, state


def _queries(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The attentions' stand-in: the output is the queries (same shape as the attention's output)."""
    return q


def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    return out if out is not None else torch.zeros_like(q)


def _none(*args: Any, **kwargs: Any) -> None:
    return None


def _stand_ins() -> list[tuple[object, str, Any]]:
    return [
        (flex_ma, "ssd_scan", _scan),
        (flex_ma, "ssd_step", _step),
        (local_swin, "sliding_window_attention", _queries),
        (local_swin, "decode_attention", _queries),
        (local_swin, "window_attention", _window_attention),
        (TokenLayout, "scan_gather", _none),
        (TokenLayout, "backward_gather", _none),
        (TokenLayout, "text_blocks", _none),
        (TokenLayout, "window_plan", _none),
    ]


@contextmanager
def skip_mixers(enabled: bool = True) -> Iterator[None]:
    """Inside the block M-MATE layers run without their scans and window attention (`enabled=False`: as usual)."""
    global _DEPTH
    if not enabled:
        yield
        return
    patches = _stand_ins()
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, stand_in in patches:
        setattr(owner, name, stand_in)
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def mixers_skipped() -> bool:
    """Whether a `skip_mixers()` block is active."""
    return _DEPTH > 0


__all__ = ["mixers_skipped", "skip_mixers"]

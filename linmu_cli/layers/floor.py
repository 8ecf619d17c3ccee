"""Benchmark-only switch: run an M-MATE model with its sequence mixers skipped (the "floor" of `linmu bench`).

Inside `mixers_skipped()` Flex-MA computes its projections, conv, step sizes, gate and per-head norm but not its
scans (no scan-order gathers, no forward or backward SSD: the scan output is replaced by its input x), and
Local-Swin computes its projections, RoPE and KV ring but no attention (its output is replaced by the rotated
queries). The vision tower, the fusion, both output projections, norms and MLPs run as usual. The outputs are
meaningless; the time is the least any implementation of the two mixers could add to.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_SKIP = contextvars.ContextVar("linmu_skip_mixers", default=False)


@contextmanager
def skip_mixers(enabled: bool = True) -> Iterator[None]:
    token = _SKIP.set(bool(enabled))
    try:
        yield
    finally:
        _SKIP.reset(token)


def mixers_skipped() -> bool:
    return _SKIP.get()


__all__ = ["mixers_skipped", "skip_mixers"]

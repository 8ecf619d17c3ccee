"""Mamba2 SSD (state-space duality) scan with a scalar decay per head: the public ops and their dispatch.

Shapes (``b`` batch, ``l`` length, ``h`` heads, ``p`` head dim of the values, ``n`` state size):
x (b, l, h, p) values; dt (b, l, h) step sizes, already positive (the caller applies softplus); A (h,)
negative decay rates; B (b, l, h, n) "keys"; C (b, l, h, n) "queries"; state S (b, h, p, n). Recurrence
(docs/design.md §3)::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t                                   # (b, l, h, p)

``reset`` (b, l) bool: where ``reset[b, t]`` is True the state is zeroed before step ``t``
(``S_{t-1} := 0``), i.e. a new sequence starts at ``t``. ``initial_state`` (b, h, p, n) is the
state before step 0 (it is dropped if ``reset[:, 0]`` is True). The final state is ``S_{l-1}``
in float32. A token with ``dt == 0`` and ``x == 0`` (padding) leaves the state unchanged.

One file per path, as fla's ``ops/``:

* ``naive.py``  :func:`ssd_naive` (token by token) and :func:`ssd_step_naive` (one token), float32: the ground truth.
* ``chunk.py``  :func:`ssd_chunked`, chunked SSD in pure PyTorch (CPU or GPU, differentiable).
* ``fla.py``    :func:`ssd_fla`, CUDA only: fla-core's ``chunk_simple_gla`` (Triton).
* ``mamba.py``  :func:`ssd_mamba`, CUDA only: mamba_ssm's ``mamba_chunk_scan_combined`` (Triton).
* ``step.py``   :func:`ssd_step`, the decode step (mamba's ``selective_state_update`` or in-place PyTorch), and
  :func:`flex_decode_step`, Flex-MA's whole fused decode step (``decode.py``: Triton, imported on first use).
* ``backends.py`` which backends run here and which one a scan gets; ``utils.py`` shapes, reset plans.

:func:`ssd_scan` and :func:`ssd_scan_gqa` (Flex-MA's entry) dispatch by :func:`select_ssd_backend` and never
silently fall back; :func:`last_ssd_backend` tells which backend ran last.
"""

from __future__ import annotations

import torch

from linmu_cli.ops.ssd.backends import (
    SSD_BACKENDS,
    available_ssd_backends,
    select_ssd_backend,
)
from linmu_cli.ops.ssd.backends import _backend_import_error as _backend_import_error  # the bench reads it
from linmu_cli.ops.ssd.chunk import ssd_chunked
from linmu_cli.ops.ssd.fla import fla_backward_supported, fla_scan_gqa, ssd_fla
from linmu_cli.ops.ssd.mamba import mamba_scan_gqa, ssd_mamba
from linmu_cli.ops.ssd.naive import flex_step_naive, ssd_naive, ssd_step_naive
from linmu_cli.ops.ssd.step import flex_decode_step, last_ssd_step_backend, ssd_step, step_backend
from linmu_cli.ops.ssd.utils import (
    DEFAULT_CHUNK,
    ResetPlan,
    SSDBackendError,
    expand_heads,
    require_cuda,
    reset_plan,
)

__all__ = [
    "SSD_BACKENDS",
    "SSDBackendError",
    "available_ssd_backends",
    "fla_backward_supported",
    "flex_decode_step",
    "flex_step_naive",
    "last_ssd_backend",
    "last_ssd_step_backend",
    "select_ssd_backend",
    "ssd_chunked",
    "ssd_fla",
    "ssd_mamba",
    "ssd_naive",
    "ResetPlan",
    "reset_plan",
    "ssd_scan",
    "ssd_scan_gqa",
    "ssd_step",
    "ssd_step_naive",
    "step_backend",
]

_LAST_BACKEND: str | None = None


def last_ssd_backend() -> str | None:
    """Name of the backend that ran the most recent :func:`ssd_scan` / :func:`ssd_scan_gqa` (None before any)."""
    return _LAST_BACKEND


def _needs_backward(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan on the backend :func:`select_ssd_backend` picks (no silent fallback).

    A backward is considered needed when grad mode is on and any input requires grad (fla's is refused on
    Hopper with Triton < 3.7.1, docs/design.md §8).

    Args:
        x, dt, A, B, C: the scan's inputs (shapes in the module docstring).
        reset: (b, l) bool or None: the state restarts at each True position.
        initial_state: (b, h, p, n) or None (zeros).
        chunk_size: None -> the backend's default (torch 64, fla 64, mamba 256).
        return_final_state: also return the state after the last token.
        backend: "auto", "torch", "fla" or "mamba"; a named backend that cannot run raises SSDBackendError.

    Returns:
        y (b, l, h, p) in ``x.dtype``, or (y, final state (b, h, p, n) float32).
    """
    global _LAST_BACKEND
    need = _needs_backward(x, dt, A, B, C, initial_state)
    name = select_ssd_backend(x.device, backend, need_backward=need, key_dim=C.shape[-1])
    fn = {"torch": ssd_chunked, "fla": ssd_fla, "mamba": ssd_mamba}[name]
    cs = chunk_size if chunk_size is not None else DEFAULT_CHUNK[name]
    _LAST_BACKEND = name
    return fn(
        x,
        dt,
        A,
        B,
        C,
        reset=reset,
        initial_state=initial_state,
        chunk_size=cs,
        return_final_state=return_final_state,
    )


def ssd_scan_gqa(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float = 1.0,
    plan: ResetPlan | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan with grouped values / keys and the query scale folded in (Flex-MA's entry).

    y = ssd(x repeated, dt, A, B repeated, C * scale). The repetition happens once, at the kernel's input,
    fused with work the kernel needs anyway (fla: k = B * dt, and its own ``scale``; mamba: x * scale), so
    everything before the scan (gathers, conv) stays at key/value width. The torch backend is the reference:
    repeat, scale C, :func:`ssd_chunked`.

    Args:
        x: (b, l, g, p) values at key/value-head width (g divides h).
        dt: (b, l, h) positive step sizes; A: (h,) negative decay rates.
        B: (b, l, g, n) keys at key/value-head width; C: (b, l, h, n) queries.
        scale: multiplies C (the attention's d^-1/2, docs/design.md §3).
        plan: host-built resets (:func:`reset_plan`), so no kernel reads them back; None: no resets.
        initial_state, chunk_size, return_final_state, backend: as in :func:`ssd_scan`.

    Returns:
        y (b, l, h, p) in ``x.dtype``, or (y, final state (b, h, p, n) float32).
    """
    global _LAST_BACKEND
    b, T, h, n = C.shape
    need = _needs_backward(x, dt, A, B, C, initial_state)
    name = select_ssd_backend(x.device, backend, need_backward=need, key_dim=n)
    cs = chunk_size if chunk_size is not None else DEFAULT_CHUNK[name]
    _LAST_BACKEND = name
    reset = plan.reset if plan is not None else None
    if name == "torch":
        return ssd_chunked(
            expand_heads(x, h), dt, A, expand_heads(B, h), C * scale, reset=reset, initial_state=initial_state,
            chunk_size=cs, return_final_state=return_final_state,
        )  # fmt: skip
    require_cuda(name, x, dt, A, B, C, initial_state)
    kernel = fla_scan_gqa if name == "fla" else mamba_scan_gqa
    return kernel(x, dt, A, B, C, scale, plan, initial_state, cs, return_final_state)

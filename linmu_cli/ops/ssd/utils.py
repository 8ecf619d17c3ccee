"""What every SSD path shares: the shape contract, the error type, host-built reset plans, GQA head repeat.

Shapes (``b`` batch, ``l`` length, ``h`` heads, ``p`` value head dim, ``n`` state size) are those of
docs/design.md §3: x (b, l, h, p), dt (b, l, h), A (h,), B / C (b, l, h, n), state (b, h, p, n).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from linmu_cli.errors import LinmuError

DEFAULT_CHUNK = {"torch": 64, "fla": 64, "mamba": 256}


class SSDBackendError(LinmuError, RuntimeError):
    """A requested SSD backend cannot run here (wrong device, missing package, unsupported op)."""


def check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape breaks the contract above."""
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, T, h, p = x.shape
    if tuple(dt.shape) != (b, T, h):
        raise ValueError(f"dt must be {(b, T, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must be {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:3]) != (b, T, h):
        raise ValueError(f"B must be (b, l, h, n) = {(b, T, h)} + (n,), got {tuple(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    n = B.shape[-1]
    if reset is not None and tuple(reset.shape) != (b, T):
        raise ValueError(f"reset must be {(b, T)}, got {tuple(reset.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")


def require_cuda(name: str, *tensors: torch.Tensor | None) -> None:
    """Triton kernels run only on CUDA (docs/design.md §8): refuse CPU tensors before any kernel sees them."""
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise SSDBackendError(
                f"SSD backend {name!r} needs CUDA tensors, got a tensor on {t.device}; "
                "use backend='torch' (ssd_chunked) on CPU"
            )


def expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, l, g, d) -> (b, l, heads, d), each group repeated heads // g times (= repeat_interleave)."""
    b, T, g, d = t.shape
    if g == heads:
        return t
    return t.unsqueeze(3).expand(b, T, g, heads // g, d).reshape(b, T, heads, d)


def split_segments(
    reset_cpu: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten (b, l) rows and split them at row starts and reset positions.

    Returns (cu_seqlens (N+1,) int64, starts (N,), rows (N,): the row of each piece, first_of_row (N,) bool:
    the piece starts a row without a reset at t=0 (gets the initial state), last_idx (b,): piece ending each row).
    """
    b = reset_cpu.shape[0]
    is_start = reset_cpu.clone()
    is_start[:, 0] = True
    starts = is_start.reshape(-1).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([b * T], dtype=starts.dtype)])
    rows = starts // T
    first_of_row = (starts % T == 0) & ~reset_cpu[rows, 0]
    ends = cu[1:]
    last_idx = (ends % T == 0).nonzero().flatten()
    return cu, starts, rows, first_of_row, last_idx


@dataclass(frozen=True)
class ResetPlan:
    """Resets of a (b, l) scan prepared on the host once (per layout), so no scan reads them back.

    fla splits flattened rows with ``cu_seqlens`` (it needs a host copy too), mamba takes ``seq_idx``;
    building both from a host tensor once per forward keeps every layer free of host syncs
    (docs/design.md §6: a prefill layer must be capturable in a CUDA graph).
    """

    reset: torch.Tensor  # (b, l) bool, on the device
    seq_idx: torch.Tensor  # (b, l) int32, on the device: cumsum of reset per row
    cu_seqlens: torch.Tensor  # (N + 1,) int64, on the device
    cu_seqlens_cpu: torch.Tensor  # the same on the host
    rows: torch.Tensor  # (N,) row of each piece, on the device
    first_of_row: torch.Tensor  # (N,) bool, on the device
    last_idx: torch.Tensor  # (b,) piece that ends each row, on the device


def reset_plan(
    reset_cpu: torch.Tensor, put: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> ResetPlan:
    """A :class:`ResetPlan` from a host (b, l) bool tensor; ``put`` moves a host tensor to the device."""
    put = put or (lambda t: t)
    reset_cpu = reset_cpu.to("cpu", torch.bool)
    cu, _starts, rows, first_of_row, last_idx = split_segments(reset_cpu, reset_cpu.shape[1])
    seq_idx = torch.cumsum(reset_cpu.to(torch.int32), dim=1, dtype=torch.int32)
    return ResetPlan(put(reset_cpu), put(seq_idx), put(cu), cu, put(rows), put(first_of_row), put(last_idx))

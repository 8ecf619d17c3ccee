"""Row gathers whose backward is a gather or a copy, not `index_select`'s backward.

`index_select`'s backward is a zero fill plus an atomic `index_add_` (`indexFuncLargeIndex` on CUDA): its 14
calls took 19.3 ms of a 132.9 ms M-MATE layer forward + backward at 65k tokens on an H200, where the
forward gathers cost ~1.3 ms (benchmarks/results/2026-12-02/layer_fwd_bwd.json). When the index is a
permutation, or each source row is read by at most one slot whose gradient matters, the host-built index
maps give the backward as a plain gather or copy: no atomics, deterministic. The forwards are the
`index_select` calls they replace, bit for bit. The backwards are written with differentiable ops, so double
backward works too.
"""

from __future__ import annotations

import torch


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        index, inverse = ctx.saved_tensors
        return _PermuteRows.apply(grad, inverse, index), None, None


class _GatherSlots(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(src, dst)
        ctx.rows = x.shape[0]
        return x.index_select(0, index.reshape(-1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        src, dst = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        return out.index_copy_(0, dst, grad.index_select(0, src)), None, None, None


class _SelectSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, att: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(src)
        ctx.rows = att.shape[0]
        return att.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (src,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, src, grad), None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x.index_select(0, index)` for a permutation `index` of x's rows, `inverse` its inverse permutation.

    The backward is `grad.index_select(0, inverse)`: the transpose of a permutation is its inverse.
    """
    return _PermuteRows.apply(x, index, inverse)


def gather_slots(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """`x.index_select(0, index.reshape(-1))`: rows of x into padded slots, padding slots repeating some row.

    `src` are the valid (flat) slots and `dst` the row of x each reads; each row appears at most once in
    `dst`. The backward copies the valid slots' gradient to their rows and ignores the padding slots, so it is
    exact only when the gradient at every slot outside `src` is zero. In window attention it is: padded query
    slots are never read back, and padded key / value slots are masked out of every other query.
    """
    return _GatherSlots.apply(x, index, src, dst)


def select_slots(att: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`att.index_select(0, src)` for unique `src`; the backward copies the gradient into zeros at `src`."""
    return _SelectSlots.apply(att, src)


__all__ = ["gather_slots", "permute_rows", "select_slots"]

"""Several linear maps of one input as one GEMM (a prefill reads u once): weights concatenated at call time.

The parameters stay the modules' own (checkpoint names unchanged); autograd gives each its slice of the
gradient through the concatenation, so training is unaffected. The concatenation is a copy of the weights per
call (about 92 MB per layer at the 7B shape, tens of microseconds on an H200): worth it for a prefill, not for
one decode token. A decode step may instead read a `PackedLinear`: the same concatenation made once and kept
(inference only, at the cost of a second copy of those weights), refreshed when a source parameter changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Part = tuple[torch.Tensor, torch.Tensor | None]
ALIGN = 64  # output columns: an odd width (12,857 at the 7B shape) sends cuBLAS to slow unaligned kernels


def group_part(modules: Sequence[nn.Linear]) -> Part:
    """(weight, bias) of linear maps whose outputs form one slice (Flex-MA's [x, B, C]): concatenated when there
    are several (a copy, differentiable), the module's own tensors when there is one."""
    if len(modules) == 1:
        return modules[0].weight, modules[0].bias
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else m.weight.new_zeros(m.out_features)
                          for m, b in zip(modules, biases, strict=True)])  # fmt: skip
    return torch.cat([m.weight for m in modules]), bias


def fused_linear(u: torch.Tensor, parts: list[Part]) -> list[torch.Tensor]:
    """[u @ w.T + b for (w, b) in parts] from one matmul; the results are views into one (…, sum N) output."""
    weights = [w for w, _ in parts]
    widths = [w.shape[0] for w in weights]
    # pad the output width to a multiple of ALIGN (measured 129 TFLOP/s unaligned against 775 aligned on an H200)
    pad = -sum(widths) % ALIGN
    if pad:
        weights.append(weights[0].new_zeros(pad, weights[0].shape[1]))
    bias = None
    if any(b is not None for _, b in parts):
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]
        bias = torch.cat(biases + ([biases[0].new_zeros(pad)] if pad else []))
    z = F.linear(u, torch.cat(weights), bias)
    return list(torch.split(z, widths + ([pad] if pad else []), dim=-1))[: len(parts)]


class PackedLinear:
    """`fused_linear`'s concatenated weight and bias over groups of modules, built once and kept: one GEMV per
    decode step with no copy of the weights. Inference only: it is a detached copy (never trained, no autograd).

    Cost: a second copy of the packed weights (`nbytes`). Freshness: `refresh` compares each source parameter of
    the modules it was built from (the parameter object, its address, version counter, dtype, device) with the
    last copy's and re-copies, in place when the shapes allow (a captured CUDA graph keeps its address). Not seen:
    writes through `.data` (no version bump: `refresh(force=True)`) and modules replaced in their parent (build a
    new pack). Copies and pickles of the owner drop it.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Linear]]) -> None:
        self.groups = [list(g) for g in groups]
        self.widths = [sum(m.out_features for m in g) for g in self.groups]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._key: list | None = None
        self.refresh()

    def _signature(self) -> list:
        # `_parameters` is the dict nn.Module.__getattr__ reads: a tenth of its cost, and this runs every step
        return [
            None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device)
            for g in self.groups
            for m in g
            for t in (m._parameters["weight"], m._parameters["bias"])
        ]

    @torch.no_grad()
    def refresh(self, force: bool = False) -> bool:
        """Re-copy the sources if any changed since the last copy (or `force`); True when it copied."""
        key = self._signature()
        if key == self._key and not force:
            return False
        mods = [m for g in self.groups for m in g]
        ref = mods[0].weight
        rows = sum(self.widths) + (-sum(self.widths) % ALIGN)
        if self.weight is None or (self.weight.shape[1], self.weight.dtype, self.weight.device) != (
            ref.shape[1], ref.dtype, ref.device,
        ):  # fmt: skip
            self.weight = ref.new_zeros(rows, ref.shape[1])
            self.bias = ref.new_zeros(rows) if any(m.bias is not None for m in mods) else None
        start = 0
        for m in mods:
            self.weight[start : start + m.out_features].copy_(m.weight)
            if self.bias is not None and m.bias is not None:
                self.bias[start : start + m.out_features].copy_(m.bias)
            elif self.bias is not None:
                self.bias[start : start + m.out_features].zero_()
            start += m.out_features
        self._key = key
        return True

    def built_from(self, groups: Sequence[Sequence[nn.Linear]]) -> bool:
        """Whether `groups` are the very modules this pack copies."""
        return [[id(m) for m in g] for g in groups] == [[id(m) for m in g] for g in self.groups]

    def __call__(self, u: torch.Tensor) -> list[torch.Tensor]:
        """One output slice per group (views into one GEMM output, as `fused_linear` returns them)."""
        z = F.linear(u, self.weight, self.bias)
        pad = z.shape[-1] - sum(self.widths)
        return list(torch.split(z, self.widths + ([pad] if pad else []), dim=-1))[: len(self.widths)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def __reduce__(self) -> tuple:
        """A copy (deepcopy, pickle) of the owner drops the pack: it belongs to these very weights."""
        return _no_pack, ()


def _no_pack() -> None:
    return None


__all__ = ["ALIGN", "PackedLinear", "fused_linear", "group_part"]

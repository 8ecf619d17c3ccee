"""Several linear maps of one input as one GEMM (issue 11): weights concatenated at call time.

The parameters stay the modules' own (checkpoint names unchanged); autograd gives each its slice of the
gradient through the concatenation, so training is unaffected. The concatenation is a copy of the weights per
call (about 60 MB per layer at the 7B shape, ~30 us on an H200): worth it for a prefill, not for one decode
token, which is why callers use it only for chunks longer than one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_linear(
    u: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor | None]]
) -> list[torch.Tensor]:
    """[u @ w.T + b for (w, b) in parts] from one matmul; the results are views into one (…, sum N) output."""
    weights = [w for w, _ in parts]
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    z = F.linear(u, torch.cat(weights), bias)
    return list(torch.split(z, [w.shape[0] for w in weights], dim=-1))


__all__ = ["fused_linear"]

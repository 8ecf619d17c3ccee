"""Several linear maps of one input as one GEMM (a prefill reads u once): weights concatenated at call time.

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
    widths = [w.shape[0] for w in weights]
    # pad the output width to a multiple of 64: an odd leading dimension (12,857 columns at the 7B shape) sends
    # cuBLAS to slow unaligned kernels (measured 129 TFLOP/s against 775 aligned on an H200)
    pad = -sum(widths) % 64
    if pad:
        weights.append(weights[0].new_zeros(pad, weights[0].shape[1]))
    bias = None
    if any(b is not None for _, b in parts):
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]
        bias = torch.cat(biases + ([biases[0].new_zeros(pad)] if pad else []))
    z = F.linear(u, torch.cat(weights), bias)
    return list(torch.split(z, widths + ([pad] if pad else []), dim=-1))[: len(parts)]


__all__ = ["fused_linear"]

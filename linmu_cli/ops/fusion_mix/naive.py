"""The M-MATE fusion mix (docs/design.md §5) before the output projections: the one definition the Triton kernel
is tested against. a = sigmoid(logit) per token (or per token and head); the two W_o inputs a * flex and
(1 - a) * swin, or with one shared W_o their sum. float32 math, each output rounded once to the branches' dtype.
"""

from __future__ import annotations

import torch


def fusion_mix_naive(
    flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor, one_output: bool = False
) -> tuple[torch.Tensor, ...]:
    """flex, swin (b, l, H, d); logit (b, l, 1 or H) -> (a flex, (1 - a) swin), or (a flex + (1 - a) swin,) with
    `one_output`; each (b, l, H, d) in flex's dtype."""
    a = torch.sigmoid(logit.float())[..., None]
    f, s = a * flex.float(), (1 - a) * swin.float()
    if one_output:
        return ((f + s).to(flex.dtype),)
    return f.to(flex.dtype), s.to(flex.dtype)


__all__ = ["fusion_mix_naive"]

"""The fusion mix of an M-MATE block (docs/design.md §5): `naive.py` is the definition, `triton.py` one launch for
both W_o inputs (or their sum) with a one-launch backward. `fusion_mix` chooses; CPU never touches Triton."""

from __future__ import annotations

import torch

from linmu_cli.ops.fusion_mix.naive import fusion_mix_naive

_LAST_BACKEND: str | None = None


def last_fusion_mix_backend() -> str | None:
    """ "triton" or "torch": which path the most recent :func:`fusion_mix` took."""
    return _LAST_BACKEND


def fusion_mix(
    flex: torch.Tensor, swin: torch.Tensor, logit: torch.Tensor, one_output: bool = False, fast: bool = True
) -> tuple[torch.Tensor, ...]:
    """As :func:`fusion_mix_naive`; the Triton kernel when `fast` on CUDA (contiguous outputs)."""
    global _LAST_BACKEND
    _LAST_BACKEND = "triton" if fast and flex.is_cuda else "torch"
    if _LAST_BACKEND == "torch":
        return fusion_mix_naive(flex, swin, logit, one_output)
    from linmu_cli.ops.fusion_mix import triton as impl

    return impl.fusion_mix_triton(flex, swin, logit, one_output)


__all__ = ["fusion_mix", "fusion_mix_naive", "last_fusion_mix_backend"]

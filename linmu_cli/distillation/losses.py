"""Distillation losses: relative hidden-state regression and token-level logit KL, over valid tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmu_cli.ops.logit_kl import logit_kl  # noqa: F401  (the logit KL: one op with its kernel, loss.kl_backend)


def token_weights(valid: torch.Tensor, is_vision: torch.Tensor, vision_weight: float) -> torch.Tensor:
    """(B, L) float: 0 on padding, `vision_weight` on vision tokens, 1 on text."""
    w = torch.where(
        is_vision,
        torch.full_like(valid, vision_weight, dtype=torch.float32),
        torch.ones_like(valid, dtype=torch.float32),
    )
    return w * valid.float()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t ||s_t - t_t||^2 / sum_t w_t ||t_t||^2: scale-free, so layers of any norm weigh the same."""
    err = (student.float() - teacher.float()).pow(2).sum(-1)
    ref = teacher.float().pow(2).sum(-1)
    return (err * weights).sum() / (ref * weights).sum().clamp_min(1e-12)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting each next text token."""
    target_ok = text_mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (ce * target_ok).sum() / target_ok.sum().clamp_min(1)

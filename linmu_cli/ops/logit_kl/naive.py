"""The reference: stage 3's logit KL as plain PyTorch (float32 log-softmaxes, autograd's backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kl_naive(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Weighted mean over tokens of KL(teacher || student) at `temperature`, times T^2 (Hinton).

    student, teacher (..., V) logits; weights (...) per token (0 drops a token)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * weights).sum() / weights.sum().clamp_min(1e-12) * temperature**2

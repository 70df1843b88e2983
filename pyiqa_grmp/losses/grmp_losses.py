"""The two losses of GRMP-IQA fine-tuning: quality BCE with soft targets, and scene-distribution consistency."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GRMPQualityLoss(nn.Module):
    """Binary cross-entropy between P("high quality") and the min-max normalised MOS in [0, 1].

    Computed from log-probabilities clamped away from 0 and 1, so it stays finite at the ends.
    """

    def __init__(self, loss_weight: float = 1.0, eps: float = 1e-7) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.eps = eps

    def forward(self, prob_high: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob_high = prob_high.reshape(-1).float()
        target = target.reshape(-1).to(prob_high)
        if prob_high.shape != target.shape:
            raise ValueError(f'{prob_high.numel()} predictions for {target.numel()} targets')
        if ((target < 0) | (target > 1)).any():
            raise ValueError('GRMPQualityLoss targets must be normalised to [0, 1]')
        p = prob_high.clamp(self.eps, 1 - self.eps)
        loss = -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).mean()
        return self.loss_weight * loss


class GRMPSceneLoss(nn.Module):
    """Cross-entropy of the student's scene distribution against the frozen teacher's, at temperature T.

    ``mean_b( -sum_c softmax(t/T)_c * log_softmax(s/T)_c ) * T^2``; it has the gradient of KL(teacher || student).
    """

    def __init__(self, temperature: float = 1.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.temperature = temperature
        self.loss_weight = loss_weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f'student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}')
        t = self.temperature
        teacher = F.softmax(teacher_logits.detach().float() / t, dim=-1)
        log_student = F.log_softmax(student_logits.float() / t, dim=-1)
        return self.loss_weight * -(teacher * log_student).sum(dim=-1).mean() * t * t

"""GRMPQualityLoss and GRMPSceneLoss against hand-computed values."""
import math

import pytest
import torch

from pyiqa_grmp.losses.grmp_losses import GRMPQualityLoss, GRMPSceneLoss


def test_quality_loss_is_soft_label_binary_cross_entropy():
    p, y = torch.tensor([[0.8], [0.3]]), torch.tensor([[1.0], [0.25]])
    expected = -(math.log(0.8) + 0.25 * math.log(0.3) + 0.75 * math.log(0.7)) / 2
    assert GRMPQualityLoss()(p, y).item() == pytest.approx(expected, rel=1e-6)


def test_quality_loss_is_finite_at_zero_and_one():
    p = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = GRMPQualityLoss()(p, torch.tensor([1.0, 0.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()


def test_quality_loss_is_smallest_at_the_target():
    target = torch.tensor([0.3])
    losses = [GRMPQualityLoss()(torch.tensor([q]), target).item() for q in (0.1, 0.3, 0.5)]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_quality_loss_rejects_unnormalised_targets():
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        GRMPQualityLoss()(torch.tensor([0.5]), torch.tensor([3.0]))


def test_quality_loss_weight_scales():
    p, y = torch.tensor([0.6]), torch.tensor([0.2])
    assert GRMPQualityLoss(loss_weight=2.0)(p, y).item() == pytest.approx(2 * GRMPQualityLoss()(p, y).item())


def test_scene_loss_is_cross_entropy_to_teacher_distribution():
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    p_teacher = torch.softmax(teacher, -1)
    expected = -(p_teacher * torch.log_softmax(student, -1)).sum().item()
    assert GRMPSceneLoss()(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_scene_loss_temperature_scales_by_t_squared():
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    t = 2.0
    p_teacher = torch.softmax(teacher / t, -1)
    expected = -(p_teacher * torch.log_softmax(student / t, -1)).sum().item() * t * t
    assert GRMPSceneLoss(temperature=t)(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_scene_loss_gradient_equals_kl_gradient_and_skips_teacher():
    student = torch.randn(4, 9, requires_grad=True)
    teacher = torch.randn(4, 9, requires_grad=True)
    GRMPSceneLoss()(student, teacher).backward()
    kl_student = student.detach().clone().requires_grad_(True)
    torch.nn.functional.kl_div(torch.log_softmax(kl_student, -1), torch.softmax(teacher.detach(), -1),
                               reduction='batchmean').backward()
    assert torch.allclose(student.grad, kl_student.grad, atol=1e-6)
    assert teacher.grad is None

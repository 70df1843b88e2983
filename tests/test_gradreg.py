"""regularize_gradients against hand-computed cases."""
import pytest
import torch

from pyiqa_grmp import regularize_gradients

G_G = torch.tensor([1.0, 0.0])
ALIGNED = torch.tensor([2.0, 1.0])      # <g_d, g_g> = 2 > 0
CONFLICT = torch.tensor([-2.0, 1.0])    # <g_d, g_g> = -2 < 0


def test_official_projects_aligned_gradients_with_lambda():
    (out,) = regularize_gradients([ALIGNED], [G_G], lam=5.0, mode='official')
    assert torch.allclose(out, torch.tensor([2.0 - 5.0 * 2.0, 1.0]))  # component along g_g: 2 -> -8


def test_official_with_lambda_one_is_an_orthogonal_projection():
    g_d, g_g = torch.tensor([3.0, 4.0, -1.0]), torch.tensor([1.0, 2.0, 2.0])
    (out,) = regularize_gradients([g_d], [g_g], lam=1.0, mode='official')
    assert torch.dot(out, g_g).abs() < 1e-6
    assert torch.allclose(out, g_d - (9.0 / 9.0) * g_g)


def test_official_leaves_conflicting_gradients_alone():
    (out,) = regularize_gradients([CONFLICT], [G_G], lam=5.0, mode='official')
    assert torch.equal(out, CONFLICT)


def test_prograd_projects_only_conflicting_gradients():
    aligned, conflict = regularize_gradients([ALIGNED, CONFLICT], [G_G, G_G], lam=1.0, mode='prograd')
    assert torch.equal(aligned, ALIGNED)
    assert torch.allclose(conflict, torch.tensor([0.0, 1.0]))


def test_none_mode_returns_task_gradients():
    out = regularize_gradients([ALIGNED, CONFLICT], [G_G, G_G], mode='none')
    assert torch.equal(out[0], ALIGNED) and torch.equal(out[1], CONFLICT)


def test_rule_is_applied_per_tensor_not_on_the_flattened_gradient():
    # Flattened, <g_d, g_g> = 2 - 3 = -1 < 0 (no projection); per tensor the first one is projected.
    g_d = [torch.tensor([2.0]), torch.tensor([3.0])]
    g_g = [torch.tensor([1.0]), torch.tensor([-1.0])]
    first, second = regularize_gradients(g_d, g_g, lam=1.0, mode='official')
    assert torch.allclose(first, torch.tensor([0.0]))
    assert torch.equal(second, g_d[1])


def test_none_entries_mean_zero_gradients():
    out = regularize_gradients([None, ALIGNED], [G_G, None], lam=5.0)
    assert out[0] is None
    assert torch.equal(out[1], ALIGNED)


def test_zero_semantic_gradient_leaves_task_gradient_unchanged():
    (out,) = regularize_gradients([ALIGNED], [torch.zeros(2)], lam=5.0)
    assert torch.equal(out, ALIGNED) and torch.isfinite(out).all()


def test_semantic_gradient_is_never_added():
    # Orthogonal gradients: dot = 0, so nothing of g_g may appear in the result.
    (out,) = regularize_gradients([torch.tensor([0.0, 1.0])], [torch.tensor([5.0, 0.0])], lam=5.0)
    assert torch.equal(out, torch.tensor([0.0, 1.0]))


def test_multidimensional_tensors_keep_their_shape():
    g_d, g_g = torch.ones(2, 3), torch.ones(2, 3)
    (out,) = regularize_gradients([g_d], [g_g], lam=1.0)
    assert out.shape == (2, 3) and torch.allclose(out, torch.zeros(2, 3))


@pytest.mark.parametrize('kwargs, message', [({'mode': 'pcgrad'}, 'mode'), ({}, 'task gradients')])
def test_invalid_arguments_are_reported(kwargs, message):
    semantic = [G_G] if kwargs else [G_G, G_G]
    with pytest.raises(ValueError, match=message):
        regularize_gradients([ALIGNED], semantic, **kwargs)

"""grmp_iqa through pyiqa's create_metric: inputs, range checks, loss use, device."""
import pyiqa
import pytest
import torch

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo, photo_tensor


@pytest.fixture
def metric(tiny_checkpoint):
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                               backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)


def test_metric_is_no_reference_higher_better_in_0_1(metric):
    assert metric.lower_better is False
    assert metric.metric_mode == 'NR'
    assert metric.score_range == '0, 1'


def test_path_and_pil_inputs_score_like_the_tensor(metric, tmp_path):
    from PIL import Image

    path = tmp_path / 'astronaut.png'
    Image.fromarray(photo('astronaut')).save(path)
    tensor = torch.from_numpy(photo('astronaut')).permute(2, 0, 1).float().div(255).unsqueeze(0)
    from_tensor = metric(tensor)
    assert torch.allclose(metric(str(path)), from_tensor, atol=1e-6)
    assert torch.allclose(metric(Image.open(path)), from_tensor, atol=1e-6)


def test_values_outside_unit_range_are_rejected_when_scoring(metric):
    with pytest.raises(AssertionError, match=r'normalized to \[0, 1\]'):
        metric(torch.rand(1, 3, 64, 64) * 2)


def test_as_loss_takes_any_real_input_and_gradients_reach_it(tiny_checkpoint):
    loss_metric = pyiqa.create_metric('grmp_iqa', as_loss=True, device='cpu', pretrained_model_path=tiny_checkpoint,
                                      backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    images = torch.randn(2, 3, 96, 96, requires_grad=True)
    loss = loss_metric(images)
    assert loss.ndim == 0
    loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_metric_options_reach_the_arch(tiny_checkpoint, metric):
    options = {'resize': 256, 'antialias': True, 'augment': False, 'prompt_dropout': 0.25}
    custom = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                                 backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS, **options)

    def seen(net):
        return {'resize': net.resize, 'antialias': net.antialias, 'augment': net.augment,
                'prompt_dropout': net.visual_prompts.dropout.p}

    assert seen(custom.net) == options
    assert all(seen(metric.net)[key] != value for key, value in options.items())  # the defaults differ
    image = photo_tensor('astronaut', size=(300, 400))
    assert not torch.allclose(custom(image), metric(image), atol=1e-6)  # the resize and antialias are used
    with pytest.raises(TypeError, match='no_such_option'):
        pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                            backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS, no_such_option=1)

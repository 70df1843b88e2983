"""CUDA checks (skipped without a GPU): the same scores on CPU and GPU."""
import pyiqa
import pytest
import torch

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo_tensor

pytestmark = pytest.mark.gpu


def test_cpu_and_gpu_scores_agree():
    model = make_tiny_model()
    images = torch.cat([photo_tensor('astronaut', (300, 300)), photo_tensor('coffee', (300, 300))])
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()(images.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)


def test_create_metric_on_cuda_matches_cpu(tiny_checkpoint):
    kwargs = dict(pretrained_model_path=tiny_checkpoint, backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    images = photo_tensor('chelsea')
    cpu = pyiqa.create_metric('grmp_iqa', device='cpu', **kwargs)(images)
    gpu = pyiqa.create_metric('grmp_iqa', device='cuda', **kwargs)(images).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)

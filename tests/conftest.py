"""Test configuration: offline, tiny models, checkpoints written by the tests themselves."""
import os

os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

import pyiqa_grmp  # noqa: E402,F401
from grmp_test_utils import tiny_model_kwargs  # noqa: E402
from pyiqa_grmp.archs.grmp_arch import GRMPIQA  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason='needs a CUDA device')
    skip_weights = pytest.mark.skip(reason='set GRMP_IQA_WEIGHTS to an official checkpoint to run')
    for item in items:
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if 'realweights' in item.keywords and not os.environ.get('GRMP_IQA_WEIGHTS'):
            item.add_marker(skip_weights)


def make_tiny_model(seed: int = 0, **overrides) -> GRMPIQA:
    """A tiny random GRMPIQA with non-trivial LayerNorms/biases, in eval mode."""
    torch.manual_seed(seed)
    model = GRMPIQA(**tiny_model_kwargs(**overrides))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator)).add_(
                    0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture
def tiny_model() -> GRMPIQA:
    return make_tiny_model()


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> str:
    """A checkpoint in this package's (pyiqa's) format: {'params': state_dict}."""
    path = tmp_path_factory.mktemp('ckpt') / 'net_best.pth'
    torch.save({'params': make_tiny_model(seed=3).state_dict()}, path)
    return str(path)


@pytest.fixture(scope='session')
def synthetic_workdir(tmp_path_factory):
    """A working directory holding the synthetic dataset (128 px) where the smoke configs expect it."""
    from pyiqa_grmp.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp('work')
    make_synthetic_dataset(str(root / 'datasets' / 'synthetic'), seed=0, size=128)
    return root

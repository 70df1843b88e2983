"""Test configuration: offline, tiny models, checkpoints written by the tests themselves.

Shared fixtures (the expensive setups live here, built once and used by every module that needs them):

- ``tiny_model`` / ``make_tiny_model``: a tiny random GRMPIQA (``grmp_test_utils.tiny_model_kwargs``).
- ``tiny_checkpoint`` (session): that model saved in this package's format.
- ``synthetic_workdir`` (session): the synthetic dataset (128 px) where the smoke configs expect it; every training
  test runs there, each experiment under its own name.
- ``smoke_backbone`` (session): ``pyiqa-grmp train -opt configs/smoke/backbone_synthetic.yml`` in that folder,
  the smoke chain's base backbone. It is also the suite's full smoke fine-tuning run (test_finetune.py): it is
  ``finetune_synthetic.yml`` with other words as its two classes, so one run serves both (the slowest setup of
  the suite, trained once).

The commands a test launches go through ``grmp_test_utils`` (``run_command``, ``start_command``,
``torchrun_command``, ``run_main`` for a command in this process); see tests/README.md for what is launched and
why.
"""
import os
from pathlib import Path

os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

import pyiqa_grmp  # noqa: E402,F401
from grmp_test_utils import tiny_model_kwargs  # noqa: E402
from pyiqa_grmp.archs.grmp_arch import GRMPIQA  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):
    # Each of pytest-xdist's workers (``-n 2``, as CI runs the suite) gets one core: two workers of two threads each
    # on CI's two cores oversubscribe them (measured: the shared smoke run 1.3 s an iteration instead of 0.2 s).
    torch.set_num_threads(1)


#: Modules whose tests share a session setup: under ``pytest -n 2 --dist loadgroup`` (pytest-xdist, as CI runs the
#: suite) each group runs in one worker, so the setup is built once. Every other module is a group of its own (its
#: module fixtures are built once too).
SHARED_SETUPS = {'test_finetune': 'smoke_backbone', 'test_meta': 'smoke_backbone'}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason='needs a CUDA device')
    skip_weights = pytest.mark.skip(reason='set GRMP_IQA_WEIGHTS to an official checkpoint to run')
    for item in items:
        module = Path(str(item.fspath)).stem
        item.add_marker(pytest.mark.xdist_group(SHARED_SETUPS.get(module, module)))
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


SMOKE_CONFIGS = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'


@pytest.fixture(scope='session')
def smoke_backbone(synthetic_workdir) -> dict:
    """``pyiqa-grmp train -opt configs/smoke/backbone_synthetic.yml`` run in ``synthetic_workdir`` (300 steps of
    96 shots: the slowest setup of the suite, so it is run once): its experiment folder and what it printed."""
    import contextlib
    import io

    from pyiqa_grmp.cli import main

    cwd, output = os.getcwd(), io.StringIO()
    os.chdir(synthetic_workdir)
    try:
        with contextlib.redirect_stdout(output):
            assert main(['train', '-opt', str(SMOKE_CONFIGS / 'backbone_synthetic.yml')]) == 0
    finally:
        os.chdir(cwd)
    return {'experiment': synthetic_workdir / 'experiments' / 'smoke_backbone_synthetic',
            'output': output.getvalue()}

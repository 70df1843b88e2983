"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.sh): the same scores on CPU and GPU, the fast
path on CUDA, half precision, training steps, the commands, and checkpoints across devices."""
import copy
import csv
from pathlib import Path

import pyiqa
import pytest
import torch
from PIL import Image
from pyiqa.data import build_dataset
from pyiqa.models import build_model

from conftest import make_tiny_model
from grmp_test_utils import (TINY_BACKBONE, TINY_NUM_PROMPTS, photo, photo_tensor, reference_score,
                             tiny_grmp_cli_options, tiny_model_kwargs, training_options)
from pyiqa_grmp.archs.grmp_arch import GRMPIQA
from pyiqa_grmp.cli import main
from pyiqa_grmp.data.synthetic import META_INFO_NAME

pytestmark = pytest.mark.gpu

CONFIGS = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.cat([photo_tensor('astronaut', (300, 300)), photo_tensor('coffee', (300, 300))])


def test_cpu_and_gpu_scores_agree(images):
    model = make_tiny_model()
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()(images.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)


def test_create_metric_on_cuda_matches_cpu(tiny_checkpoint):
    kwargs = dict(pretrained_model_path=tiny_checkpoint, backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    image = photo_tensor('chelsea')
    cpu = pyiqa.create_metric('grmp_iqa', device='cpu', **kwargs)(image)
    gpu = pyiqa.create_metric('grmp_iqa', device='cuda', **kwargs)(image).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)


def test_cached_fast_path_equals_the_straightforward_path_on_cuda(images):
    model = make_tiny_model().cuda()
    with torch.no_grad():
        fast = model(images.cuda())
        fast_again = model(images.cuda())  # served from the cached prompt keys/values and text features
        reference = reference_score(model, images.cuda())
    assert torch.equal(fast, fast_again)
    assert torch.allclose(fast, reference, atol=1e-4)  # SDPA kernels vs nn.MultiheadAttention: ~1e-6 expected


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_half_precision_on_cuda_is_close_to_fp32_with_fp32_scores(images, precision):
    model = make_tiny_model().cuda()
    with torch.no_grad():
        exact = model(images.cuda())
        model.precision = precision
        half = model(images.cuda())
    assert half.dtype == torch.float32
    assert (half - exact).abs().max() < 0.03
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    assert model._constants['quality_text'][1].dtype == dtype
    assert {t.dtype for pair in model._constants['prompt_kv'][1] for t in pair} == {dtype}


def _finetune_options(workdir, **train):
    opt = training_options(CONFIGS / 'finetune_synthetic.yml', workdir, **train)
    opt['num_gpu'] = 1
    return opt


@pytest.mark.parametrize('amp', [None, 'bf16', 'fp16'])
def test_finetuning_steps_on_cuda(synthetic_workdir, amp):
    opt = _finetune_options(synthetic_workdir, amp=amp)
    model = build_model(opt)
    net = model.get_bare_model(model.net)
    assert net.prompt_learner.ctx.is_cuda
    assert (model.scaler is not None) == (amp == 'fp16')
    dataset = build_dataset(copy.deepcopy(opt['datasets']['train']))
    items = [dataset[i] for i in range(8)]
    model.feed_data({'img': torch.stack([i['img'] for i in items]),
                     'mos_label': torch.stack([i['mos_label'] for i in items])})
    before = net.prompt_learner.ctx.detach().clone()
    for step in range(1, 20):  # fp16: a step whose gradients overflow at the initial scale is skipped
        model.optimize_parameters(step)
        if not torch.equal(net.prompt_learner.ctx, before):
            break
    assert torch.isfinite(net.prompt_learner.ctx).all()
    assert not torch.equal(net.prompt_learner.ctx, before)


def test_meta_training_round_on_cuda(synthetic_workdir):
    opt = training_options(CONFIGS / 'meta_pretrain_synthetic.yml', synthetic_workdir)
    opt['network']['backbone_pretrained'] = None
    opt['num_gpu'] = 1
    model = build_model(opt)
    theta_before = [t.detach().clone() for t in model.theta]
    dataset = build_dataset(copy.deepcopy(opt['datasets']['train']))
    for index in range(len(dataset)):  # every task once: one round, ending in the outer step
        task = dataset[index]
        model.feed_data({'images': task['images'][None], 'mos': task['mos'][None], 'task': [task['task']],
                         'source': torch.tensor([task['source']]), 'idle': torch.tensor([False]),
                         'num_source_tasks': torch.tensor([task['num_source_tasks']]), 'item_seed': torch.tensor([index])})
        model.optimize_parameters(index + 1)
    assert all(t.is_cuda and torch.isfinite(t).all() for t in model.theta)
    assert any(not torch.equal(after, before) for after, before in zip(model.theta, theta_before))


def test_score_command_on_cuda_matches_cpu(tiny_checkpoint, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for name in ('astronaut', 'coffee', 'chelsea'):
        Image.fromarray(photo(name)).save(folder / f'{name}.png')
    scores = {}
    for device in ('cpu', 'cuda'):
        out = tmp_path / f'{device}.csv'
        assert main(['score', 'grmp_iqa', '-t', str(folder), '--device', device, '--csv', str(out),
                     *tiny_grmp_cli_options(tiny_checkpoint)]) == 0
        scores[device] = {row['image']: float(row['grmp_iqa']) for row in csv.DictReader(out.open())}
    assert scores['cpu'].keys() == scores['cuda'].keys() and len(scores['cpu']) == 3
    assert all(abs(scores['cpu'][k] - scores['cuda'][k]) < 1e-3 for k in scores['cpu'])


def test_images_finished_on_the_gpu_score_as_the_originals_within_1e_6(tiny_checkpoint, tmp_path):
    from pyiqa_grmp import scoring
    from pyiqa_grmp.data.image_io import read_image

    paths = []
    for number, (name, size) in enumerate([('astronaut', (300, 200)), ('coffee', (200, 300)), ('chelsea', (37, 53)),
                                           ('astronaut', (512, 512)), ('coffee', (244, 244))]):
        paths.append(str(tmp_path / f'{number}.png'))
        Image.fromarray(photo(name)[:size[0], :size[1]]).save(paths[-1])
    metric = pyiqa.create_metric('grmp_iqa', device='cuda', pretrained_model_path=tiny_checkpoint,
                                 backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    assert scoring.shared_gpu({'grmp_iqa': metric}) == torch.device('cuda', torch.cuda.current_device())
    inputs = []
    handle = metric.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        results = [r for chunk in scoring.score_stream(paths, {'grmp_iqa': metric}, batch_size=8, workers=2)
                   for r in chunk]
    finally:
        handle.remove()
    assert [tuple(x.shape) for x in inputs] == [(5, 3, 244, 244)] and inputs[0].is_cuda
    with torch.no_grad():
        originals = [metric(read_image(p).unsqueeze(0).cuda()).item() for p in paths]
    assert max(abs(r.scores['grmp_iqa'] - o) for r, o in zip(results, originals)) <= 1e-6


def test_compare_command_on_cuda(synthetic_workdir, tiny_checkpoint, tmp_path):
    import pandas as pd

    root = synthetic_workdir / 'datasets' / 'synthetic'
    meta = tmp_path / 'meta.csv'
    pd.read_csv(root / META_INFO_NAME).iloc[::10].to_csv(meta, index=False)
    out = tmp_path / 'compare'
    assert main(['compare', 'grmp_iqa', '--meta-info', str(meta), '--root', str(root), '--device', 'cuda',
                 '--precision', 'bf16', '--out', str(out), *tiny_grmp_cli_options(tiny_checkpoint)]) == 0
    table = pd.read_csv(out / 'results.csv')
    assert table.loc[0, 'failed'] == 0 and table.loc[0, 'scored'] == len(pd.read_csv(meta))


def test_checkpoint_written_on_gpu_loads_on_cpu(tmp_path, images):
    model = make_tiny_model(seed=6).cuda()
    path = tmp_path / 'gpu.pth'
    torch.save({'params': model.state_dict()}, path)
    loaded = GRMPIQA(**tiny_model_kwargs(pretrained=True, pretrained_model_path=str(path))).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images.cuda()).cpu(), atol=1e-3)


def _train_on_cuda(workdir, name, *extra, launch=('-m', 'pyiqa_grmp')):
    import os
    import subprocess
    import sys

    command = [sys.executable, *launch, 'train', '-opt', str(CONFIGS / 'finetune_synthetic.yml'), *extra,
               '--force_yml', 'num_gpu=1', 'train:total_epoch=4', 'datasets:train:batch_size_per_gpu=32',
               'train:optim:type=SGD', 'train:optim:lr=0.05', 'val:val_freq=2', 'logger:save_checkpoint_freq=1',
               f'name={name}']
    return subprocess.Popen(command, cwd=workdir, env=dict(os.environ, PYTHONUNBUFFERED='1'), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finished(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def _latest_weights(workdir, name):
    return torch.load(workdir / 'experiments' / name / 'models' / 'net_latest.pth', weights_only=True)['params']


def _max_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_training_on_cuda_stopped_by_sigterm_resumes_to_the_uninterrupted_run(synthetic_workdir):
    """Two uninterrupted runs measure the GPU's own run-to-run noise (kernel choices); the resumed run must stay
    within it (SGD, so that noise is not amplified as Adam's normalised steps would)."""
    import signal
    import time

    _finished(_train_on_cuda(synthetic_workdir, 'cuda_reference'))
    _finished(_train_on_cuda(synthetic_workdir, 'cuda_reference_again'))
    experiment = synthetic_workdir / 'experiments' / 'cuda_sigterm'
    stopped = _train_on_cuda(synthetic_workdir, 'cuda_sigterm')
    deadline = time.monotonic() + 300
    while not (experiment / 'training_states' / '4.state').exists():
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.stdout.read()[-3000:]
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)
    output, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert 'resuming from' in _finished(_train_on_cuda(synthetic_workdir, 'cuda_sigterm', '--auto_resume'))
    reference = _latest_weights(synthetic_workdir, 'cuda_reference')
    noise = _max_difference(reference, _latest_weights(synthetic_workdir, 'cuda_reference_again'))
    difference = _max_difference(reference, _latest_weights(synthetic_workdir, 'cuda_sigterm'))
    print(f'result: CUDA resume after SIGTERM: max weight difference to the uninterrupted run {difference:.2e} '
          f'(two uninterrupted runs: {noise:.2e})')
    assert difference <= max(1e-6, 10 * noise)


def test_torchrun_launch_trains_on_cuda(synthetic_workdir):
    launch = ('-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', '29517', '-m', 'pyiqa_grmp')
    _finished(_train_on_cuda(synthetic_workdir, 'cuda_torchrun', '--launcher', 'pytorch', launch=launch))
    assert (synthetic_workdir / 'experiments' / 'cuda_torchrun' / 'models' / 'net_latest.pth').is_file()

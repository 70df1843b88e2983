"""Meta-prompt pre-training: distortion tasks, the outer step, what changes, both modes, the smoke run."""
import copy
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyiqa
import pytest
import torch
import yaml
from PIL import Image
from pyiqa.archs import build_network
from pyiqa.models import build_model
from pyiqa.utils import set_random_seed

from grmp_test_utils import training_options
from pyiqa_grmp.cli import main
from pyiqa_grmp.comparison import compare
from pyiqa_grmp.data.fewshot_dataset import DatasetConfigError
from pyiqa_grmp.data.synthetic import make_synthetic_dataset
from pyiqa_grmp.data.task_dataset import DistortionTaskDataset
from pyiqa_grmp.evaluation import evaluate_checkpoint
from pyiqa_grmp.models.base_model import TrainingConfigError

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
META_CONFIG = CONFIGS / 'smoke' / 'meta_pretrain_synthetic.yml'
FROM_META_CONFIG = CONFIGS / 'smoke' / 'finetune_from_meta_synthetic.yml'


def _write_images(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def kadid_like(tmp_path):
    """pyiqa's FR layout with KADID-10k names I<ref>_<type>_<level>.png: 2 references x 3 types x 4 levels."""
    names = [f'I{r:02d}_{t:02d}_{l:02d}.png' for r in (1, 2) for t in (1, 2, 3) for l in (1, 2, 3, 4)]
    _write_images(tmp_path, names)
    pd.DataFrame({'ref_name': [n[:3] + '.png' for n in names], 'dist_name': names,
                  'dmos': [5.0 - int(n[7:9]) for n in names]}).to_csv(tmp_path / 'kadid.csv', index=False)
    return {'name': 'kadid', 'meta_info_file': str(tmp_path / 'kadid.csv'), 'dataroot_target': str(tmp_path),
            'type': 'GeneralFRDataset'}


@pytest.fixture
def tid_like(tmp_path):
    """TID2013 names i<ref>_<type>_<level>.bmp, FR layout with a reference folder."""
    names = [f'i{r:02d}_{t:02d}_{l}.bmp' for r in (1, 2, 3) for t in (7, 8) for l in (1, 2, 3)]
    _write_images(tmp_path, names)
    pd.DataFrame({'ref_name': ['I01.BMP'] * len(names), 'dist_name': names,
                  'mos': [7.0 - int(n[7]) for n in names]}).to_csv(tmp_path / 'tid.csv', index=False)
    return {'name': 'tid', 'meta_info_file': str(tmp_path / 'tid.csv'), 'dataroot_target': str(tmp_path),
            'dataroot_ref': str(tmp_path)}


def _tasks(sources, phase='train', **opt):
    return DistortionTaskDataset({'name': 'tasks', 'sources': sources, 'phase': phase, 'resize': 32, **opt})


def test_kadid_file_names_give_one_task_per_type(kadid_like):
    dataset = _tasks([kadid_like], val_fraction=0.25)
    assert [t['name'] for t in dataset.tasks] == ['kadid:01', 'kadid:02', 'kadid:03']
    assert all(len(t['items']) == 6 for t in dataset.tasks) and len(dataset.held_out) == 6
    item = dataset[0]
    assert item['images'].shape == (6, 3, 32, 32) and item['images'].dtype == torch.uint8
    assert item['mos'].shape == (6,) and item['num_source_tasks'] == 3


def test_tid_file_names_and_two_sources(kadid_like, tid_like):
    dataset = _tasks([tid_like, kadid_like], val_fraction=0.0)
    assert [t['name'] for t in dataset.tasks] == ['tid:07', 'tid:08', 'kadid:01', 'kadid:02', 'kadid:03']
    assert dataset.tasks_per_source == [2, 3]


def test_type_column_gives_every_type_but_the_excluded(tmp_path):
    meta = make_synthetic_dataset(str(tmp_path / 'synthetic'), size=32)
    source = {'name': 'syn', 'meta_info_file': meta, 'dataroot_target': str(tmp_path / 'synthetic'),
              'type_column': 'distortion', 'exclude_types': ['pristine']}
    dataset = _tasks([source])
    assert sorted(t['name'] for t in dataset.tasks) == sorted(
        f'syn:{k}' for k in ('gaussian_noise', 'gaussian_blur', 'jpeg', 'pixelate', 'contrast'))


def test_source_row_filter_keeps_only_the_listed_rows(tmp_path):
    meta = make_synthetic_dataset(str(tmp_path / 'synthetic'), size=32)
    source = {'name': 'syn', 'meta_info_file': meta, 'dataroot_target': str(tmp_path / 'synthetic'),
              'type_column': 'distortion', 'exclude_types': ['pristine'],
              'row_filter': {'reference': ['astronaut', 'chelsea']}}
    dataset = _tasks([source], val_fraction=0.0)
    paths = [os.path.basename(p) for t in dataset.tasks for p, _ in t['items']]
    assert len(dataset.tasks) == 5 and all(len(t['items']) == 2 * 5 for t in dataset.tasks)
    assert all(p.startswith(('astronaut_', 'chelsea_')) for p in paths)


def test_held_out_images_are_disjoint_from_tasks_and_deterministic(kadid_like):
    first, second = (_tasks([kadid_like], val_fraction=0.25, split_seed=4) for _ in range(2))
    task_paths = {p for t in first.tasks for p, _ in t['items']}
    held = {p for p, _ in first.held_out}
    assert held and not held & task_paths
    assert first.held_out == second.held_out
    other = _tasks([kadid_like], val_fraction=0.25, split_seed=5)
    assert {p for p, _ in other.held_out} != held


def test_val_phase_yields_held_out_images_labelled_in_unit_range(kadid_like):
    dataset = _tasks([kadid_like], phase='val', val_fraction=0.25)
    labels = [dataset[i]['mos_label'].item() for i in range(len(dataset))]
    assert len(dataset) == 6 and min(labels) == 0.0 and max(labels) == 1.0
    assert dataset[0]['img'].shape == (3, 32, 32)


def test_unmatched_file_name_is_reported(kadid_like, tmp_path):
    frame = pd.read_csv(kadid_like['meta_info_file'])
    frame.loc[0, 'dist_name'] = 'holiday.png'
    frame.to_csv(tmp_path / 'bad.csv', index=False)
    with pytest.raises(DatasetConfigError, match="holiday.png.*type_pattern"):
        _tasks([dict(kadid_like, meta_info_file=str(tmp_path / 'bad.csv'))])


# ----------------------------------------------------------------------------------------------- model
def _options(synthetic_workdir, **meta):
    opt = training_options(META_CONFIG, synthetic_workdir, meta=meta)
    opt['network']['backbone_pretrained'] = None  # the machinery needs no trained base backbone
    return opt


def _feed_task(model, opt, index=0):
    from pyiqa.data import build_dataset

    task = build_dataset(copy.deepcopy(opt['datasets']['train']))[index]
    model.feed_data({'images': task['images'][None], 'mos': task['mos'][None], 'task': [task['task']],
                     'source': torch.tensor([task['source']]),
                     'num_source_tasks': torch.tensor([task['num_source_tasks']]), 'idle': torch.tensor([False]),
                     'item_seed': torch.tensor([0])})


def test_outer_step_moves_theta_by_exactly_beta_toward_the_snapshot_mean(synthetic_workdir):
    model = build_model(_options(synthetic_workdir, outer_step=0.25))
    theta = [torch.randn_like(t) for t in model.theta]
    snapshots = [[torch.randn_like(t) for t in model.theta] for _ in range(3)]
    model.theta = [t.clone() for t in theta]
    model.snapshot_sums = {0: [sum(s[i] for s in snapshots) for i in range(len(theta))]}
    model.snapshot_counts = {0: 3}
    model.outer_update(0)
    for i, (before, after) in enumerate(zip(theta, model.theta)):
        mean = sum(s[i] for s in snapshots) / 3
        assert torch.allclose(after, before + 0.25 * (mean - before), atol=1e-6)
    assert model.snapshot_sums == {}


def test_a_task_changes_only_the_prompt_tensors(synthetic_workdir):
    opt = _options(synthetic_workdir)
    model = build_model(opt)
    net = model.get_bare_model(model.net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _feed_task(model, opt)
    model.optimize_parameters(1)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith(('prompt_learner.', 'visual_prompts.'))}


def test_meta_state_holds_only_prompt_tensors(synthetic_workdir):
    opt = _options(synthetic_workdir)
    model = build_model(opt)
    net = model.get_bare_model(model.net)
    prompt_count = sum(p.numel() for n, p in net.named_parameters() if n.startswith(('prompt_learner.',
                                                                                     'visual_prompts.')))
    _feed_task(model, opt)
    model.optimize_parameters(1)
    assert sum(t.numel() for t in model.theta) == prompt_count
    assert all(sum(t.numel() for t in sums) == prompt_count for sums in model.snapshot_sums.values())


@pytest.mark.parametrize('mode', ['reptile', 'official'])
def test_each_task_starts_from_theta_only_in_reptile_mode(synthetic_workdir, mode, monkeypatch):
    opt = _options(synthetic_workdir, mode=mode, outer_step=0.5)
    model = build_model(opt)
    starts = []
    original = model._inner_step
    first_step = {'pending': True}

    def recording(net, pixels, labels):
        if first_step['pending']:
            starts.append([p.detach().clone() for p in model.prompt_params])
            first_step['pending'] = False
        return original(net, pixels, labels)

    monkeypatch.setattr(model, '_inner_step', recording)
    for iteration in (1, 2):
        _feed_task(model, opt, index=iteration - 1)
        first_step['pending'] = True
        theta_now = [t.clone() for t in model.theta]
        model.optimize_parameters(iteration)
        starts_from_theta = all(torch.equal(a, b) for a, b in zip(starts[-1], theta_now))
        assert starts_from_theta == (mode == 'reptile' or iteration == 1)


def test_a_bf16_task_step_gives_finite_losses_and_fp32_prompts(synthetic_workdir):
    opt = _options(synthetic_workdir)
    opt['train']['amp'] = 'bf16'
    model = build_model(opt)
    _feed_task(model, opt)
    model.optimize_parameters(1)
    assert set(model.log_dict) == {'l_support', 'l_query'} and all(math.isfinite(v) for v in model.log_dict.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.prompt_params)


def test_fp16_meta_training_is_refused(synthetic_workdir):
    opt = _options(synthetic_workdir)
    opt['train']['amp'] = 'fp16'
    with pytest.raises(TrainingConfigError, match='train.amp of meta-training must be null or bf16'):
        build_model(opt)


def test_unknown_meta_mode_fails_before_training(synthetic_workdir):
    with pytest.raises(TrainingConfigError, match='meta.mode'):
        build_model(_options(synthetic_workdir, mode='maml'))


def test_official_meta_mode_on_several_processes_fails_naming_reptile(synthetic_workdir):
    opt = _options(synthetic_workdir, mode='official')
    opt.update(dist=True, world_size=2)  # as under torchrun; the refusal comes before any collective
    with pytest.raises(TrainingConfigError, match="train.meta.mode 'official'.*use mode reptile"):
        build_model(opt)


# ----------------------------------------------------------------------------------------- end to end
UNTRAINED_FINETUNE_SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope='module')
def smoke_chain(synthetic_workdir, smoke_backbone):
    """The smoke chain through `pyiqa-grmp train` (about two and a half minutes): the base backbone (the
    stand-in for CLIP; conftest's ``smoke_backbone``, shared with test_finetune.py), meta-prompt pre-training on
    it, and fine-tuning on the held-out distortion from the meta-prompts and, at the same budget, from untrained
    prompts of several seeds."""
    cwd = os.getcwd()
    os.chdir(synthetic_workdir)
    try:
        assert main(['train', '-opt', str(META_CONFIG)]) == 0
        assert main(['train', '-opt', str(FROM_META_CONFIG)]) == 0
        for seed in UNTRAINED_FINETUNE_SEEDS:
            assert main(['train', '-opt', str(FROM_META_CONFIG), '--force_yml', 'path:pretrain_network=~',
                         f'manual_seed={seed}', f'name=smoke_finetune_from_untrained_{seed}']) == 0
    finally:
        os.chdir(cwd)
    experiments = synthetic_workdir / 'experiments'
    return {'experiments': experiments, 'data': synthetic_workdir / 'datasets' / 'synthetic',
            'base': smoke_backbone['experiment'] / 'models' / 'net_best.pth',
            'meta_best': experiments / 'smoke_meta_pretrain_synthetic' / 'models' / 'net_best.pth'}


def _network_options(config, smoke_chain):
    network = yaml.safe_load(config.read_text())['network']
    return dict(network, backbone_pretrained=str(smoke_chain['base']))


def test_meta_prompts_rank_a_held_out_distortion_better_than_untrained_prompts(smoke_chain, tmp_path):
    network = _network_options(META_CONFIG, smoke_chain)
    options = {k: v for k, v in network.items() if k not in ('type', 'pretrained')}
    metric_options = {'grmp_iqa@meta': dict(options, pretrained_model_path=str(smoke_chain['meta_best']))}
    for seed in range(8):  # untrained prompts: a sample of random initialisations on the same backbone
        set_random_seed(seed)
        path = tmp_path / f'untrained_{seed}.pth'
        torch.save({'params': build_network(copy.deepcopy(network)).state_dict()}, path)
        metric_options[f'grmp_iqa@untrained_{seed}'] = dict(options, pretrained_model_path=str(path))
    table = pd.read_csv(smoke_chain['data'] / 'meta_info_synthetic.csv')
    held_out = table[table.distortion.isin(['gaussian_blur', 'pristine'])]  # never a task of pre-training
    held_out.to_csv(tmp_path / 'held_out.csv', index=False)
    result = compare(list(metric_options), meta_info=str(tmp_path / 'held_out.csv'), root=str(smoke_chain['data']),
                     metric_options=metric_options, progress=False)
    srcc = dict(zip(result['metric'], result['srcc']))
    meta = srcc.pop('grmp_iqa@meta')
    untrained = np.array(list(srcc.values()))
    print(f'zero-shot SRCC on Gaussian blur + pristine ({len(held_out)} images): meta-prompts {meta:.3f}; '
          f'untrained prompts {untrained.mean():.3f} +- {untrained.std():.3f} ({np.round(untrained, 2)})')
    # Measured with benchmarks/smoke_chain.py (every config at seed 1, 2, 3; seed 1 is the configs' own):
    # meta-prompts 0.826, 0.831, 0.712; untrained prompts -0.768, -0.093, 0.313 (mean of 8 initialisations).
    # Whether untrained prompts point along the backbone's quality direction or against it is a coin flip of
    # the backbone; meta-prompts find it either way.
    assert meta > untrained.mean() + 0.3
    assert meta > 0.6


def test_finetuning_from_meta_prompts_learns_the_held_out_distortion(smoke_chain):
    config = yaml.safe_load(FROM_META_CONFIG.read_text())
    test_split = dict(config['datasets']['train'], phase='test', name='held_out_test',
                      dataroot_target=str(smoke_chain['data']),
                      meta_info_file=str(smoke_chain['data'] / 'meta_info_synthetic.csv'))
    network = _network_options(FROM_META_CONFIG, smoke_chain)

    def best_test_srcc(name):
        best = smoke_chain['experiments'] / name / 'models' / 'net_best.pth'
        return evaluate_checkpoint(network, str(best), test_split)['srcc']

    from_meta = best_test_srcc(config['name'])
    from_untrained = np.array([best_test_srcc(f'smoke_finetune_from_untrained_{s}')
                               for s in UNTRAINED_FINETUNE_SEEDS])
    print(f'test SRCC after {config["train"]["total_epoch"]} epochs on 16 shots of the held-out distortion: from '
          f'meta-prompts {from_meta:.3f}; from untrained prompts {from_untrained.mean():.3f} '
          f'({np.round(from_untrained, 2)})')
    # Measured with benchmarks/smoke_chain.py (seeds 1, 2, 3): from meta-prompts 0.735, 0.758, 0.692; from
    # untrained prompts 0.582, 0.720, 0.682 (mean of 4 seeds). Fine-tuning from untrained prompts catches up
    # within a few steps on this tiny backbone, so a gain of stage 1 at this budget is not asserted (it is 0.15
    # only where the untrained start is misaligned, seed 1); that it learns and does not lose is.
    assert from_meta > 0.5
    assert from_meta > from_untrained.mean() - 0.15


def test_meta_checkpoint_loads_in_create_metric(smoke_chain):
    network = {k: v for k, v in _network_options(META_CONFIG, smoke_chain).items()
               if k not in ('type', 'pretrained')}
    best = str(smoke_chain['meta_best'])
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=best, **network)
    state = torch.load(best, weights_only=True)['params']
    assert torch.equal(metric.net.prompt_learner.ctx, state['prompt_learner.ctx'])
    assert 0 < metric(torch.rand(1, 3, 122, 122)).item() < 1

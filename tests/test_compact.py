"""Compact checkpoints: training writes only the tensors it can change plus the reference of the base they apply
to; loading applies them onto that base and refuses a base that is missing or differs; full checkpoints (old
ones, and `export --full`) load without any base."""
import os
import shutil
from pathlib import Path

import pyiqa
import pytest
import torch
from pyiqa.models import build_model

import pyiqa_grmp
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, run_main, scores_of, training_options
from pyiqa_grmp.archs.checkpoint import BaseWeightsError, load_checked, tensor_digest
from pyiqa_grmp.archs.grmp_arch import PROMPT_PREFIXES
from pyiqa_grmp.archs.pickled_module import check_torch_archive
from pyiqa_grmp.model_folder import export

CONFIGS = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'
TINY_NETWORK = {'type': 'GRMPIQA', 'backbone': TINY_BACKBONE, 'num_visual_prompts': TINY_NUM_PROMPTS}
#: Fine-tuning as the paper's (the last block of each tower, the final LayerNorms, the text context).
TRAINABLE = {'last_blocks': 1, 'names': ['prompt_learner.ctx', 'clip.visual.ln_post', 'clip.ln_final']}


def _finetune_options(workdir, base, name='compact_finetune'):
    opt = training_options(CONFIGS / 'finetune_synthetic.yml', workdir, trainable=TRAINABLE)
    opt['network'] = {**TINY_NETWORK, 'pretrained': True, 'pretrained_model_path': base, 'backbone_pretrained': None}
    return _renamed(opt, workdir, name)


def _meta_options(workdir, base, name='compact_meta'):
    opt = training_options(CONFIGS / 'meta_pretrain_synthetic.yml', workdir)
    opt['network'] = {**TINY_NETWORK, 'pretrained': False, 'backbone_pretrained': base}  # its backbone, new prompts
    return _renamed(opt, workdir, name)


def _renamed(opt, workdir, name):
    from pyiqa.utils.options import make_paths

    opt['name'] = name
    make_paths(opt, os.path.join(str(workdir), 'unit'))
    for key in ('models', 'training_states'):
        os.makedirs(opt['path'][key], exist_ok=True)
    return opt


def _train_steps(model, meta, steps=2):
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        if meta:
            images = (torch.rand(1, 12, 3, 244, 244, generator=generator) * 255).to(torch.uint8)
            model.meta['support_batch'] = model.meta['query_batch'] = 4
            model.feed_data({'images': images, 'mos': torch.rand(1, 12, generator=generator),
                             'source': torch.tensor([0]), 'num_source_tasks': torch.tensor([1]),
                             'idle': torch.tensor([False]), 'item_seed': torch.tensor([step])})
        else:
            model.feed_data({'img': torch.rand(4, 3, 244, 244, generator=generator),
                             'mos_label': torch.rand(4, 1, generator=generator)})
        model.optimize_parameters(step)


@pytest.fixture(scope='module')
def images():
    return torch.rand(3, 3, 244, 244, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def runs(tiny_checkpoint, tmp_path_factory):
    """A fine-tuning and a meta-training model on the tiny base, each trained two steps and saved as net_best;
    with the full state dicts before and after training."""
    workdir = tmp_path_factory.mktemp('compact')
    base = str(workdir / 'base.pth')
    shutil.copy(tiny_checkpoint, base)
    result = {'base': base, 'workdir': workdir}
    for kind, options in (('finetune', _finetune_options), ('meta', _meta_options)):
        opt = options(workdir, base)
        model = build_model(opt)
        net = model.get_bare_model(model.net)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        buffers_before = {k: v.clone() for k, v in net.named_buffers()}
        _train_steps(model, kind == 'meta')
        model.save_network(model.net, 'net_best')
        with model.theta_in_network() if kind == 'meta' else torch.no_grad():
            after = {k: v.clone() for k, v in net.state_dict().items()}
        full = os.path.join(opt['path']['models'], 'net_full.pth')  # as checkpoints were written before
        torch.save({'params': after, 'network': net.network_options(), 'base': {'pretrained_model_path': base}}, full)
        result[kind] = {'opt': opt, 'model': model, 'net': net, 'before': before, 'after': after, 'full': full,
                        'buffers_before': buffers_before,
                        'path': os.path.join(opt['path']['models'], 'net_best.pth')}
    return result


def _saved(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_finetuning_checkpoint_holds_only_the_trainable_tensors_and_its_base_reference(runs):
    run = runs['finetune']
    saved = _saved(run['path'])
    trainable = {n for n, p in run['net'].named_parameters() if p.requires_grad}
    assert set(saved['params']) == trainable
    assert any(k.startswith('clip.visual.transformer.resblocks.1.') for k in trainable)
    frozen = {k: v for k, v in run['after'].items() if k not in trainable}
    assert saved['applies_to']['digest'] == tensor_digest(frozen)
    assert saved['applies_to']['base'] == {'pretrained': True, 'pretrained_model_path': runs['base'],
                                           'backbone_pretrained': None}


def test_meta_checkpoint_holds_only_the_prompts_and_its_base_reference(runs):
    run = runs['meta']
    saved = _saved(run['path'])
    assert set(saved['params']) == {k for k in run['after'] if k.startswith(PROMPT_PREFIXES)}
    assert saved['applies_to']['base'] == {'pretrained': False, 'backbone_pretrained': runs['base']}
    whole = sum(v.numel() for v in run['after'].values())
    assert sum(v.numel() for v in saved['params'].values()) < whole / 5


@pytest.mark.parametrize('kind', ['finetune', 'meta'])
def test_training_changes_no_tensor_outside_the_compact_set(runs, kind):
    run = runs[kind]
    compact = set(_saved(run['path'])['params'])
    changed = {k for k in run['before'] if not torch.equal(run['before'][k], run['after'][k])}
    assert changed and changed <= compact
    assert all(torch.equal(v, run['buffers_before'][k]) for k, v in run['net'].named_buffers())


@pytest.mark.parametrize('kind', ['finetune', 'meta'])
def test_compact_checkpoint_is_weights_only_and_passes_the_archive_check(runs, kind):
    with open(runs[kind]['path'], 'rb') as handle:
        check_torch_archive(handle)
    assert set(load_checked(runs[kind]['path'])) == {'params', 'network', 'base', 'applies_to'}


def _metric(path):
    return pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=str(path))


@pytest.mark.parametrize('kind', ['finetune', 'meta'])
def test_compact_checkpoint_loads_with_its_path_to_the_scores_of_the_full_network(runs, kind, images):
    metric = _metric(runs[kind]['path'])
    assert all(torch.equal(v, runs[kind]['after'][k]) for k, v in metric.net.state_dict().items())
    assert torch.equal(scores_of(metric, images), scores_of(_metric(runs[kind]['full']), images))


def _rebased(path, out, base):
    """A copy of the compact checkpoint ``path`` at ``out`` whose base is the file ``base``."""
    saved = _saved(path)
    saved['applies_to']['base']['pretrained_model_path'] = str(base)
    torch.save(saved, out)
    return str(out)


def test_compact_checkpoint_on_another_base_is_refused_naming_both(runs, tmp_path):
    other = tmp_path / 'other_base.pth'
    weights = _saved(runs['base'])['params']
    weights['clip.visual.transformer.resblocks.0.mlp.c_fc.weight'] += 1e-3  # a frozen tensor differs
    torch.save({'params': weights}, other)
    checkpoint = _rebased(runs['finetune']['path'], tmp_path / 'net.pth', other)
    expected = _saved(checkpoint)['applies_to']['digest']
    with pytest.raises(BaseWeightsError) as error:
        pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=checkpoint)
    message = str(error.value)
    assert str(other) in message and expected in message and 'differs' in message
    assert message.count('sha256:') == 2  # the expected and the found digests


def test_compact_checkpoint_whose_base_is_missing_is_refused_naming_it(runs, tmp_path):
    checkpoint = _rebased(runs['finetune']['path'], tmp_path / 'net.pth', tmp_path / 'gone.pth')
    with pytest.raises(BaseWeightsError, match='which are missing') as error:
        pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=checkpoint)
    assert str(tmp_path / 'gone.pth') in str(error.value)


def test_random_initialised_base_is_stored_once_beside_the_checkpoints_and_found_there(tmp_path):
    opt = training_options(CONFIGS / 'finetune_synthetic.yml', tmp_path / 'a', trainable=TRAINABLE)
    opt['network']['backbone'] = TINY_BACKBONE  # 224 px crops of the default 244
    for key in ('resize', 'crop'):
        del opt['network'][key]
    model = build_model(opt)
    _train_steps(model, meta=False, steps=1)
    model.save_network(model.net, 'net', 1)
    model.save_network(model.net, 'net_best')
    models = Path(opt['path']['models'])
    stored = sorted(p.name for p in models.glob('base-*.safetensors'))
    digest = _saved(models / 'net_best.pth')['applies_to']['digest']
    assert stored == [f'base-{digest[7:23]}.safetensors']
    moved = tmp_path / 'moved'
    shutil.move(str(models), str(moved))  # the run's folder elsewhere: the stored base is found beside
    state = model.get_bare_model(model.net).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in _metric(moved / 'net_best.pth').net.state_dict().items())


@pytest.mark.parametrize('kind', ['finetune', 'meta'])
def test_old_full_checkpoint_still_loads(runs, kind):
    net = _metric(runs[kind]['full']).net
    assert all(torch.equal(v, runs[kind]['after'][k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize('form', ['path', 'full'], ids=['compact', 'full'])
def test_meta_checkpoint_as_pretrain_network_starts_fine_tuning_from_its_weights(runs, form):
    opt = _finetune_options(runs['workdir'], runs['base'], name=f'from_meta_{form}')
    opt['path']['pretrain_network'] = runs['meta'][form]
    started = build_model(opt).net.state_dict()
    assert all(torch.equal(v, runs['meta']['after'][k]) for k, v in started.items())


def test_export_full_writes_one_file_that_loads_without_the_base(runs, tmp_path, images):
    base = tmp_path / 'base.pth'
    shutil.copy(runs['base'], base)
    checkpoint = _rebased(runs['finetune']['path'], tmp_path / 'net.pth', base)
    status, out, err = run_main(['export', '--full', checkpoint, str(tmp_path / 'full.pth')])
    assert status == 0, err
    assert f"pretrained_model_path='{tmp_path / 'full.pth'}'" in out
    expected = scores_of(pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=checkpoint), images)
    os.remove(base)
    saved = _saved(tmp_path / 'full.pth')
    assert 'applies_to' not in saved and set(saved['params']) == set(runs['finetune']['after'])
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=str(tmp_path / 'full.pth'))
    assert torch.equal(scores_of(metric, images), expected)


def test_python_export_writes_the_model_folder_or_with_full_one_file(runs, tmp_path, images):
    assert pyiqa_grmp.export is export
    folder = pyiqa_grmp.export(runs['meta']['path'], tmp_path / 'folder')
    full = pyiqa_grmp.export(runs['meta']['path'], tmp_path / 'full', full=True)
    assert folder == str(tmp_path / 'folder') and full == str(tmp_path / 'full' / 'model.pth')
    scores = [scores_of(pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=p), images)
              for p in (runs['meta']['path'], folder, full)]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_python_export_of_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='gone.pth'):
        pyiqa_grmp.export(tmp_path / 'gone.pth', tmp_path / 'out')


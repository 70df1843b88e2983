"""Configs and options are data, bounded, and mismatches are refused: YAML bombs cost milliseconds and are refused
naming the file, override keys must exist, option values have their kinds, the experiment name is one folder name,
and a meta-training state of other prompt tensors is a ResumeError naming what differs. All before anything runs."""
import copy
import os
import re
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pyiqa.models import build_model

from grmp_test_utils import run_main, training_options
from pyiqa_grmp.adaptation import SplitPlan, build_options, read_override, set_option
from pyiqa_grmp.checkpointing import ResumeError, load_state
from pyiqa_grmp.data.labels import LabelledImages
from pyiqa_grmp.options import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, ConfigError, apply_override,
                                check_option_values, load_yaml, parse_override_value, parse_training_argv)

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
FINETUNE = CONFIGS / 'smoke' / 'finetune_synthetic.yml'
META = CONFIGS / 'smoke' / 'meta_pretrain_synthetic.yml'
#: Every bomb is refused within this many seconds and this much traced memory.
SECONDS, MEGABYTES = 2.0, 20


def billion_laughs(levels: int = 9) -> str:
    """Under 1 KB of YAML whose aliases of aliases stand for 9 ** levels strings."""
    lines = ['l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    lines += [f'l{i}: &l{i} [' + ', '.join([f'*l{i - 1}'] * 9) + ']' for i in range(1, levels)]
    return '\n'.join(lines) + '\n'


def run_train(workdir: Path, *argv: str) -> subprocess.CompletedProcess:
    """``pyiqa-grmp train ARGV`` from ``workdir``, in this process (a refusal happens before anything is built, so
    no process of its own is needed): its exit status and what it printed."""
    status, out, err = run_main(['train', *argv], workdir)
    return subprocess.CompletedProcess(['pyiqa-grmp', 'train', *argv], status, out, err)


def billion_laughs_config(folder: Path) -> Path:
    config = folder / 'laughs.yml'
    config.write_text(billion_laughs())
    return config


def escaping_config(folder: Path) -> Path:
    """A config named ``../victim`` (``experiments/../victim``: ``folder/victim``, which holds a file)."""
    (folder / 'victim').mkdir()
    (folder / 'victim' / 'keep.txt').write_text('mine')
    config = folder / 'escape.yml'
    config.write_text(FINETUNE.read_text().replace('name: smoke_finetune_synthetic', 'name: ../victim'))
    return config


@pytest.fixture(scope='module')
def commands(tmp_path_factory):
    """The four refused commands; ``commands[label]`` is (workdir, completed command)."""
    root = tmp_path_factory.mktemp('commands')
    folders = {label: root / label for label in ('bomb', 'typo', 'type', 'name')}
    for folder in folders.values():
        folder.mkdir()
    argv = {
        'bomb': ['-opt', str(billion_laughs_config(folders['bomb']))],
        'typo': ['-opt', str(FINETUNE), '--force_yml', 'train:optim:lrr=5'],
        'type': ['-opt', str(FINETUNE), '--force_yml', 'train:total_epoch=abc'],
        'name': ['-opt', str(escaping_config(folders['name']))],
    }
    return {label: (folders[label], run_train(folders[label], *args)) for label, args in argv.items()}


def _refused_quickly(path: Path) -> str:
    """load_yaml(path) must raise ConfigError within SECONDS (untraced) and MEGABYTES of traced memory; returns
    the message."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_yaml(str(path))
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError):
            load_yaml(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS and peak < MEGABYTES * 2 ** 20, (elapsed, peak)
    assert str(path) in str(error.value)
    return str(error.value)


def _finetune_options() -> dict:
    return yaml.safe_load(FINETUNE.read_text())


def _parse(tmp_path: Path, options: dict, *overrides: str) -> dict:
    config = tmp_path / 'config.yml'
    config.write_text(yaml.safe_dump(options, sort_keys=False))
    return parse_training_argv(['-opt', str(config), *(['--force_yml', *overrides] if overrides else [])])[0]


# ------------------------------------------------------------------------------------ through the command
def test_alias_bomb_is_refused_by_train_naming_the_file(commands):
    workdir, result = commands['bomb']
    config = workdir / 'laughs.yml'
    assert config.stat().st_size < 1024
    assert result.returncode == 2, result.stderr
    assert f'config {config} expands to more than {MAX_CONFIG_NODES:,} values' in result.stderr
    assert not (workdir / 'experiments').exists()


def test_typo_in_force_yml_is_refused_by_train_naming_the_section_keys(commands):
    workdir, result = commands['typo']
    assert result.returncode == 2, result.stderr
    assert "--force_yml 'train:optim:lrr=5': train.optim has no option 'lrr'; it has: type, lr" in result.stderr
    assert not (workdir / 'experiments').exists()


def test_wrong_type_is_refused_by_train_naming_option_and_kind(commands):
    workdir, result = commands['type']
    assert result.returncode == 2, result.stderr
    assert f"config {FINETUNE}: malformed option(s) ['train.total_epoch']" in result.stderr
    assert "train.total_epoch must be a whole number >= 0, got 'abc' (str)" in result.stderr
    assert 'invalid literal' not in result.stderr and not (workdir / 'experiments').exists()


def test_name_leaving_experiments_is_refused_by_train_and_touches_nothing(commands):
    workdir, result = commands['name']
    assert result.returncode == 2, result.stderr
    assert "malformed option(s) ['name']: name must be one folder name" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ['escape.yml', 'victim']  # nothing made or renamed
    assert [p.name for p in (workdir / 'victim').iterdir()] == ['keep.txt']


# ------------------------------------------------------------------------------------------- YAML bombs
def test_alias_bomb_is_refused_within_the_bounds(tmp_path):
    config = tmp_path / 'laughs.yml'
    config.write_text(billion_laughs())
    assert 'aliases counted as the copies they stand for' in _refused_quickly(config)


@pytest.mark.parametrize('text', ['a: &a [*a]\n', 'a: &a {b: [1, *a]}\n'], ids=['list', 'mapping'])
def test_recursive_alias_is_refused_within_the_bounds(tmp_path, text):
    config = tmp_path / 'loop.yml'
    config.write_text(text)
    assert 'recursive alias' in _refused_quickly(config)


def test_deep_nesting_is_refused_within_the_bounds(tmp_path):
    config = tmp_path / 'deep.yml'
    config.write_text('a: ' + '[' * 200_000 + ']' * 200_000 + '\n')  # overflows the C composer's stack unchecked
    assert f'deeper than {MAX_CONFIG_DEPTH} levels' in _refused_quickly(config)


def test_too_many_values_are_refused_within_the_bounds(tmp_path):
    config = tmp_path / 'wide.yml'
    config.write_text('a: [' + ','.join(['1'] * (MAX_CONFIG_NODES + 1)) + ']\n')
    assert config.stat().st_size < MAX_CONFIG_BYTES
    assert f'more than {MAX_CONFIG_NODES:,} values' in _refused_quickly(config)


def test_oversized_file_is_refused_within_the_bounds(tmp_path):
    config = tmp_path / 'big.yml'
    config.write_text('# padding\n' * (MAX_CONFIG_BYTES // 10 + 1))
    assert f'larger than {MAX_CONFIG_BYTES:,} bytes' in _refused_quickly(config)


def test_bomb_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match=r"--force_yml value '&a \[\*a\]'.*recursive alias"):
        parse_override_value('&a [*a]')


def test_bomb_in_an_adapt_override_file_is_refused_naming_it(tmp_path):
    override = tmp_path / 'override.yml'
    override.write_text(billion_laughs())
    with pytest.raises(ConfigError, match=f'config {override} expands'):
        read_override(str(override))


def test_ordinary_aliases_load_as_independent_copies(tmp_path):
    config = tmp_path / 'anchors.yml'
    config.write_text('base: &base {resize: 122, cache: {depth: 1}}\ntrain: *base\nval: {<<: *base, resize: 64}\n')
    loaded = load_yaml(str(config))
    assert loaded['train'] == {'resize': 122, 'cache': {'depth': 1}} and loaded['val']['resize'] == 64
    loaded['train']['cache']['depth'] = 2  # e.g. prepare_options setting each dataset's phase
    assert loaded['base']['cache']['depth'] == 1 and loaded['val']['cache']['depth'] == 1


# --------------------------------------------------------------------------------------- keys and names
@pytest.mark.parametrize('text, where', [
    ('datasets: {1: {type: FewShotNRDataset}}\n', 'under datasets there is the key 1 (int)'),
    ('path: {1: x}\n', 'under path there is the key 1 (int)'),
    ('true: 1\n', 'at the top level there is the key True (bool)'),
], ids=['datasets', 'path', 'top'])
def test_non_text_option_names_are_refused_naming_the_file(tmp_path, text, where):
    config = tmp_path / 'keys.yml'
    config.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f'config {config}: option names are text, but {where}')):
        load_yaml(str(config))


@pytest.mark.parametrize('name', ['/some/folder', '../x', 'a/b', 'a\\b', '.', '..', '', 'a\0b', 'a\nb', 7, None])
def test_experiment_name_must_be_one_folder_name(name):
    options = _finetune_options()
    options['name'] = name
    with pytest.raises(ConfigError, match=r"config c.yml: malformed option\(s\) \['name'\]"):
        check_option_values(options, 'config c.yml')


def test_missing_train_dataset_name_is_refused_naming_the_option(tmp_path):
    options = _finetune_options()
    del options['datasets']['train']['name']
    with pytest.raises(ConfigError, match=r"config .*config.yml: .*datasets.train.name is missing \(it must be text\)"):
        _parse(tmp_path, options)


# ---------------------------------------------------------------------------------------- option kinds
@pytest.mark.parametrize('override, message', [
    ('train:optim:lr=1e-3', "train.optim.lr must be a number >= 0, got '1e-3' (str) (YAML reads 1e-3 as text: "
                            'write !!float 1e-3'),
    ('datasets:train:batch_size_per_gpu=abc', 'datasets.train.batch_size_per_gpu must be a whole number >= 1'),
    ('datasets:train:num_shots=1.5', 'datasets.train.num_shots must be a whole number >= 1, got 1.5'),
    ('val:val_freq=0', 'val.val_freq must be a whole number >= 1, got 0'),
    ('manual_seed=abc', "manual_seed must be a whole number, got 'abc'"),
    ('num_gpu=two', "num_gpu must be a whole number >= 0 or auto, got 'two'"),
    ('logger:use_tb_logger=maybe', "logger.use_tb_logger must be true or false, got 'maybe'"),
    ('train=[1]', 'train must be a mapping, got [1] (list)'),
], ids=['lr-text', 'batch-text', 'shots-fraction', 'val_freq-zero', 'seed-text', 'num_gpu-text', 'flag-text',
        'train-list'])
def test_wrong_kind_is_refused_before_anything_is_built(tmp_path, override, message):
    with pytest.raises(ConfigError, match='malformed option') as error:
        _parse(tmp_path, _finetune_options(), override)
    assert message in str(error.value)


def test_whole_numbers_may_be_written_as_floats_as_in_pyiqa_configs(tmp_path):
    opt = _parse(tmp_path, _finetune_options(), 'val:val_freq=!!float 5e1', 'train:total_epoch=3.0')
    assert opt['val']['val_freq'] == 50.0 and opt['train']['total_epoch'] == 3.0


# ------------------------------------------------------------------------------------------- overrides
def test_force_yml_may_add_an_option_read_with_a_default():
    options = _finetune_options()
    assert 'amp' not in options['train'] and 'weight_decay' not in options['train']['optim']
    apply_override(options, 'train:amp=bf16')
    apply_override(options, 'train:optim:weight_decay=0.1')  # a parameter of the config's torch.optim.Adam
    assert options['train']['amp'] == 'bf16' and options['train']['optim']['weight_decay'] == 0.1


def test_force_yml_missing_section_names_the_sections_that_exist():
    with pytest.raises(ConfigError, match='option datasets.val_2 does not exist or is not a mapping; datasets has: '
                                          'train, val'):
        apply_override(_finetune_options(), 'datasets:val_2:name=x')


@pytest.fixture
def adapt_options():
    """The options adapt generates (cpu preset), before --set."""
    labels = LabelledImages(images=[f'/data/{i}.png' for i in range(60)], mos=np.linspace(1, 5, 60),
                            description='test', meta_info='/data/labels.csv', root='/data')
    plan = SplitPlan(num_shots=20, num_val=6, train_ratio=0.8, seed=0)
    options = build_options(labels, plan, 'cpu', '/weights/start.pth', 'cpu', 0)
    check_option_values(options, 'the options of adapt')
    return options


def test_adapt_set_accepts_the_options_users_set(adapt_options):
    for assignment in ('train:amp=bf16', 'train:total_epoch=30', 'val:val_freq=3', 'train:lr_plateau:patience=4'):
        set_option(adapt_options, assignment)
    assert adapt_options['train']['amp'] == 'bf16' and adapt_options['train']['total_epoch'] == 30
    assert adapt_options['val']['val_freq'] == 3 and adapt_options['train']['lr_plateau']['patience'] == 4


def test_adapt_set_refuses_a_typo_naming_the_section_keys(adapt_options):
    with pytest.raises(ConfigError, match="--set 'train:optim:lrr=5': train.optim has no option 'lrr'; it has: "
                                          'type, lr, weight_decay'):
        set_option(adapt_options, 'train:optim:lrr=5')


# ---------------------------------------------------------------------------------- meta-training states
@pytest.fixture(scope='module')
def meta_state(tmp_path_factory):
    """A tiny meta-training model and a training state it wrote (iteration 1)."""
    opt = training_options(META, tmp_path_factory.mktemp('meta'))
    opt['network']['backbone_pretrained'] = None
    model = build_model(opt)
    model.save(0, 1)
    return model, load_state(os.path.join(opt['path']['training_states'], '1.state'))


def _resume_with(model, state, change) -> str:
    state = copy.deepcopy(state)
    change(state['grmp']['model'])
    with pytest.raises(ResumeError) as error:
        model.resume_training(state)
    assert str(error.value).startswith('cannot resume from the training state of iteration 1: ')
    return str(error.value)


def test_meta_state_resumes_its_own_model(meta_state):
    model, state = meta_state
    model.resume_training(copy.deepcopy(state))
    assert all(torch.equal(a, b) for a, b in zip(model.theta, state['grmp']['model']['theta']))


def test_meta_state_with_fewer_theta_tensors_is_refused_naming_the_counts(meta_state):
    model, state = meta_state
    message = _resume_with(model, state, lambda extra: extra['theta'].pop())
    assert f'its theta holds {len(model.theta) - 1} tensors, this model has {len(model.theta)} prompt tensors' \
        in message


def test_meta_state_with_another_inner_shape_is_refused_naming_the_tensor(meta_state):
    model, state = meta_state

    def widen(extra):
        extra['inner'][0] = torch.zeros(*extra['inner'][0].shape[:-1], extra['inner'][0].shape[-1] + 1)

    message = _resume_with(model, state, widen)
    shape = tuple(model.prompt_params[0].shape)
    wider = (*shape[:-1], shape[-1] + 1)
    assert f'its inner differs from the prompt tensors of this model (1 of {len(model.theta)}): ' \
           f'{model.prompt_names[0]}: {wider} in the state, {shape} in the model' in message

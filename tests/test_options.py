"""Configs are data: a python tag in a YAML or code in a --force_yml key or value is refused before anything runs,
and pyiqa's config conventions (!!float, ~, key order, typed overrides) keep working."""
import os
from pathlib import Path

import pytest

from pyiqa_grmp.cli import main
from pyiqa_grmp.options import ConfigError, apply_override, load_yaml, parse_override_value

FINETUNE = Path(__file__).resolve().parent.parent / 'configs' / 'smoke' / 'finetune_synthetic.yml'


def _train(workdir, capsys, *argv):
    """``pyiqa-grmp train ARGV`` in ``workdir``: (exit status, stderr)."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        status = main(['train', *argv])
    finally:
        os.chdir(cwd)
    return status, capsys.readouterr().err


def test_python_tag_in_a_config_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / 'pwned'
    config = tmp_path / 'evil.yml'
    config.write_text(FINETUNE.read_text() + f'\nx: !!python/object/apply:os.system ["touch {marker}"]\n')
    status, err = _train(tmp_path, capsys, '-opt', str(config))
    assert status == 2
    assert 'is not plain YAML data (python tags are refused)' in err
    assert not marker.exists()


@pytest.mark.parametrize('override, message', [
    ('name"]+__import__("os").system("touch {marker}")#=x', 'is not a plain option name'),
    ('name=!!python/object/apply:os.system ["touch {marker}"]', 'is not plain YAML data'),
    # pyiqa evals a value starting with '['; here it is a list holding one string, and a list is no name
    ('name=[__import__("os").system("touch {marker}")]', "malformed option(s) ['name']"),
], ids=['code-in-key', 'python-tag-value', 'code-in-list-value'])
def test_code_in_force_yml_is_refused_and_runs_nothing(tmp_path, capsys, override, message):
    marker = tmp_path / 'pwned'
    status, err = _train(tmp_path, capsys, '-opt', str(FINETUNE), '--force_yml', override.format(marker=marker))
    assert not marker.exists()
    assert status == 2, err
    assert message in err


def test_pyiqa_yaml_conventions_load_as_data(tmp_path):
    config = tmp_path / 'c.yml'
    config.write_text('name: x\nlr: !!float 2e-3\nnothing: ~\nzeta: 1\nalpha: 2\n')
    loaded = load_yaml(str(config))
    assert loaded == {'name': 'x', 'lr': 0.002, 'nothing': None, 'zeta': 1, 'alpha': 2}
    assert list(loaded) == ['name', 'lr', 'nothing', 'zeta', 'alpha']


@pytest.mark.parametrize('text, value', [
    ('~', None), ('none', None), ('None', None), ('true', True), ('False', False), ('3', 3), ('0.5', 0.5),
    ('!!float 1e-3', 0.001), ('[1, 2]', [1, 2]), ('{a: 1}', {'a': 1}), ('some_name', 'some_name'),
])
def test_override_values_are_typed_as_pyiqa_does(text, value):
    assert parse_override_value(text) == value


def test_override_sets_a_nested_key_and_refuses_a_missing_parent():
    opt = {'train': {'optim': {'lr': 1}}}
    apply_override(opt, 'train:optim:lr=!!float 2e-4')
    apply_override(opt, 'train:total_epoch=5')
    assert opt == {'train': {'optim': {'lr': 0.0002}, 'total_epoch': 5}}
    with pytest.raises(ConfigError, match='option val does not exist'):
        apply_override(opt, 'val:val_freq=2')
    with pytest.raises(ConfigError, match='KEY:SUB=VALUE'):
        apply_override(opt, 'train:total_epoch')

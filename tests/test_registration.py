"""Registration with pyiqa: what `import pyiqa_grmp` does, and that it is idempotent."""
import importlib
import importlib.metadata
import json
import subprocess
import sys

import pyiqa
import pytest
import torch
from pyiqa.default_model_configs import DEFAULT_CONFIGS
from pyiqa.utils.registry import ARCH_REGISTRY

import pyiqa_grmp
from grmp_test_utils import subprocess_env
from pyiqa_grmp import registry


def test_grmp_iqa_is_listed_as_nr_metric():
    assert 'grmp_iqa' in pyiqa.list_models()
    assert 'grmp_iqa' in pyiqa.list_models(metric_mode='NR')
    assert 'grmp_iqa' not in pyiqa.list_models(metric_mode='FR')


def test_default_config_describes_the_metric():
    config = DEFAULT_CONFIGS['grmp_iqa']
    assert config['metric_opts']['type'] == 'GRMPIQA'
    assert config['metric_mode'] == 'NR'
    assert config['lower_better'] is False
    assert config['score_range'] == '0, 1'


def test_arch_resolves_through_pyiqa_registry():
    from pyiqa_grmp.archs.grmp_arch import GRMPIQA

    assert ARCH_REGISTRY.get('GRMPIQA') is GRMPIQA


def _our_registry_entries():
    """Per pyiqa registry, each of our names with where it is held (registered or lazy) and what it points at."""
    from pyiqa.utils import registry as pyiqa_registry

    entries = {}
    for group, types in registry.LAZY_TYPES.items():
        target = getattr(pyiqa_registry, f'{group.upper()}_REGISTRY')
        for name in types:
            held = [(kind, getattr(target, attribute)[name]) for kind, attribute in
                    (('registered', '_obj_map'), ('lazy', '_lazy_map')) if name in getattr(target, attribute)]
            entries[group, name] = held
    return entries


def test_registration_twice_and_reload_keep_one_entry_each_and_the_same_metric(tiny_checkpoint):
    from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo_tensor

    def score():
        metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=tiny_checkpoint,
                                     backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
        return metric(photo_tensor('astronaut', size=(224, 224)))

    before_score, before_entries = score(), _our_registry_entries()
    before_configs = {name: json.dumps(c, sort_keys=True, default=str) for name, c in DEFAULT_CONFIGS.items()}
    registry.register_all()
    registry.register_archs()
    importlib.reload(registry)
    importlib.reload(pyiqa_grmp)
    registry.register_all()
    entries = _our_registry_entries()
    assert all(len(held) == 1 for held in entries.values()), entries  # one entry per name, never two
    assert entries == before_entries
    assert {name: json.dumps(c, sort_keys=True, default=str) for name, c in DEFAULT_CONFIGS.items()} == before_configs
    assert pyiqa.list_models().count('grmp_iqa') == 1
    assert torch.equal(score(), before_score)


def test_entry_point_is_declared_and_callable():
    entry_points = importlib.metadata.entry_points(group='pyiqa.archs')
    ours = [ep for ep in entry_points if ep.value.startswith('pyiqa_grmp.')]
    assert [ep.value for ep in ours] == ['pyiqa_grmp.registry:register_archs']
    ours[0].load()()  # pyiqa calls it like this; it must not raise after import registered everything


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_pyiqa_entry_point_discovery_registers_without_import():
    # In a fresh interpreter that never imports pyiqa_grmp, querying the arch registry runs our entry point.
    out = _run_python('from pyiqa.utils.registry import ARCH_REGISTRY; import sys\n'
                      'print("GRMPIQA" in ARCH_REGISTRY, "pyiqa_grmp" in sys.modules)')
    assert out == 'True True'


def test_import_only_registers():
    # No model code, no open_clip, no environment change: registration only. pyiqa itself (through cv2 and
    # torch) sets a few variables when imported, so the snapshot is taken after importing it.
    code = ('import os, sys, json, pyiqa; before = dict(os.environ); import pyiqa_grmp\n'
            'print(json.dumps({"open_clip": "open_clip" in sys.modules,'
            ' "arch_module": "pyiqa_grmp.archs.grmp_arch" in sys.modules,'
            ' "env_changed": dict(os.environ) != before}))')
    assert json.loads(_run_python(code)) == {'open_clip': False, 'arch_module': False, 'env_changed': False}


@pytest.mark.parametrize('module', ['clipiqa_arch', 'liqe_arch', 'qualiclip_arch'])
def test_pyiqa_clip_metric_modules_import(module):
    # They import `clip`, which needs pkg_resources (setuptools < 81); our install must keep them working.
    importlib.import_module(f'pyiqa.archs.{module}')


def test_benchmark_config_names_the_arch_and_only_its_options():
    import inspect
    from pathlib import Path

    import yaml

    from pyiqa_grmp.archs.grmp_arch import GRMPIQA

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / 'configs/benchmark_metric_opts.yml').read_text())
    accepted = set(inspect.signature(GRMPIQA).parameters)
    for entry in config.values():
        options = dict(entry['metric_opts'])
        assert ARCH_REGISTRY.get(options.pop('type')) is GRMPIQA
        assert set(options) <= accepted
        assert entry['metric_mode'] == 'NR'


@pytest.mark.parametrize('name, module', [('compare', 'comparison'), ('adapt', 'adaptation'), ('train', 'training'),
                                          ('run_protocol', 'training'), ('score', 'api')])
def test_api_functions_stay_functions_once_their_modules_are_imported(name, module):
    importlib.import_module(f'pyiqa_grmp.{module}')  # binds pyiqa_grmp.<module>, which must not be pyiqa_grmp.<name>
    function = getattr(pyiqa_grmp, name)
    assert callable(function) and function.__name__ == name and function.__module__ == f'pyiqa_grmp.{module}'

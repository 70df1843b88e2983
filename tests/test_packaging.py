"""Packaging: the wheel ships the paper's settings, and install_requires is exactly what the code imports."""
import ast
import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {'sklearn': 'scikit-learn', 'skimage': 'scikit-image', 'PIL': 'pillow', 'yaml': 'pyyaml',
                   'open_clip': 'open_clip_torch'}
#: Declared only to pin what pyiqa needs to versions that work with ours (torchvision must match torch;
#: pyiqa's CLIP metrics import pkg_resources, gone in setuptools 81).
PINS_ONLY = {'torchvision', 'setuptools'}


def _install_requires():
    setup = configparser.ConfigParser()
    setup.read(ROOT / 'setup.cfg')
    lines = [line.strip() for line in setup['options']['install_requires'].splitlines()]
    return {re.match(r'[A-Za-z0-9_.-]+', line).group(0).lower(): line for line in lines
            if line and not line.startswith('#')}


def _third_party_imports(folder):
    names = set()
    for path in folder.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split('.')[0])
    local = {'pyiqa_grmp', 'grmp_test_utils', 'official_grmp_reference', 'common', 'conftest'}
    return {DISTRIBUTION_OF.get(name, name).lower() for name in names - set(sys.stdlib_module_names) - local}


@pytest.mark.skipif(not hasattr(sys, 'stdlib_module_names'), reason='needs Python >= 3.10 to tell the stdlib apart')
def test_every_import_of_the_package_is_declared_and_every_declared_one_is_used():
    declared = _install_requires()
    package = _third_party_imports(ROOT / 'pyiqa_grmp')
    assert package - set(declared) == set(), 'imported but not in install_requires'
    used = package | _third_party_imports(ROOT / 'tests') | _third_party_imports(ROOT / 'benchmarks')
    assert set(declared) - used - PINS_ONLY == set(), 'in install_requires but imported nowhere'


def test_tested_ranges_are_pinned():
    declared = _install_requires()
    assert declared['pyiqa'] == 'pyiqa>=0.1.16,<0.2' and declared['open_clip_torch'] == 'open_clip_torch>=3.3,<4'
    assert declared['torch'] == 'torch>=2.5' and declared['torchvision'] == 'torchvision>=0.20'


def test_wheel_ships_presets_paper_yml(tmp_path):
    """Built from a copy of the sources (the working tree stays clean); takes a few seconds."""
    source = tmp_path / 'src'
    shutil.copytree(ROOT / 'pyiqa_grmp', source / 'pyiqa_grmp', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'wheel'), str(source)], check=True, timeout=120, capture_output=True)
    (wheel,) = (tmp_path / 'wheel').glob('pyiqa_grmp-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert 'pyiqa_grmp/presets/paper.yml' in names and 'pyiqa_grmp/presets/__init__.py' in names
        assert archive.read('pyiqa_grmp/presets/paper.yml') == (ROOT / 'pyiqa_grmp/presets/paper.yml').read_bytes()

"""The Python API (pyiqa_grmp.score / compare / adapt / train / run_protocol): the command line's power, names and
defaults, errors in the API's words, and an import that stays registration only."""
import argparse
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import pyiqa_grmp
from grmp_test_utils import photo
from pyiqa_grmp.adaptation import plan_split
from pyiqa_grmp.data.labels import LabelledImages
from pyiqa_grmp.cli import build_parser, main

SMOKE_FINETUNE = Path(__file__).resolve().parent.parent / 'configs' / 'smoke' / 'finetune_synthetic.yml'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Three small photos and one file that is not an image."""
    folder = tmp_path_factory.mktemp('api')
    for name in ('astronaut', 'coffee', 'chelsea'):
        Image.fromarray(photo(name)[:96, :128]).save(folder / f'{name}.png')
    (folder / 'broken.png').write_text('not an image')
    return folder


def test_score_returns_one_row_per_image_with_a_column_per_metric_and_the_errors(folder):
    frame = pyiqa_grmp.score(folder, ['entropy'], device='cpu', workers=0, progress=False)
    assert frame.columns.tolist() == ['image', 'entropy', 'error']
    assert frame['image'].tolist() == [str(folder / n) for n in ('astronaut.png', 'broken.png', 'chelsea.png',
                                                                  'coffee.png')]
    broken = frame.set_index('image').loc[str(folder / 'broken.png')]
    assert math.isnan(broken['entropy']) and 'cannot read image' in broken['error']
    scored = frame[frame['image'] != str(folder / 'broken.png')]
    assert (scored['entropy'] > 0).all() and (scored['error'] == '').all()


def test_score_frame_equals_the_csv_of_the_command(folder, tmp_path):
    assert main(['score', 'entropy', '-t', str(folder), '--csv', str(tmp_path / 'cli.csv'), '--device', 'cpu']) == 1
    cli = pd.read_csv(tmp_path / 'cli.csv', keep_default_na=False, na_values=[''])
    frame = pyiqa_grmp.score(str(folder), 'entropy', device='cpu', progress=False)
    assert frame['image'].tolist() == cli['image'].tolist()
    assert np.allclose(frame['entropy'], cli['entropy'], rtol=1e-5, equal_nan=True)  # the CSV keeps 6 digits
    assert frame['error'].tolist() == cli['errors'].fillna('').tolist()


def test_train_from_a_dict_returns_the_experiment_and_its_best_checkpoint(synthetic_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic_workdir)  # the smoke config's data paths are relative to it
    options = yaml.safe_load(SMOKE_FINETUNE.read_text())
    given = json.dumps(options)
    result = pyiqa_grmp.train(options, ['datasets:train:num_shots=8', 'train:total_epoch=2', 'val:val_freq=1',
                                        'name=api_dict_run'], root_path=str(tmp_path))
    assert isinstance(result, pyiqa_grmp.TrainResult)
    assert result.experiment_dir == str(tmp_path / 'experiments' / 'api_dict_run')
    assert result.best_checkpoint == os.path.join(result.experiment_dir, 'models', 'net_best.pth')
    assert os.path.isfile(result.best_checkpoint) and os.path.isfile(result.latest_checkpoint)
    assert 'srcc' in result.best['synthetic_val'] and os.path.isfile(result.curves)
    assert json.dumps(options) == given  # the caller's options are left as they were


#: (command, API function) pairs whose shared defaults must agree, and the defaults allowed to differ, with why.
API_OF_COMMAND = [('score', 'pyiqa_grmp.api:score'), ('compare', 'pyiqa_grmp.comparison:compare'),
                  ('adapt', 'pyiqa_grmp.adaptation:adapt'), ('train', 'pyiqa_grmp.training:train'),
                  ('protocol', 'pyiqa_grmp.training:run_protocol'), ('demo', 'pyiqa_grmp.demo:run_demo'),
                  ('make-synthetic', 'pyiqa_grmp.data.synthetic:make_synthetic_dataset')]
DIFFERENT_ON_PURPOSE = {('compare', 'out_dir')}  # the command always writes its files; the function only when asked


def _function(path):
    import importlib

    module, name = path.split(':')
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize('command, function', API_OF_COMMAND)
def test_command_defaults_are_the_api_defaults(command, function):
    parameters = inspect.signature(_function(function)).parameters
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shared = [a for a in subparsers.choices[command]._actions if a.dest in parameters
              and parameters[a.dest].default is not inspect.Parameter.empty]
    assert shared, 'the command shares no argument with its function'
    for action in shared:
        if (command, action.dest) in DIFFERENT_ON_PURPOSE:
            continue
        default = parameters[action.dest].default
        cli_default = tuple(action.default) if isinstance(action.default, list) else action.default
        assert cli_default == (tuple(default) if isinstance(default, list) else default), action.dest


def test_api_errors_name_the_argument_and_the_command_its_flag(folder, capsys):
    with pytest.raises(ValueError, match=r'^metric_options names metrics that are not scored'):
        pyiqa_grmp.score(folder, ['entropy'], metric_options={'piqe': {}}, progress=False)
    assert main(['score', 'entropy', '-t', str(folder), '--metric-opt', 'piqe:x=1']) == 2
    assert 'pyiqa-grmp score: error: --metric-opt names metrics that are not scored' in capsys.readouterr().err


def test_adapt_errors_in_library_words_become_flags_on_the_command_line(tmp_path, capsys):
    labels = LabelledImages(images=[f'{i}.png' for i in range(60)], mos=np.linspace(1, 5, 60), description='test',
                            meta_info='labels.csv', root='.')
    with pytest.raises(ValueError, match=r'^shots must be a number or "all"'):
        plan_split(labels, shots='many')
    pd.DataFrame({'image': labels.images, 'mos': labels.mos}).to_csv(tmp_path / 'labels.csv', index=False)
    assert main(['adapt', '--meta-info', str(tmp_path / 'labels.csv'), '--root', str(tmp_path), '--out',
                 str(tmp_path / 'run'), '--shots', 'many']) == 2
    assert 'pyiqa-grmp adapt: error: --shots must be a number or "all"' in capsys.readouterr().err


def test_refused_resume_csv_names_the_arguments_from_python_and_their_flags_on_the_command_line(folder, tmp_path,
                                                                                              capsys):
    import pickle

    from pyiqa_grmp.errors import InvalidArgument

    out_csv = tmp_path / 'scores.csv'
    out_csv.write_text('image,reference,piqe,errors\r\n')
    with pytest.raises(InvalidArgument) as refused:
        pyiqa_grmp.score(folder, ['entropy'], csv_path=str(out_csv), resume=True, workers=0, progress=False)
    assert str(refused.value) == (f"csv_path {out_csv} was written for the metrics ['piqe'], not ['entropy']: give "
                                  'another csv_path, or drop resume to overwrite it')
    assert str(pickle.loads(pickle.dumps(refused.value))) == str(refused.value)  # as rank 0 broadcasts it
    assert main(['score', 'entropy', '-t', str(folder), '--csv', str(out_csv), '--resume']) == 2
    assert (f"pyiqa-grmp score: error: --csv {out_csv} was written for the metrics ['piqe'], not ['entropy']: give "
            'another --csv, or drop --resume to overwrite it') in capsys.readouterr().err


def test_full_reference_metric_without_references_names_the_argument_and_the_flag(folder):
    frame = pyiqa_grmp.score(folder, ['psnr'], device='cpu', workers=0, progress=False)
    assert frame['psnr'].isna().all()
    assert 'full-reference metric: give reference images (ref; -r on the command line)' in frame['error'][0]


def test_stopped_training_says_how_to_continue_in_the_words_of_python_and_of_the_command():
    import pickle
    import signal

    from pyiqa_grmp.training import TrainingInterrupted

    stopped = TrainingInterrupted(signal.SIGTERM, 4, '/runs/x/training_states/4.state')
    assert str(stopped) == ('training stopped by SIGTERM after iteration 4; training state written to '
                            '/runs/x/training_states/4.state; continue with auto_resume=True')
    assert stopped.worded('--auto_resume').endswith('; continue with --auto_resume')
    assert str(pickle.loads(pickle.dumps(stopped))) == str(stopped)


HEAVY_MODULES = ('pandas', 'matplotlib', 'open_clip', 'scipy', 'ray')


@pytest.fixture(scope='module')
def fresh_interpreter():
    """One fresh interpreter (of this tree): the heavy modules it has imported after ``import pyiqa_grmp`` and ``import pyiqa_grmp.ray``
    (MetricScorer), then
    after ``pyiqa-grmp list --mode NR`` run in it (which imports the package first anyway), and what that printed."""
    from grmp_test_utils import subprocess_env

    snapshot = f'print("loaded:", json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]), file=sys.stderr)'
    probe = '\n'.join(['import json, sys', 'import pyiqa_grmp', 'import pyiqa_grmp.ray', snapshot, 'from pyiqa_grmp.cli import main',
                       'assert main(["list", "--mode", "NR"]) == 0', snapshot])
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=300,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    after_import, after_list = (json.loads(line[len('loaded:'):]) for line in result.stderr.splitlines()
                                if line.startswith('loaded:'))
    return {'import': after_import, 'list': after_list, 'list_output': result.stdout}


def test_import_of_the_package_and_its_ray_module_loads_no_api_module_nor_ray(fresh_interpreter):
    loaded = fresh_interpreter['import']
    assert 'pandas' not in loaded and 'matplotlib' not in loaded and 'ray' not in loaded


def test_list_command_imports_neither_pandas_nor_matplotlib_nor_open_clip(fresh_interpreter):
    assert 'grmp_iqa' in fresh_interpreter['list_output'].split()
    assert not {'pandas', 'matplotlib', 'open_clip'} & set(fresh_interpreter['list'])

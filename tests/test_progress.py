"""What a training run shows and keeps: its log file, its console lines and bar, its time estimate, the archived
experiment folder, and bf16 training."""
import contextlib
import io
import json
import math
import os
import re
import types
from pathlib import Path

import pyiqa
import torch
import yaml
from pyiqa.utils import get_root_logger

import pyiqa_grmp
from pyiqa_grmp.progress import MessageLogger, TrainingProgress, run_log, trainable_line

SMOKE_FINETUNE = Path(__file__).resolve().parent.parent / 'configs' / 'smoke' / 'finetune_synthetic.yml'


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_run_in_one_process_writes_its_own_log_file(tmp_path):
    for run in ('first', 'second'):
        with run_log(str(tmp_path / f'{run}.log')) as logger:
            logger.info(f'options of the {run} run')
    assert (tmp_path / 'first.log').read_text().count('options of the') == 1
    assert 'options of the second run' in (tmp_path / 'second.log').read_text()


def test_run_log_sends_info_and_frozen_parameter_lines_to_the_file_only(tmp_path, capsys):
    before = list(get_root_logger().handlers)
    with run_log(str(tmp_path / 'run.log')) as logger:
        logger.info('Network: a long architecture dump')
        logger.warning('Params clip.visual.conv1.weight will not be optimized.')
        logger.warning('semantic gradient overflowed')
    console = capsys.readouterr().err
    assert 'semantic gradient overflowed' in console
    assert 'Network:' not in console and 'will not be optimized' not in console
    text = (tmp_path / 'run.log').read_text()
    assert 'Network: a long architecture dump' in text and 'clip.visual.conv1.weight will not be optimized' in text
    assert get_root_logger().handlers == before  # pyiqa's handlers are back, ours closed


def test_trainable_line_counts_parameters_and_names_blocks_as_ranges():
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    net.head = torch.nn.Linear(2, 1)
    for block in net.blocks[:2]:
        block.requires_grad_(False)
    assert trainable_line(net) == 'trainable: 15 of 27 parameters (blocks.2-3, head)'


def test_message_logger_time_estimate_is_never_negative_after_a_resume(monkeypatch):
    opt = {'name': 'run', 'logger': {'print_freq': 1, 'use_tb_logger': False}, 'train': {'total_iter': 10}}
    logger = MessageLogger(opt, first_iter=7, total_iter=10)  # resumed at iteration 6
    messages = []
    monkeypatch.setattr(logger, 'logger', types.SimpleNamespace(info=messages.append))
    logger.start_time -= 40  # four iterations, 10 s each
    logger({'epoch': 0, 'iter': 10, 'lrs': [1e-3], 'time': 10.0, 'data_time': 0.0})
    assert '[eta: 0:00:00,' in messages[0]
    logger({'epoch': 0, 'iter': 8, 'lrs': [1e-3], 'time': 10.0, 'data_time': 0.0})  # 2 done in 40 s, 2 left
    assert '[eta: 0:00:40,' in messages[1]


def test_without_a_terminal_each_validation_prints_one_line():
    stream = io.StringIO()
    progress = TrainingProgress('adapt', total=12, start=0, stream=stream)
    for iteration in range(1, 5):
        progress.step(iteration, {'l_quality': 0.61, 'train_metrics/srcc': 0.2}, lr=1e-3)
        if iteration % 2 == 0:
            progress.validated(iteration, {'val': {'srcc': 0.5 + iteration / 100, 'plcc': 0.4}},
                               {'val': {'srcc': {'val': 0.52, 'iter': 2}}})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r'adapt: iter 4/12  elapsed 0:00:00  remaining 0:00:00  l_quality 0\.6100  lr 1\.00e-03  '
                        r'val srcc 0\.5400 \(best 0\.5200 at 2\)', lines[1]), lines[1]


def test_on_a_terminal_a_bar_shows_iterations_losses_and_the_last_validation():
    stream = _Terminal()
    progress = TrainingProgress('adapt', total=12, start=4, stream=stream)  # resumed at iteration 4
    progress.step(5, {'l_quality': 0.61, 'l_scene': 2.2})
    progress.validated(6, {'val': {'srcc': 0.7}}, {'val': {'srcc': {'val': 0.7, 'iter': 6}}})
    progress.step(6, {'l_quality': 0.6, 'l_scene': 2.1})
    progress.close()
    last = stream.getvalue().split('\r')[-1]
    assert 'adapt' in last and '6/12' in last and '<' in last  # elapsed<remaining
    assert 'l_quality 0.6000' in last and 'val srcc 0.7000 (best 0.7000 at 6)' in last


def _experiment_opt(root) -> dict:
    experiments = os.path.join(str(root), 'experiments', 'mine')
    paths = {name: os.path.join(experiments, name) for name in ('models', 'training_states', 'visualization')}
    return {'name': 'mine', 'rank': 0, 'is_train': True, 'root_path': str(root), 'logger': {},
            'path': {'experiments_root': experiments, 'log': experiments, **paths}}


def test_an_existing_experiment_folder_is_archived_and_both_folders_named(tmp_path, capsys):
    from pyiqa_grmp.training import _start_experiment

    opt = _experiment_opt(tmp_path)
    os.makedirs(opt['path']['models'])
    Path(opt['path']['models'], 'net_best.pth').write_bytes(b'old run')
    archived = _start_experiment(opt, types.SimpleNamespace(opt='mine.yml'), resumed=False)
    captured = capsys.readouterr()
    assert archived is not None and Path(archived, 'models', 'net_best.pth').read_bytes() == b'old run'
    assert f'moved {opt["path"]["experiments_root"]} to {archived}' in captured.err
    assert 'Path already exists' not in captured.out  # pyiqa's own line is replaced by ours
    assert not os.listdir(opt['path']['models'])


def test_bf16_training_runs_and_writes_a_checkpoint_that_scores(synthetic_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic_workdir)
    options = yaml.safe_load(SMOKE_FINETUNE.read_text())
    few = [f'datasets:{phase}:{key}={value}' for phase in ('train', 'val') for key, value in (('num_shots', 4),
                                                                                           ('num_val', 4))]
    result = pyiqa_grmp.train(options, [*few, 'train:total_epoch=3', 'val:val_freq=3', 'train:amp=bf16',
                                        'name=bf16_run'], root_path=str(tmp_path), progress=False)
    records = [json.loads(line) for line in Path(result.experiment_dir, 'metrics.jsonl').read_text().splitlines()]
    losses = [r[key] for r in records if r['kind'] == 'train' for key in ('l_quality', 'l_scene')]
    assert len(losses) == 6 and all(value is not None and math.isfinite(value) for value in losses)
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=result.best_checkpoint)
    with torch.no_grad():
        scores = metric(torch.rand(2, 3, 122, 122))
    assert torch.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert result.log_file and 'amp: bf16' in Path(result.log_file).read_text()


def test_train_without_amp_trains_in_fp32(synthetic_workdir):
    from pyiqa.models import build_model

    from grmp_test_utils import training_options

    model = build_model(training_options(SMOKE_FINETUNE, synthetic_workdir))
    assert model.amp is None and isinstance(model._autocast(), contextlib.nullcontext)

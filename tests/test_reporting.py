"""Reporting: the metrics log of every training run, curves.png, bootstrap intervals, atomic writes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from pyiqa_grmp.metrics_log import MetricsLog, read_metrics
from pyiqa_grmp.checkpointing import write_atomically
from pyiqa_grmp.reporting import plot_curves
from pyiqa_grmp.stats import bootstrap_gain_intervals, bootstrap_indices, bootstrap_intervals, correlation_values
from pyiqa_grmp.training import train

CONFIG = Path(__file__).resolve().parent.parent / 'configs' / 'smoke' / 'finetune_synthetic.yml'


@pytest.fixture(scope='module')
def short_run(synthetic_workdir):
    """`pyiqa-grmp train` for 4 one-step epochs (8 shots), validating every 2 iterations."""
    cwd = os.getcwd()
    os.chdir(synthetic_workdir)
    try:
        best = train(str(CONFIG), ['datasets:train:num_shots=8', 'train:total_epoch=4', 'val:val_freq=2',
                                   'logger:save_checkpoint_freq=100', 'name=curves_run'],
                     root_path=str(synthetic_workdir)).best
    finally:
        os.chdir(cwd)
    return {'best': best, 'folder': synthetic_workdir / 'experiments' / 'curves_run'}


def test_train_run_logs_every_step_with_losses_lr_and_epoch(short_run):
    records = read_metrics(str(short_run['folder'] / 'metrics.jsonl'))
    steps = [r for r in records if r['kind'] == 'train']
    assert [r['iter'] for r in steps] == [1, 2, 3, 4]
    assert [r['epoch'] for r in steps] == [0, 1, 2, 3]  # one iteration per epoch with 8 shots in one batch
    assert all(r['lr'] == pytest.approx(2e-3) for r in steps)
    assert all(np.isfinite(r['l_quality']) and np.isfinite(r['l_scene']) for r in steps)


def test_train_run_logs_validations_matching_the_best_checkpoint(short_run):
    records = read_metrics(str(short_run['folder'] / 'metrics.jsonl'))
    validations = [r for r in records if r['kind'] == 'val']
    assert [r['iter'] for r in validations][:2] == [2, 4]
    assert all(r['dataset'] == 'synthetic_val' and {'srcc', 'plcc'} <= set(r) for r in validations)
    kept = [r for r in validations if r['improved']][-1]
    best = short_run['best']['synthetic_val']
    assert kept['srcc'] == pytest.approx(best['srcc']['val']) and kept['iter'] == best['srcc']['iter']


def test_train_run_draws_curves_png(short_run):
    with Image.open(short_run['folder'] / 'curves.png') as image:
        assert image.format == 'PNG' and image.width > 800


def test_read_metrics_keeps_the_last_record_of_a_repeated_iteration(tmp_path):
    log = MetricsLog(str(tmp_path / 'metrics.jsonl'))
    for it, loss in [(1, 1.0), (2, 0.9), (3, 0.8), (2, 0.5), (3, 0.4)]:  # resumed from iteration 1
        log.log({'kind': 'train', 'iter': it, 'epoch': 0, 'lr': 0.1, 'l_quality': loss})
    log.log({'kind': 'val', 'iter': 2, 'epoch': 0, 'lr': 0.1, 'dataset': 'v', 'srcc': 0.3, 'improved': True})
    records = read_metrics(str(tmp_path / 'metrics.jsonl'))
    assert [(r['kind'], r['iter'], r.get('l_quality')) for r in records] == [
        ('train', 1, 1.0), ('train', 2, 0.5), ('val', 2, None), ('train', 3, 0.4)]


def test_read_metrics_warns_about_a_line_cut_short(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(json.dumps({'kind': 'train', 'iter': 1, 'l_quality': 1.0}) + '\n{"kind": "tra')
    with pytest.warns(UserWarning, match='1 line'):
        assert len(read_metrics(str(path))) == 1


def test_metrics_log_writes_nan_as_null(tmp_path):
    MetricsLog(str(tmp_path / 'm.jsonl')).log({'kind': 'val', 'iter': 1, 'srcc': np.float64('nan')})
    assert json.loads((tmp_path / 'm.jsonl').read_text())['srcc'] is None


def test_plot_curves_of_a_log_without_validation(tmp_path):
    log = MetricsLog(str(tmp_path / 'metrics.jsonl'))
    for it in (1, 2, 3):
        log.log({'kind': 'train', 'iter': it, 'epoch': 0, 'lr': 0.1 / it, 'l_support': 1.0 / it})
    plot_curves(str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'curves.png'))
    assert Image.open(tmp_path / 'curves.png').format == 'PNG'


def test_correlations_equal_scipy_with_ties():
    rng = np.random.default_rng(0)
    pred = np.round(rng.normal(size=40), 1)
    mos = pred + rng.normal(size=40)
    values = correlation_values(pred, mos)
    assert values['srcc'] == pytest.approx(stats.spearmanr(pred, mos)[0])
    assert values['plcc'] == pytest.approx(stats.pearsonr(pred, mos)[0])
    assert values['krcc'] == pytest.approx(stats.kendalltau(pred, mos)[0])


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    widths = []
    for count in (30, 300):
        pred = rng.normal(size=count)
        mos = pred + rng.normal(size=count)
        low, high = bootstrap_intervals(pred, mos, bootstrap_indices(count, 500, seed=0))['srcc']
        assert low < correlation_values(pred, mos)['srcc'] < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_paired_gain_interval_excludes_zero_for_a_clearly_better_model():
    rng = np.random.default_rng(2)
    mos = rng.normal(size=60)
    good, bad = mos + 0.3 * rng.normal(size=60), rng.normal(size=60)
    low, high = bootstrap_gain_intervals(bad, good, mos, bootstrap_indices(60, 500, seed=0))['srcc']
    assert 0 < low < high


def test_write_atomically_leaves_no_temporary_file(tmp_path):
    write_atomically(str(tmp_path / 'a.txt'), 'one')
    write_atomically(str(tmp_path / 'a.txt'), b'two')
    assert (tmp_path / 'a.txt').read_text() == 'two' and os.listdir(tmp_path) == ['a.txt']

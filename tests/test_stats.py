"""pyiqa_grmp.stats: SRCC / PLCC / KRCC against scipy, the logistic PLCC, bootstrap intervals; and the one
function that predicts a checkpoint on a split (pyiqa_grmp.evaluation) against the path it replaced."""
import numpy as np
import pytest
import torch
from PIL import Image
from pyiqa.archs import build_network
from scipy import stats as scipy_stats

from grmp_test_utils import tiny_model_kwargs
from pyiqa_grmp.adaptation import predict_test_split
from pyiqa_grmp.data.fewshot_dataset import FewShotNRDataset
from pyiqa_grmp.evaluation import evaluate_checkpoint, predict_checkpoint
from pyiqa_grmp.models.base_model import predict_loader
from pyiqa_grmp.stats import (KENDALL_PAIRWISE_MAX, bootstrap_gain_intervals, bootstrap_indices, bootstrap_intervals,
                              correlation_values, fit_logistic, krcc, logistic_4, logistic_plcc, plcc, srcc)

SCIPY = {'srcc': scipy_stats.spearmanr, 'plcc': scipy_stats.pearsonr, 'krcc': scipy_stats.kendalltau}


def _pair(count, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    mos = rng.normal(size=count)
    pred = mos + rng.normal(scale=0.7, size=count)
    return (np.round(pred, 1), np.round(mos, 1)) if ties else (pred, mos)


# ------------------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize('count', [12, KENDALL_PAIRWISE_MAX + 40])
@pytest.mark.parametrize('ties', [False, True])
def test_coefficients_equal_scipy(count, ties):
    pred, mos = _pair(count, ties=ties)
    values = correlation_values(pred, mos)
    for name, function in SCIPY.items():
        assert values[name] == pytest.approx(function(pred, mos)[0], abs=1e-12)
    assert (srcc(pred, mos), plcc(pred, mos), krcc(pred, mos)) == (values['srcc'], values['plcc'], values['krcc'])


def test_constant_input_gives_nan():
    values = correlation_values(np.ones(10), np.arange(10.0))
    assert all(np.isnan(value) for value in values.values())


# ----------------------------------------------------------------------------------------- logistic PLCC
def test_logistic_fit_recovers_a_logistic_relation():
    scores = np.linspace(0, 20, 30)
    mos = logistic_4(scores, 90.0, 10.0, 10.0, 3.0)
    value, params = logistic_plcc(scores, mos)
    assert value == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(logistic_4(scores, *params), mos, atol=1e-3)


def test_logistic_plcc_is_negative_for_a_metric_that_ranks_backwards():
    scores = np.linspace(0, 20, 30)
    value, _ = logistic_plcc(scores, logistic_4(-scores, 90.0, 10.0, -10.0, 3.0))
    assert value == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize('pred, message', [(np.arange(3.0), 'at least 4 images'), (np.full(8, 0.5), 'constant')])
def test_logistic_fit_says_why_it_cannot_fit(pred, message):
    with pytest.raises(ValueError, match=message):
        fit_logistic(pred, np.arange(float(len(pred))))


# --------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_indices_are_reproducible_by_seed():
    first, again, other = (bootstrap_indices(30, 100, seed) for seed in (7, 7, 8))
    assert first.shape == (100, 30) and first.min() >= 0 and first.max() < 30
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_bootstrap_intervals_are_percentiles_of_the_resampled_coefficients():
    pred, mos = _pair(40, seed=1)
    indices = bootstrap_indices(40, 200, seed=0)
    intervals = bootstrap_intervals(pred, mos, indices)
    for name, function in SCIPY.items():
        values = [function(pred[rows], mos[rows])[0] for rows in indices]
        assert intervals[name] == pytest.approx((np.percentile(values, 2.5), np.percentile(values, 97.5)), abs=1e-9)


def test_bootstrap_intervals_are_the_same_for_the_same_seed():
    pred, mos = _pair(40, seed=2)
    assert (bootstrap_intervals(pred, mos, bootstrap_indices(40, 300, seed=4)) ==
            bootstrap_intervals(pred, mos, bootstrap_indices(40, 300, seed=4)))


def test_paired_gain_of_a_model_against_itself_is_zero():
    pred, mos = _pair(30, seed=3)
    gains = bootstrap_gain_intervals(pred, pred, mos, bootstrap_indices(30, 100, seed=0))
    assert all(interval == (0.0, 0.0) for interval in gains.values())


# -------------------------------------------------------------------------------- predicting a checkpoint
@pytest.fixture(scope='module')
def toy_test_split(tmp_path_factory):
    """A few-shot test split of 12 small images with MOS 0..59."""
    import pandas as pd

    root = tmp_path_factory.mktemp('split')
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f'img{i:02d}.png')
    pd.DataFrame({'image': [f'img{i:02d}.png' for i in range(60)], 'mos': np.arange(60.0)}).to_csv(
        root / 'meta.csv', index=False)
    return {'name': 'toy', 'type': 'FewShotNRDataset', 'dataroot_target': str(root),
            'meta_info_file': str(root / 'meta.csv'), 'num_shots': 10, 'split_seed': 1, 'phase': 'test',
            'resize': 32, 'cache_images': False}


@pytest.fixture(scope='module')
def network_opt():
    kwargs = tiny_model_kwargs()
    kwargs.pop('pretrained')
    return {'type': 'GRMPIQA', **kwargs}


def _predicted_as_before(network_opt, checkpoint, dataset_opt, batch_size):
    """The path both predictors took before they were one: build, load, loader, predict_loader."""
    net = build_network(dict(network_opt, pretrained=True, pretrained_model_path=checkpoint)).eval()
    dataset = FewShotNRDataset(dict(dataset_opt))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return dataset, predict_loader(net, loader, 'cpu')


def test_evaluate_checkpoint_gives_the_numbers_of_before(network_opt, tiny_checkpoint, toy_test_split):
    _, before = _predicted_as_before(network_opt, tiny_checkpoint, toy_test_split, 16)
    result = evaluate_checkpoint(network_opt, tiny_checkpoint, toy_test_split)
    assert result['num_test'] == len(before['mos']) == 12
    pred, mos = before['pred'].astype(float), before['mos'].astype(float)
    for name, function in SCIPY.items():  # scipy in float64: given float32 scores, its pearsonr computes in float32
        assert result[name] == pytest.approx(function(pred, mos)[0], abs=1e-12)
        assert result[name] == pytest.approx(function(before['pred'], before['mos'])[0], abs=1e-6)


def test_adapt_test_split_predictions_are_those_of_before(network_opt, tiny_checkpoint, toy_test_split):
    dataset, before = _predicted_as_before(network_opt, tiny_checkpoint, toy_test_split, 32)
    options = {'network': network_opt, 'datasets': {'val': dict(toy_test_split, name='val', phase='val')}}
    now = predict_test_split(options, tiny_checkpoint, 'cpu')
    assert np.array_equal(now['pred'], before['pred'].astype(float))
    assert np.array_equal(now['mos'], dataset.raw_mos)
    assert now['paths'].tolist() == [path for path, _ in dataset.paths_mos]


def test_predict_checkpoint_hands_back_the_dataset_it_scored(network_opt, tiny_checkpoint, toy_test_split):
    dataset, result = predict_checkpoint(network_opt, tiny_checkpoint, toy_test_split, batch_size=5)
    assert isinstance(dataset, FewShotNRDataset) and len(result['pred']) == len(dataset) == 12
    assert np.allclose(result['mos'], [label for _, label in dataset.paths_mos])

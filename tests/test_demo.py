"""`pyiqa-grmp demo`: offline without the GRMP-IQA weights, with a tiny GRMP model, and what counts as broken."""
import json

import pandas as pd
import pytest
from PIL import Image

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS
from pyiqa_grmp.cli import main
from pyiqa_grmp.demo import DEMO_DISTORTIONS, DEMO_PHOTOS, _ranking

IMAGES = len(DEMO_PHOTOS) * (1 + 5 * len(DEMO_DISTORTIONS))


@pytest.fixture
def empty_weight_cache(tmp_path, monkeypatch):
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, 'DEFAULT_CACHE_DIR', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_offline_demo_says_where_to_put_the_weights_and_shows_the_other_metric(tmp_path, empty_weight_cache, capsys):
    status = main(['demo', '--metrics', 'grmp_iqa', 'piqe', '--size', '64', '--out', str(tmp_path / 'out')])
    output = capsys.readouterr().out
    assert status == 0
    notes = [line for line in output.splitlines() if 'clive_50_prompt_lda_5.0.pt' in line]
    assert len(notes) == 1 and str(empty_weight_cache) in notes[0]
    assert '| **series in the right order** | | **' in output and 'piqe (lower is better)' in output
    scores = pd.read_csv(tmp_path / 'out' / 'scores.csv')
    assert len(scores) == IMAGES and 'piqe' in scores and 'grmp_iqa' not in scores
    assert Image.open(tmp_path / 'out' / 'demo.png').format == 'PNG'


def test_demo_scores_with_a_grmp_checkpoint_given(tmp_path, tiny_checkpoint, empty_weight_cache, capsys):
    status = main(['demo', '--metrics', 'grmp_iqa', 'piqe', '--size', '64', '--out', str(tmp_path / 'out'),
                   '--metric-opt', f'grmp_iqa:pretrained_model_path={tiny_checkpoint}',
                   '--metric-opt', f'grmp_iqa:backbone={json.dumps(TINY_BACKBONE)}',
                   '--metric-opt', f'grmp_iqa:num_visual_prompts={TINY_NUM_PROMPTS}', '--device', 'cpu'])
    output = capsys.readouterr().out
    assert status == 0 and 'not available' not in output
    scores = pd.read_csv(tmp_path / 'out' / 'scores.csv')
    assert scores['grmp_iqa'].between(0, 1).all() and scores['grmp_iqa'].nunique() > 1


def test_a_metric_that_cannot_score_single_images_makes_the_demo_fail(tmp_path, empty_weight_cache, capsys):
    assert main(['demo', '--metrics', 'psnr', '--size', '64', '--out', str(tmp_path / 'out')]) == 1
    assert 'BROKEN psnr: a full-reference metric' in capsys.readouterr().err


def _series_scores(quality_of_level):
    rows = [{'photo': p, 'distortion': 'clean', 'level': 0, 'm': quality_of_level(0)} for p in DEMO_PHOTOS]
    rows += [{'photo': p, 'distortion': d, 'level': level, 'm': quality_of_level(level)}
             for p in DEMO_PHOTOS for d in DEMO_DISTORTIONS for level in range(1, 6)]
    return pd.DataFrame(rows)


def test_ranking_counts_series_falling_with_the_level_and_respects_lower_better():
    falling = _series_scores(lambda level: 10.0 - level)
    assert _ranking(falling, 'm', lower_better=False)[:2] == (12, 12)
    assert _ranking(falling, 'm', lower_better=True)[:2] == (0, 12)
    assert _ranking(falling, 'm', lower_better=False)[2] == pytest.approx(1.0)


def test_ranking_does_not_count_a_saturated_tie_as_ordered():
    saturated = _series_scores(lambda level: 10.0 - min(level, 4))
    right, total, level_srcc = _ranking(saturated, 'm', lower_better=False)
    assert (right, total) == (0, 12) and 0.9 < level_srcc < 1.0

"""pyiqa_grmp.ray.MetricScorer: Ray Data batches scored as ``pyiqa_grmp.score`` scores the same images.

The unit tests call the class directly (no Ray); one test runs it on a local Ray of 2 CPUs (skipped where the
``ray`` extra is not installed; CI installs it).
"""
import math
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pyiqa_grmp
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo, subprocess_env
from pyiqa_grmp.errors import InvalidArgument
from pyiqa_grmp.ray import MetricScorer
from pyiqa_grmp.scoring import MetricRequestError

BROKEN = b'\xff\xd8 not really a jpeg'
PHOTOS = ('astronaut', 'coffee', 'chelsea')


@pytest.fixture(scope='module')
def photo_files(tmp_path_factory):
    """Three bundled photos (of three sizes) as PNG files."""
    folder = tmp_path_factory.mktemp('ray_photos')
    for number, name in enumerate(PHOTOS):
        rgb = photo(name)
        Image.fromarray(rgb[:200 + 40 * number, :300 - 30 * number]).save(folder / f'img{number}.png')
    return sorted(folder.iterdir())


@pytest.fixture(scope='module')
def options(tiny_checkpoint):
    return {'grmp_iqa': {'pretrained_model_path': tiny_checkpoint, 'backbone': TINY_BACKBONE,
                         'num_visual_prompts': TINY_NUM_PROMPTS}}


@pytest.fixture(scope='module')
def expected(photo_files, options):
    """``pyiqa_grmp.score`` of the photo files, by file name."""
    frame = pyiqa_grmp.score(str(photo_files[0].parent), 'grmp_iqa', metric_options=options, device='cpu',
                             workers=0, progress=False)
    assert (frame['error'] == '').all()
    return dict(zip(frame['image'], frame['grmp_iqa']))


@pytest.fixture(scope='module')
def scorer(options):
    return MetricScorer(['grmp_iqa'], metric_options=options, device='cpu')


def _scores_match(scores, paths, expected):
    return all(abs(score - expected[str(path)]) <= 1e-6 for score, path in zip(scores, paths))


def test_scorer_scores_bytes_structs_and_paths_of_a_numpy_batch_as_score_does(scorer, photo_files, expected):
    first, second, third = photo_files
    cells = [first.read_bytes(), {'bytes': second.read_bytes(), 'path': 'second.png'}, str(third),
             {'bytes': None, 'path': str(first)}, BROKEN, 7]
    batch = {'image': np.array(cells, dtype=object), 'id': np.arange(6)}
    out = scorer(batch)
    assert set(out) == {'image', 'id', 'grmp_iqa', 'error'} and out['id'] is batch['id']
    assert out['grmp_iqa'].dtype == np.float64
    assert _scores_match(out['grmp_iqa'][:4], [first, second, third, first], expected)
    assert list(out['error'][:4]) == [''] * 4
    assert math.isnan(out['grmp_iqa'][4]) and math.isnan(out['grmp_iqa'][5])
    assert out['error'][4] == ("cannot read image image of row 4 of the batch: UnidentifiedImageError: cannot "
                               "identify image file 'image of row 4 of the batch'")
    assert out['error'][5] == ('cannot read image image of row 5 of the batch: the cell holds a value of type int, '
                               'not encoded image bytes or a file path')


def test_scorer_returns_a_pandas_batch_as_a_pandas_frame(scorer, photo_files, expected):
    frame = pd.DataFrame({'key': ['a', 'b', 'c'], 'image': [photo_files[0].read_bytes(), BROKEN,
                                                            photo_files[2].read_bytes()]})
    out = scorer(frame)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ['key', 'image', 'grmp_iqa', 'error']
    assert list(out['key']) == ['a', 'b', 'c'] and list(frame.columns) == ['key', 'image']
    assert _scores_match(out['grmp_iqa'][[0, 2]], [photo_files[0], photo_files[2]], expected)
    assert math.isnan(out['grmp_iqa'][1]) and out['error'][1].startswith('cannot read image image of row 1')


def test_scorer_refuses_a_batch_without_its_image_column(scorer):
    with pytest.raises(InvalidArgument, match=r"image_column 'image' is not a column of the batch; its columns are "
                                              r"\['jpg'\]"):
        scorer({'jpg': np.array([BROKEN], dtype=object)})


def test_scorer_refuses_unknown_metrics_and_options_before_creating_any():
    with pytest.raises(MetricRequestError, match="unknown metric 'grmp_iq': did you mean grmp_iqa"):
        MetricScorer(['grmp_iq'])
    with pytest.raises(MetricRequestError, match="metric 'grmp_iqa' has no option 'bogus'"):
        MetricScorer(['grmp_iqa'], metric_options={'grmp_iqa': {'bogus': 1}})
    with pytest.raises(InvalidArgument, match=r"metric_options names metrics that are not scored: \['piqe'\]"):
        MetricScorer(['grmp_iqa'], metric_options={'piqe': {}})


def test_scorer_refuses_a_metric_it_cannot_create(tmp_path):
    missing = tmp_path / 'missing.pth'
    with pytest.raises(ValueError, match=f"metric 'grmp_iqa': cannot create metric: FileNotFoundError: .*{missing}"):
        MetricScorer(['grmp_iqa'], metric_options={'grmp_iqa': {'pretrained_model_path': str(missing)}},
                     device='cpu')


# ------------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope='module')
def local_ray():
    """A new local Ray of 2 CPUs for this module (its start-up time is printed), shut down after; its workers
    inherit this process's environment, with this working tree first on the import path."""
    ray = pytest.importorskip('ray')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('PYTHONPATH', subprocess_env()['PYTHONPATH'])
        patch.setenv('RAY_USAGE_STATS_ENABLED', '0')
        started = time.perf_counter()
        ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        print(f'ray.init took {time.perf_counter() - started:.1f} s')
        try:
            yield ray
        finally:
            ray.shutdown()


def test_map_batches_on_ray_gives_the_scores_of_score_and_the_broken_row_its_error(local_ray, photo_files, options,
                                                                                  expected):
    rows = [{'key': path.name, 'png': path.read_bytes()} for path in photo_files]
    rows.insert(1, {'key': 'broken', 'png': BROKEN})
    scored = local_ray.data.from_items(rows).map_batches(
        MetricScorer, fn_constructor_kwargs={'metrics': ['grmp_iqa'], 'metric_options': options,
                                             'image_column': 'png', 'device': 'cpu'},
        batch_size=2, concurrency=1, num_cpus=1)
    by_key = {row['key']: row for row in scored.take_all()}
    assert sorted(by_key) == sorted(['broken', *[p.name for p in photo_files]])
    for path in photo_files:
        assert abs(by_key[path.name]['grmp_iqa'] - expected[str(path)]) <= 1e-6 and by_key[path.name]['error'] == ''
    assert math.isnan(by_key['broken']['grmp_iqa'])
    assert by_key['broken']['error'].startswith('cannot read image png of row ')

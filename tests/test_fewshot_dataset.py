"""FewShotNRDataset: splits (disjoint, deterministic, sizes), labels, and errors before training."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pyiqa_grmp.data.fewshot_dataset import DatasetConfigError, FewShotNRDataset, few_shot_split
from pyiqa_grmp.training import fit_batch_to_shots


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """40 tiny images with MOS 0..39 in a pyiqa NR meta CSV (plus an extra column, as real CSVs have)."""
    root = tmp_path_factory.mktemp('nr')
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(root / f'img{i:02d}.png')
    pd.DataFrame({'image': [f'img{i:02d}.png' for i in range(40)], 'mos': np.arange(40.0) * 2 + 10,
                  'std': 1.0}).to_csv(root / 'meta.csv', index=False)
    return root


def _opt(root, phase, **overrides):
    opt = {'name': 'toy', 'type': 'FewShotNRDataset', 'dataroot_target': str(root),
           'meta_info_file': str(root / 'meta.csv'), 'num_shots': 10, 'split_seed': 3, 'num_val': 5,
           'phase': phase, 'resize': 64}
    opt.update(overrides)
    return opt


def test_split_sizes_follow_the_protocol():
    split = few_shot_split(1169, num_shots=50, split_seed=0, train_ratio=0.8, num_val=20)
    assert (len(split['train']), len(split['val']), len(split['test'])) == (50, 20, 234)


def test_splits_are_disjoint():
    split = few_shot_split(100, num_shots=30, split_seed=1, num_val=10)
    assert not set(split['train']) & set(split['val'])
    assert not (set(split['train']) | set(split['val'])) & set(split['test'])


def test_same_seed_same_split_and_other_seed_other_split():
    a, b, c = (few_shot_split(200, 50, seed, num_val=10) for seed in (4, 4, 5))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a['train'], c['train'])


def test_split_is_the_same_on_every_machine():
    # Recorded once (numpy PCG64, whose stream numpy keeps stable); a change would silently alter every split.
    assert few_shot_split(20, num_shots=4, split_seed=0, num_val=2)['train'].tolist() == [3, 11, 13, 17]


def test_shots_do_not_depend_on_the_validation_carve_out():
    with_val, without = few_shot_split(100, 20, 2, num_val=15), few_shot_split(100, 20, 2, num_val=0)
    assert np.array_equal(with_val['train'], without['train'])


def test_dataset_phases_select_their_split(image_folder):
    sizes = {phase: len(FewShotNRDataset(_opt(image_folder, phase))) for phase in ('train', 'val', 'test')}
    assert sizes == {'train': 10, 'val': 5, 'test': 8}
    paths = {phase: {item[0] for item in FewShotNRDataset(_opt(image_folder, phase)).paths_mos}
             for phase in ('train', 'val', 'test')}
    assert not paths['train'] & paths['val'] and not paths['train'] & paths['test']


def test_labels_are_min_max_normalised_within_the_subset(image_folder):
    dataset = FewShotNRDataset(_opt(image_folder, 'train'))
    labels = np.array([label for _, label in dataset.paths_mos])
    assert labels.min() == 0.0 and labels.max() == 1.0
    assert np.allclose(labels, (dataset.raw_mos - dataset.raw_mos.min()) / np.ptp(dataset.raw_mos))


def test_mos_range_normalisation_and_lower_better(image_folder):
    dataset = FewShotNRDataset(_opt(image_folder, 'test', label_norm='mos_range', mos_range=[0, 100],
                                    lower_better=True))
    labels = np.array([label for _, label in dataset.paths_mos])
    assert np.allclose(labels, 1 - dataset.raw_mos / 100)


def test_items_are_square_resized_images_in_unit_range(image_folder):
    item = FewShotNRDataset(_opt(image_folder, 'train'))[0]
    assert item['img'].shape == (3, 64, 64) and item['img'].dtype == torch.float32
    assert 0 <= item['img'].min() and item['img'].max() <= 1
    assert item['mos_label'].shape == (1,) and isinstance(item['img_path'], str)


def test_batch_larger_than_the_shots_fails_before_training(image_folder):
    with pytest.raises(DatasetConfigError, match='batch_size_per_gpu 192 exceeds the 10 training images'):
        FewShotNRDataset(_opt(image_folder, 'train', batch_size_per_gpu=192))


def test_enlarged_shots_may_fill_a_larger_batch(image_folder):
    dataset = FewShotNRDataset(_opt(image_folder, 'train', batch_size_per_gpu=20, dataset_enlarge_ratio=2))
    assert len(dataset) == 10


def test_training_entry_lowers_the_batch_to_the_shots_and_returns_the_note_without_printing(capsys):
    dataset = {'type': 'FewShotNRDataset', 'num_shots': 10, 'batch_size_per_gpu': 192}
    note = fit_batch_to_shots(dataset)
    assert dataset['batch_size_per_gpu'] == 10
    assert note == 'datasets.train: batch_size_per_gpu 192 > 10 training images; using 10 (all shots per step)'
    assert fit_batch_to_shots(dataset) is None  # the batch fits now
    assert capsys.readouterr() == ('', '')


def test_row_filter_keeps_only_the_listed_values(image_folder):
    listed = [f'img{i:02d}.png' for i in range(0, 40, 2)]
    kept = FewShotNRDataset(_opt(image_folder, 'test', row_filter={'image': listed}, num_shots=5, num_val=0))
    assert {os.path.basename(p) for p, _ in kept.paths_mos} <= set(listed)
    assert len(kept) == 20 - int(0.8 * 20)


@pytest.mark.parametrize('row_filter, message', [
    ({'no_such_column': ['a']}, 'not in the meta-info file'),
    ({'image': 'img01.png'}, 'non-empty list'),
    ({'image': ['absent.png']}, 'keeps none'),
])
def test_bad_row_filter_is_named(image_folder, row_filter, message):
    with pytest.raises(DatasetConfigError, match=message):
        FewShotNRDataset(_opt(image_folder, 'train', row_filter=row_filter))


@pytest.mark.parametrize('overrides, message', [
    ({'num_shots': 40}, 'exceed the training pool'),
    ({'num_shots': None}, "'num_shots' is required"),
    ({'meta_info_file': '/nonexistent/meta.csv'}, 'not found'),
    ({'label_norm': 'zscore'}, 'label_norm'),
    ({'split_index': 1}, 'makes its own splits'),
    ({'label_norm': 'mos_range'}, 'mos_range'),
])
def test_invalid_options_fail_naming_the_problem(image_folder, overrides, message):
    with pytest.raises(DatasetConfigError, match=message):
        FewShotNRDataset(_opt(image_folder, 'train', **overrides))


def test_missing_image_files_are_listed(image_folder, tmp_path):
    pd.DataFrame({'image': ['nope.png'] * 30, 'mos': np.arange(30.0)}).to_csv(tmp_path / 'meta.csv', index=False)
    with pytest.raises(DatasetConfigError, match='missing.*nope.png'):
        FewShotNRDataset(_opt(image_folder, 'train', meta_info_file=str(tmp_path / 'meta.csv')))


def test_nan_mos_fails(image_folder, tmp_path):
    frame = pd.read_csv(image_folder / 'meta.csv')
    frame.loc[3, 'mos'] = float('nan')
    frame.to_csv(tmp_path / 'meta.csv', index=False)
    with pytest.raises(DatasetConfigError, match='NaN'):
        FewShotNRDataset(_opt(image_folder, 'train', meta_info_file=str(tmp_path / 'meta.csv')))


def test_empty_csv_fails(image_folder, tmp_path):
    (tmp_path / 'meta.csv').write_text('image,mos\n')
    with pytest.raises(DatasetConfigError, match='no rows'):
        FewShotNRDataset(_opt(image_folder, 'train', meta_info_file=str(tmp_path / 'meta.csv')))

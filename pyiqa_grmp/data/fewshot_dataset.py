"""Few-shot splits of any pyiqa NR dataset: N labelled shots, a validation carve-out, and the 20 % test part.

The split follows the official protocol: a seeded permutation of all images, the first ``train_ratio`` of it is
the pool and the rest the test split; the N shots are drawn from the pool without replacement. The validation
carve-out (for choosing a checkpoint without looking at the test split) also comes from the pool, disjoint from
the shots. Labels are min-max normalised within each subset as in the official code, or by ``mos_range``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np
import torch
from pyiqa.data.general_nr_dataset import GeneralNRDataset

from .image_io import read_image
from .labels import LabelTableError, minmax_normalise, read_label_table
from .transforms import stored_square

LABEL_NORMS = ('minmax_per_subset', 'mos_range', 'none')


class DatasetConfigError(ValueError):
    """A few-shot dataset option is invalid; raised while building the dataset, before any training."""


def few_shot_split(num_images: int, num_shots: int, split_seed: int, train_ratio: float = 0.8,
                   num_val: int = 0) -> Dict[str, np.ndarray]:
    """Row indices of the shots ('train'), the validation carve-out ('val') and the test split ('test').

    The same arguments give the same indices on any machine (numpy's PCG64 generator). The shots do not depend
    on ``num_val``: they are the first ``num_shots`` of the shuffled pool, the carve-out its last ``num_val``.
    """
    if not 0 < train_ratio < 1:
        raise DatasetConfigError(f'train_ratio must be in (0, 1), got {train_ratio}')
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(num_images)
    pool_size = int(math.floor(train_ratio * num_images))
    pool, test = order[:pool_size], order[pool_size:]
    if num_shots < 1 or num_val < 0:
        raise DatasetConfigError(f'num_shots must be >= 1 and num_val >= 0, got {num_shots} and {num_val}')
    if num_shots + num_val > pool_size:
        raise DatasetConfigError(
            f'num_shots ({num_shots}) + num_val ({num_val}) exceed the training pool of {pool_size} images '
            f'({train_ratio:.0%} of {num_images})')
    if len(test) == 0:
        raise DatasetConfigError(f'the test split of {num_images} images with train_ratio {train_ratio} is empty')
    pool = rng.permutation(pool)
    return {'train': np.sort(pool[:num_shots]), 'val': np.sort(pool[pool_size - num_val:] if num_val else pool[:0]),
            'test': np.sort(test)}


class FewShotNRDataset(GeneralNRDataset):
    """pyiqa NR dataset restricted to one few-shot split.

    Extra options: ``num_shots``, ``split_seed``, ``train_ratio`` (0.8), ``num_val`` (0), ``row_filter`` (use
    only the rows it keeps, see :func:`pyiqa_grmp.data.labels.read_label_table`), ``image_column`` and
    ``score_column`` (by name or 0-based position; default pyiqa's layout, columns 0 and 1), ``label_norm``
    (``minmax_per_subset`` | ``mos_range`` | ``none``), ``resize`` (244: images are stored squashed to this square,
    as the official .mat files), ``cache_images`` (keep decoded images in memory; default True for the shots).
    Any pyiqa ``augment`` options are applied on top, before the resize.
    """

    def __init__(self, opt: dict) -> None:
        self._check_options(opt)
        self.resize = int(opt.get('resize', 244))
        super().__init__(opt)
        self.cache_images = bool(opt.get('cache_images', self.phase == 'train'))
        self._cache: Dict[int, torch.Tensor] = {}
        self._augmented = len(self.trans.transforms) > 1
        batch = opt.get('batch_size_per_gpu')
        available = len(self.paths_mos) * int(opt.get('dataset_enlarge_ratio', 1))
        if self.phase == 'train' and batch is not None and batch > available:
            # pyiqa's train loader drops incomplete batches and is built from its own copy of these options, so
            # here the only safe answer is to stop (``pyiqa-grmp train`` lowers the batch size beforehand).
            raise DatasetConfigError(
                f'dataset {opt.get("name")!r}: batch_size_per_gpu {batch} exceeds the {available} training images '
                f'({len(self.paths_mos)} shots x dataset_enlarge_ratio); pyiqa drops incomplete batches, so no '
                f'training step would run. Set batch_size_per_gpu: {len(self.paths_mos)} (all shots per step, as '
                f'the official code).')

    @staticmethod
    def _check_options(opt: dict) -> None:
        for key in ('meta_info_file', 'dataroot_target', 'num_shots'):
            if opt.get(key) is None:
                raise DatasetConfigError(f'dataset {opt.get("name")!r}: option {key!r} is required')
        if not os.path.isfile(opt['meta_info_file']):
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: meta_info_file {opt["meta_info_file"]} not found')
        if opt.get('label_norm', 'minmax_per_subset') not in LABEL_NORMS:
            raise DatasetConfigError(f'label_norm must be one of {LABEL_NORMS}, got {opt.get("label_norm")!r}')
        if opt.get('split_file') is not None or opt.get('split_index') is not None:
            raise DatasetConfigError('FewShotNRDataset makes its own splits; remove split_file / split_index')
        if opt.get('mos_normalize'):
            raise DatasetConfigError('use label_norm: mos_range (with mos_range and lower_better) instead of '
                                     'mos_normalize')

    def init_path_mos(self, opt: dict) -> None:
        """The (image path, raw MOS) rows of the meta CSV that ``row_filter`` keeps, checked."""
        try:
            labels = read_label_table(opt['meta_info_file'], opt['dataroot_target'], row_filter=opt.get('row_filter'),
                                      image_column=opt.get('image_column'), score_column=opt.get('score_column'))
        except LabelTableError as error:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: {error}') from error
        self.meta_info = labels.table
        self.paths_mos = [[path, float(mos)] for path, mos in zip(labels.images, labels.mos)]

    def get_split(self, opt: dict) -> None:
        indices = few_shot_split(len(self.paths_mos), int(opt['num_shots']), int(opt.get('split_seed', 0)),
                                 float(opt.get('train_ratio', 0.8)), int(opt.get('num_val', 0)))[self.phase]
        if len(indices) == 0:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: the {self.phase!r} split is empty '
                                     f'(for phase val set num_val > 0)')
        subset = [list(self.paths_mos[i]) for i in indices]
        missing = [path for path, _ in subset if not os.path.isfile(path)]
        if missing:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: {len(missing)} image files of the {self.phase} '
                                     f'split are missing, e.g. {missing[:3]}')
        self.indices = indices
        self.raw_mos = np.array([float(mos) for _, mos in subset])
        self.paths_mos = [[path, label] for (path, _), label in zip(subset, self._normalise(self.raw_mos, opt))]

    def mos_normalize(self, opt: dict) -> None:
        """Labels are normalised per subset in :meth:`get_split`, after the split."""

    @staticmethod
    def _normalise(mos: np.ndarray, opt: dict) -> List[float]:
        mode = opt.get('label_norm', 'minmax_per_subset')
        lower_better = bool(opt.get('lower_better', False))
        if mode == 'none':
            return mos.tolist()
        if mode == 'mos_range':
            if opt.get('mos_range') is None:
                raise DatasetConfigError('label_norm mos_range needs the option mos_range: [low, high]')
            low, high = (float(v) for v in opt['mos_range'])
            labels = (mos - low) / (high - low)
        else:
            try:  # one image is a legal subset (e.g. a one-image carve-out), labelled 0
                labels = minmax_normalise(mos, constant='zero' if len(mos) == 1 else 'error')
            except ValueError as error:
                raise DatasetConfigError(f'dataset {opt.get("name")!r}: the MOS of the subset: {error}') from error
        return (1.0 - labels if lower_better else labels).tolist()

    def _load(self, index: int) -> torch.Tensor:
        """The image squashed to resize x resize and stored as uint8, like the official 244x244 .mat files."""
        path = self.paths_mos[index][0]
        if self._augmented:  # pyiqa augment options work on PIL images
            from PIL import Image

            with Image.open(path) as image:
                tensor = self.trans(image.convert('RGB'))
        else:
            tensor = read_image(path)
        return stored_square(tensor, self.resize)

    def __getitem__(self, index: int) -> dict:
        if self.cache_images and not self._augmented:
            if index not in self._cache:
                self._cache[index] = self._load(index)
            stored = self._cache[index]
        else:
            stored = self._load(index)
        path, label = self.paths_mos[index]
        return {'img': stored.float() / 255 * self.img_range, 'mos_label': torch.tensor([float(label)]),
                'img_path': path}

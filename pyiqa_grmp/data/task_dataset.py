"""Distortion-type tasks for meta-prompt pre-training, over one or more pyiqa datasets.

One task per distortion type of each source. The type comes from a file-name pattern (the default recognises
KADID-10k ``I01_03_02.png`` and TID2013 ``i01_03_2.bmp``: the second number) or from a CSV column (the synthetic
dataset's ``distortion``). pyiqa's standard FR layouts work as they are: the distorted image and its score are
used. A fixed, seeded ``val_fraction`` of every task is held out: phase ``train`` yields whole tasks (the
meta-learner splits them into support and query at every visit), phases ``val``/``test`` yield the held-out
images one by one, labelled by min-max over their source, for checkpoint selection.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from torch.utils import data

from .fewshot_dataset import DatasetConfigError
from .image_io import read_image
from .labels import LabelTableError, minmax_normalise, read_label_table
from .samplers import IdleSlot, TaskRoundSampler
from .transforms import stored_square

#: KADID-10k ``I01_03_02.png`` and TID2013 ``i01_03_2.bmp``: reference, type, level.
DEFAULT_TYPE_PATTERN = r'^[iI]\d+_(\d+)_\d+\.\w+$'


def _layout(source: dict) -> str:
    layout = source.get('layout')
    if layout is None:
        layout = 'fr' if source.get('type') == 'GeneralFRDataset' or source.get('dataroot_ref') else 'nr'
    if layout not in ('nr', 'fr'):
        raise DatasetConfigError(f'source {source.get("name")!r}: layout must be nr or fr, got {layout!r}')
    return layout


def read_source_tasks(source: dict) -> "OrderedDict[str, List[Tuple[str, float]]]":
    """{distortion type: [(image path, MOS), ...]} of one source, in order of first appearance."""
    name = source.get('name', 'source')
    for key in ('meta_info_file', 'dataroot_target'):
        if not source.get(key):
            raise DatasetConfigError(f'source {name!r}: option {key!r} is required')
    if not os.path.isfile(source['meta_info_file']):
        raise DatasetConfigError(f'source {name!r}: meta_info_file {source["meta_info_file"]} not found')
    try:
        labels = read_label_table(source['meta_info_file'], source['dataroot_target'], layout=_layout(source),
                                  row_filter=source.get('row_filter'))
    except LabelTableError as error:
        raise DatasetConfigError(f'source {name!r}: {error}') from error
    table = labels.table
    if source.get('type_column'):
        if source['type_column'] not in table.columns:
            raise DatasetConfigError(f'source {name!r}: type_column {source["type_column"]!r} is not a column of '
                                     f'{source["meta_info_file"]} ({list(table.columns)})')
        types = table[source['type_column']].astype(str).tolist()
    else:
        pattern = re.compile(source.get('type_pattern', DEFAULT_TYPE_PATTERN))
        types = []
        for image in labels.images:
            match = pattern.match(os.path.basename(image))
            if match is None:
                raise DatasetConfigError(f'source {name!r}: file name {image!r} does not match type_pattern '
                                         f'{pattern.pattern!r}; set type_pattern or type_column')
            types.append(match.group(1))
    include, exclude = source.get('include_types'), set(map(str, source.get('exclude_types') or []))
    tasks: "OrderedDict[str, List[Tuple[str, float]]]" = OrderedDict()
    for path, label, kind in zip(labels.images, labels.mos, types):
        if kind in exclude or (include is not None and kind not in set(map(str, include))):
            continue
        tasks.setdefault(kind, []).append((path, float(label)))
    if not tasks:
        raise DatasetConfigError(f'source {name!r}: no task left after include_types / exclude_types')
    return tasks


class DistortionTaskDataset(data.Dataset):
    """Tasks (phase ``train``) or held-out images (``val``/``test``) over the ``sources`` of the options.

    Options: ``sources`` (list of {name, meta_info_file, dataroot_target, layout, type_pattern | type_column,
    include_types, exclude_types, row_filter}), ``val_fraction`` (0.1), ``split_seed`` (0), ``resize`` (256:
    images are squashed to this square, as the official pre-training resizes to 256 before cropping 224).
    """

    def __init__(self, opt: dict) -> None:
        self.opt = opt
        self.phase = opt.get('override_phase') or opt.get('phase', 'train')
        self.resize = int(opt.get('resize', 256))
        sources = opt.get('sources')
        if not sources:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: option "sources" (a list) is required')
        fraction = float(opt.get('val_fraction', 0.1))
        if not 0 <= fraction < 0.5:
            raise DatasetConfigError(f'val_fraction must be in [0, 0.5), got {fraction}')
        rng = np.random.default_rng(int(opt.get('split_seed', 0)))
        self.tasks: List[Dict] = []
        self.held_out: List[Tuple[str, float]] = []
        for source_index, source in enumerate(sources):
            source_tasks = read_source_tasks(source)
            source_held_out = []
            for kind, items in source_tasks.items():
                order = rng.permutation(len(items))
                num_held = int(round(fraction * len(items)))
                held = [items[i] for i in sorted(order[:num_held])]
                kept = [items[i] for i in sorted(order[num_held:])]
                if len(kept) < 2 or len({mos for _, mos in kept}) < 2:
                    raise DatasetConfigError(f'source {source.get("name")!r}, type {kind!r}: a task needs at least '
                                             'two images with different MOS; exclude it with exclude_types')
                self.tasks.append({'name': f'{source.get("name", source_index)}:{kind}', 'source': source_index,
                                   'items': kept})
                source_held_out.extend(held)
            self.held_out.extend(self._minmax(source_held_out))
        missing = [path for task in self.tasks for path, _ in task['items'] if not os.path.isfile(path)]
        missing += [path for path, _ in self.held_out if not os.path.isfile(path)]
        if missing:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: {len(missing)} image files are missing, '
                                     f'e.g. {missing[:3]}')
        self.tasks_per_source = [sum(t['source'] == s for t in self.tasks) for s in range(len(sources))]
        if self.phase != 'train' and not self.held_out:
            raise DatasetConfigError(f'dataset {opt.get("name")!r}: phase {self.phase} needs val_fraction > 0')

    @staticmethod
    def _minmax(items: List[Tuple[str, float]]) -> List[Tuple[str, float]]:
        """Labels min-max normalised over the items; a constant set maps to 0.5, as a constant meta-training part."""
        if not items:
            return []
        labels = minmax_normalise(np.array([mos for _, mos in items]), constant='half')
        return [(path, float(label)) for (path, _), label in zip(items, labels)]

    def _load(self, path: str) -> torch.Tensor:
        return stored_square(read_image(path), self.resize)

    def __len__(self) -> int:
        return len(self.tasks) if self.phase == 'train' else len(self.held_out)

    def __getitem__(self, index: Union[int, IdleSlot]) -> dict:
        if isinstance(index, IdleSlot):  # a rank's turn without a task in parallel meta-training
            return {'images': torch.zeros(0, 3, self.resize, self.resize, dtype=torch.uint8),
                    'mos': torch.zeros(0), 'task': '', 'source': index.source, 'idle': True,
                    'num_source_tasks': self.tasks_per_source[index.source]}
        if self.phase != 'train':
            path, label = self.held_out[index]
            return {'img': self._load(path).float() / 255, 'mos_label': torch.tensor([label]), 'img_path': path}
        task = self.tasks[index]
        return {'images': torch.stack([self._load(path) for path, _ in task['items']]),
                'mos': torch.tensor([mos for _, mos in task['items']], dtype=torch.float32),
                'task': task['name'], 'source': task['source'], 'idle': False,
                'num_source_tasks': self.tasks_per_source[task['source']]}

    def round_sampler(self, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> TaskRoundSampler:
        """The sampler of meta-training rounds over this dataset's tasks (phase train)."""
        return TaskRoundSampler([task['source'] for task in self.tasks], num_replicas, rank, seed, shuffle)

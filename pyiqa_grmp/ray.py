"""Scoring with Ray Data: :class:`MetricScorer`, a callable class for ``Dataset.map_batches``.

::

    ds.map_batches(MetricScorer, fn_constructor_kwargs={'metrics': ['grmp_iqa']}, batch_size=64,
                   concurrency=4, num_gpus=1)

Each Ray actor creates the metrics once (the one metric factory, :mod:`pyiqa_grmp.scoring.metrics`) and scores
every batch through the pipeline of :func:`pyiqa_grmp.score` (:func:`pyiqa_grmp.scoring.score_stream`: the same
decoding, declared resize and batches), so its scores are those ``score`` gives for the same images. A batch is
Ray's default format (a dict of numpy arrays) or a pandas DataFrame; it comes back in that format with one float
column per metric (NaN where it failed) and an ``error`` column (why, '' when nothing failed: the text of the
``error`` column of ``score``). An image that cannot be decoded costs its own row only.

Nothing here imports Ray: it is Ray that calls the class (``pip install "pyiqa_grmp[ray]"`` installs Ray Data).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

    from .scoring import ImageSource

#: The column of each batch that gets the reasons of the failures of its row.
ERROR_COLUMN = 'error'

Batch = Union[Dict[str, Any], 'pd.DataFrame']


class MetricScorer:
    """Score the images of a Ray Data batch with pyiqa metrics (GRMP-IQA included); see the module docstring.

    ``metrics``: pyiqa metric names (no-reference: a batch holds no references). ``metric_options``:
    ``{metric: {option: value}}``, keyword arguments of ``pyiqa.create_metric``. ``image_column``: the column
    holding each row's image: encoded bytes (a JPEG, PNG, ... file's bytes), a Hugging Face ``Image`` struct
    ``{'bytes': ..., 'path': ...}`` (the bytes, else the file at the path) or a file path; error texts name an
    image by its path, else by its row in the batch (the row itself is where the text goes). ``device``: 'cpu'
    or 'cuda' (default: cuda when available; with ``num_gpus=1`` Ray gives each actor its own GPU as cuda).
    ``precision``: 'fp32', 'bf16' or 'fp16' for the GRMP-IQA metrics, as in :func:`pyiqa_grmp.score`.
    ``batch_size``: images per forward pass (default: the whole Ray batch, whose size ``map_batches(batch_size=)``
    sets).

    Bad names, option keys and values are raised here, in the actor's constructor, before any batch: a metric
    that cannot be created (e.g. its weights are missing) is a ValueError saying why.
    """

    def __init__(self, metrics: Union[str, Sequence[str]], metric_options: Optional[Mapping[str, Mapping]] = None,
                 image_column: str = 'image', device: Optional[str] = None,
                 precision: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        import torch

        from .precision import add_precision_option
        from .scoring import build_metrics
        from .scoring.metrics import creation_failure_reason

        names = [metrics] if isinstance(metrics, str) else list(metrics)
        if not names:
            raise InvalidArgument('metrics', 'must name at least one metric')
        unknown = sorted(set(metric_options or {}) - set(names))
        if unknown:
            raise InvalidArgument('metric_options', f'names metrics that are not scored: {unknown}')
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidArgument('batch_size', f'must be an integer >= 1, got {batch_size!r}')
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        options = add_precision_option(names, dict(metric_options or {}), precision, device)
        created, failed = build_metrics(names, options, device)
        for name in names:
            if name in failed:
                raise ValueError(f'metric {name!r}: {creation_failure_reason(failed[name])}') from failed[name]
            if created[name].metric_mode == 'FR':
                raise InvalidArgument('metrics', f'{name!r} is a full-reference metric: MetricScorer scores images '
                                      'without references')
        self.metrics: Dict[str, object] = {name: created[name] for name in names}
        self.image_column, self.batch_size = image_column, batch_size

    def __call__(self, batch: Batch) -> Batch:
        """``batch`` with one score column per metric and the ``error`` column added (in its own format)."""
        import math

        import numpy as np

        from .scoring import errors_text, score_stream

        frame = _is_frame(batch)
        columns = list(batch.columns) if frame else list(batch)
        if self.image_column not in columns:
            raise InvalidArgument('image_column', f'{self.image_column!r} is not a column of the batch; its '
                                  f'columns are {columns}')
        cells = list(batch[self.image_column])
        scores = {name: np.full(len(cells), math.nan) for name in self.metrics}
        errors: List[str] = [''] * len(cells)
        sources, positions = [], []
        for position, cell in enumerate(cells):
            source = _source(cell, f'{self.image_column} of row {position} of the batch')
            if isinstance(source, str):
                errors[position] = source
            else:
                sources.append(source)
                positions.append(position)
        if sources:
            for chunk in score_stream(sources, self.metrics, self.batch_size or len(sources), workers=0):
                for result in chunk:
                    position = positions[result.index]
                    for name, value in result.scores.items():
                        scores[name][position] = value
                    errors[position] = errors_text(result.errors)
        added = {**scores, ERROR_COLUMN: np.array(errors, dtype=object)}
        if frame:
            return batch.assign(**added)
        return {**batch, **added}


def _is_frame(batch: object) -> bool:
    """Whether ``batch`` is a pandas DataFrame (without importing pandas for a dict batch)."""
    frame_type = getattr(sys.modules.get('pandas'), 'DataFrame', None)
    return frame_type is not None and isinstance(batch, frame_type)


def _source(cell: object, unnamed: str) -> Union['ImageSource', str]:
    """The image source of one cell of the image column (named by its path, else ``unnamed``), or why there is
    none (the row's error text)."""
    from .scoring import EncodedImage, ImageFile

    struct = isinstance(cell, Mapping)
    path = cell.get('path') if struct else cell
    data = cell.get('bytes') if struct else cell
    if isinstance(data, (bytes, bytearray, memoryview)):
        name = os.fspath(path) if struct and isinstance(path, (str, os.PathLike)) and path else unnamed
        return EncodedImage(name, bytes(data))
    if (data is None or not struct) and isinstance(path, (str, os.PathLike)):
        return ImageFile(os.fspath(path))
    what = 'an image struct with neither bytes nor a path' if struct else f'a value of type {type(cell).__name__}'
    return f'cannot read image {unnamed}: the cell holds {what}, not encoded image bytes or a file path'

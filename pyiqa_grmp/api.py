"""``pyiqa_grmp.score``: score images with any pyiqa metric, GRMP-IQA included, from Python.

A thin face over the scoring pipeline (:func:`pyiqa_grmp.scoring.score_images`) with the words and defaults of
``pyiqa-grmp score``; the other API functions live with their engines (``compare`` in :mod:`~pyiqa_grmp.comparison`,
``adapt`` in :mod:`~pyiqa_grmp.adaptation`, ``train`` and ``run_protocol`` in :mod:`~pyiqa_grmp.training`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

#: Images per virtual shard of a folder or list (``shard_size``), by default.
DEFAULT_SHARD_SIZE = 10_000

from .errors import InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

    from .scoring import ScoreReport


Targets = Union[str, 'os.PathLike[str]', Sequence[Union[str, 'os.PathLike[str]']]]


def score(targets: Targets, metrics: Union[str, Sequence[str]], *, ref: Optional[str] = None,
          device: Optional[str] = None, batch_size: int = 8, workers: Optional[int] = None,
          metric_options: Optional[Mapping[str, Mapping[str, object]]] = None, precision: Optional[str] = None,
          csv_path: Optional[str] = None, resume: bool = False, progress: bool = True, out: Optional[str] = None,
          num_shards: Optional[int] = None, shard_index: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE,
          image_column: Optional[str] = None, key_column: Optional[str] = None,
          keep_columns: Sequence[str] = (), decode: Optional[str] = None,
          fast: bool = False) -> 'pd.DataFrame':
    """Score every image of ``targets`` with every metric; one row per image.

    ``targets``: an image file, a folder (scanned recursively, rows sorted by path) or a ``.txt`` file listing
    image paths one per line (relative to the list's folder, or absolute; rows in the list's order); or shards:
    webdataset ``.tar`` files and ``.parquet`` files, one or many, with globs and brace ranges
    (``'shards/{00000..00999}.tar'``); see :mod:`pyiqa_grmp.scoring.shards` for how they are read.
    ``metrics``: pyiqa metric names, e.g. ``['grmp_iqa', 'piqe']`` (``pyiqa.list_models()``). ``ref``: the
    reference image or folder of full-reference metrics (paired by relative path, else by file name).
    ``metric_options``: ``{metric: {option: value}}``, keyword arguments of ``pyiqa.create_metric``.
    ``precision``: 'fp32', 'bf16' or 'fp16' for the GRMP-IQA metrics (others keep their own; an explicit
    ``precision`` in ``metric_options`` wins). ``device``: 'cpu' or 'cuda' (default: cuda when available).
    ``batch_size`` images per forward pass; ``workers`` decoding processes (0: this process; None: the CPUs of
    this process shared by the ranks of its machine, at most 16, as the command line).
    ``csv_path``: rows are also written there as batches finish, and the file rewritten in image order at the end;
    ``resume`` keeps the rows already there and scores only the missing images. ``progress``: a bar on stderr.
    ``decode``: 'cpu' (default: Pillow in the workers, exact), 'gpu' (JPEGs decoded by nvJPEG on the metrics' CUDA
    device, others on the CPU; scores close to, not equal to, the exact ones; needs metrics that declare a fixed
    resize, such as grmp_iqa) or 'auto' (the GPU where it can be). ``fast``: the fastest configuration whose
    scores stay within the measured deviation: bf16 where the device has it (CUDA; CPUs with AVX-512 BF16, AMX
    or Arm BF16; elsewhere fp32, with a warning saying so) and ``decode='auto'``; an explicit ``precision`` or
    ``decode`` wins.

    ``out``: a folder that gets one parquet file per shard (folders and lists are cut into parts of
    ``shard_size`` images), written atomically with the run's metadata (:mod:`pyiqa_grmp.scoring.shard_output`);
    a rerun skips completed shards, redoes partial ones, and is refused (before scoring) when its metrics,
    options or weights differ from those of the completed shards. This process scores the shards
    ``shard_index``, ``shard_index + num_shards``, ...; by default both come from the scheduler
    (:func:`pyiqa_grmp.distributed.task_slot`: a Slurm array, torchrun's or Slurm's ranks, else 1 and 0). Under
    torchrun each rank then works alone (no process group). :func:`pyiqa_grmp.merge` reads ``out`` back.
    ``image_column``: the parquet column of image bytes (default: ``jpg``, ``png``, ``image``, ... or a Hugging
    Face ``Image`` struct); ``key_column``: the parquet column naming each row (default ``key``, else the row
    index); ``keep_columns``: parquet columns copied into the output. Shards given without ``out`` are scored
    into a temporary folder and returned merged.

    Returns a DataFrame with ``image``, ``reference`` (only with ``ref``), one column per metric (NaN where it
    failed) and ``error`` (why, '' when nothing failed), the same as the CSV file's ``errors``; ``attrs['errors']``
    lists each failure once as a :class:`~pyiqa_grmp.scoring.Failure` (metric, image, reason; None: all). Images
    that cannot be read, and metrics that cannot be created or fail, are reported there, never raised; bad
    arguments raise ValueError. Under torchrun it joins the process group and splits the images over the ranks:
    rank 0 gets every row. With ``out`` it returns one row per shard of this process (``shard``, ``status``
    'scored' or 'skipped', ``images``, ``failed`` (-1 when skipped), ``path``), the failures in
    ``attrs['errors']``; shards without ``out`` give :func:`pyiqa_grmp.merge`'s table.
    """
    from . import distributed
    from .precision import add_precision_option
    from .scoring import default_workers, score_images
    from .scoring.shards import expand_targets, shard_kind

    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise InvalidArgument('metrics', 'must name at least one metric')
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument('batch_size', f'must be an integer >= 1, got {batch_size!r}')
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise InvalidArgument('workers', f'must be an integer >= 0, got {workers!r}')
    precision, decode = _fast_settings(fast, precision, decode, device)
    options = add_precision_option(names, dict(metric_options or {}), precision, device)
    paths = [os.fspath(t) for t in ([targets] if isinstance(targets, (str, os.PathLike)) else targets)]
    if not paths:
        raise InvalidArgument('targets', 'must name at least one file or folder')
    expanded = expand_targets(paths)
    if out is not None or len(expanded) > 1 or (os.path.isfile(expanded[0]) and shard_kind(expanded[0])):
        for name, value, why in (('ref', ref, 'shard inputs carry no reference images'),
                                 ('csv_path', csv_path, 'is for one folder, list or image file; with out, merge '
                                                        'writes a CSV'),
                                 ('resume', resume, 'is for csv_path; with out, a rerun skips completed shards')):
            if value:
                raise InvalidArgument(name, f'does not go with shards or out: {why}' if name != 'csv_path' else why)
        return _score_shards(names, paths, out, device, batch_size, workers, options, precision, progress,
                             num_shards, shard_index, shard_size, image_column, key_column, list(keep_columns),
                             decode)
    if num_shards is not None or shard_index is not None:
        raise InvalidArgument('num_shards' if num_shards is not None else 'shard_index', 'needs out')
    context = distributed.init_distributed(None, device=device)  # joins a torchrun launch, else one process
    report = score_images(names, paths[0], ref, str(context.device), batch_size,
                          progress=progress and context.is_main, metric_options=options, workers=workers,
                          csv_path=csv_path, resume=resume, decode=decode)
    return report_frame(report, with_references=ref is not None)


def _score_shards(names, targets, out, device, batch_size, workers, options, precision, progress, num_shards,
                  shard_index, shard_size, image_column, key_column, keep_columns, decode) -> 'pd.DataFrame':
    """:func:`score` of shards (see there): into ``out``, or a temporary folder then merged."""
    import tempfile

    import pandas as pd

    from . import distributed
    from .scoring import merge_outputs, score_to_shards

    if (num_shards is None) != (shard_index is None):
        raise InvalidArgument('shard_index' if shard_index is None else 'num_shards',
                              'must be given with ' + ('num_shards' if shard_index is None else 'shard_index'))
    if num_shards is None:
        num_shards, shard_index = distributed.task_slot() if out is not None else (1, 0)
    settings = dict(device=str(distributed.process_device(device)), batch_size=batch_size, progress=progress,
                    metric_options=options, workers=workers, num_shards=num_shards, shard_index=shard_index,
                    shard_size=shard_size, image_column=image_column, key_column=key_column,
                    keep_columns=keep_columns, precision=precision, decode=decode)
    if out is None:
        with tempfile.TemporaryDirectory() as folder:
            run = score_to_shards(names, targets, folder, **settings)
            frame = merge_outputs(folder)
    else:
        run = score_to_shards(names, targets, os.fspath(out), **settings)
        frame = pd.DataFrame(run.shards, columns=['shard', 'status', 'images', 'failed', 'path'])
    frame.attrs['errors'] = list(run.errors)
    return frame


def merge(out_dir: Union[str, 'os.PathLike[str]'], *, allow_partial: bool = False) -> 'pd.DataFrame':
    """The shard outputs of a ``score(..., out=out_dir)`` run as one table: columns ``shard``, ``key``, one per
    metric, ``error``, ``width``, ``height`` and the kept columns; rows in shard order, then key order.

    Refused (ValueError naming them) while shards are not complete, unless ``allow_partial``, and when shards
    were scored with other settings. ``attrs['metadata']``: the run's metadata; ``attrs['missing']``: the shards
    not complete.
    """
    from .scoring import merge_outputs

    return merge_outputs(os.fspath(out_dir), allow_partial=allow_partial)


def _fast_settings(fast: bool, precision: Optional[str], decode: Optional[str], device: Optional[str]
                   ) -> 'tuple[Optional[str], str]':
    """``precision`` and ``decode`` of :func:`score` after ``fast``; ``decode='gpu'`` off CUDA is refused here."""
    import warnings

    import torch

    from .precision import fast_precision
    from .scoring.pipeline import check_decode

    if decode is not None:
        check_decode(decode)
    device_type = torch.device(device).type if device else ('cuda' if torch.cuda.is_available() else 'cpu')
    if decode == 'gpu' and device_type != 'cuda':
        raise InvalidArgument('decode', f"'gpu' needs a CUDA device; this run scores on {device_type}"
                                        + ('' if torch.cuda.is_available() else ' (no CUDA device is available)'))
    if not fast:
        return precision, decode or 'cpu'
    if precision is None:
        precision, note = fast_precision(device_type)
        if note:
            warnings.warn(note, stacklevel=3)
    return precision, decode or 'auto'


def report_frame(report: 'ScoreReport', with_references: bool = False) -> 'pd.DataFrame':
    """A :class:`~pyiqa_grmp.scoring.ScoreReport` as the DataFrame :func:`score` returns."""
    import math

    import pandas as pd

    from .scoring import errors_text

    def text(values: list) -> 'pd.Series':  # file names may hold bytes that are not UTF-8: plain Python strings
        return pd.Series(values, dtype=object)

    columns = {'image': text(list(report.images))}
    if with_references:
        columns['reference'] = text([report.refs.get(image, '') for image in report.images])
    for metric in report.metrics:
        columns[metric] = [report.scores.get(image, {}).get(metric, math.nan) for image in report.images]
    columns['error'] = text([errors_text(report.failures_of(image)) for image in report.images])
    frame = pd.DataFrame(columns)
    frame.attrs['errors'] = list(report.errors)
    return frame

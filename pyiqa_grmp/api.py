"""``pyiqa_grmp.score``: score images with any pyiqa metric, GRMP-IQA included, from Python.

A thin face over the scoring pipeline (:func:`pyiqa_grmp.scoring.score_images`) with the words and defaults of
``pyiqa-grmp score``; the other API functions live with their engines (``compare`` in :mod:`~pyiqa_grmp.comparison`,
``adapt`` in :mod:`~pyiqa_grmp.adaptation`, ``train`` and ``run_protocol`` in :mod:`~pyiqa_grmp.training`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from .errors import InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

    from .scoring import ScoreReport


def score(targets: Union[str, 'os.PathLike[str]'], metrics: Union[str, Sequence[str]], *, ref: Optional[str] = None,
          device: Optional[str] = None, batch_size: int = 8, workers: Optional[int] = None,
          metric_options: Optional[Mapping[str, Mapping[str, object]]] = None, precision: Optional[str] = None,
          csv_path: Optional[str] = None, resume: bool = False, progress: bool = True,
          decode: Optional[str] = None, fast: bool = False) -> 'pd.DataFrame':
    """Score every image of ``targets`` with every metric; one row per image.

    ``targets``: an image file, a folder (scanned recursively, rows sorted by path) or a ``.txt`` file listing
    image paths one per line (relative to the list's folder, or absolute; rows in the list's order).
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

    Returns a DataFrame with ``image``, ``reference`` (only with ``ref``), one column per metric (NaN where it
    failed) and ``error`` (why, '' when nothing failed), the same as the CSV file's ``errors``; ``attrs['errors']``
    lists each failure once as a :class:`~pyiqa_grmp.scoring.Failure` (metric, image, reason; None: all). Images
    that cannot be read, and metrics that cannot be created or fail, are reported there, never raised; bad
    arguments raise ValueError. Under torchrun it joins the process group and splits the images over the ranks:
    rank 0 gets every row.
    """
    from . import distributed
    from .precision import add_precision_option
    from .scoring import default_workers, score_images

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
    context = distributed.init_distributed(None, device=device)  # joins a torchrun launch, else one process
    report = score_images(names, os.fspath(targets), ref, str(context.device), batch_size,
                          progress=progress and context.is_main, metric_options=options, workers=workers,
                          csv_path=csv_path, resume=resume, decode=decode)
    return report_frame(report, with_references=ref is not None)


def _fast_settings(fast: bool, precision: Optional[str], decode: Optional[str], device: Optional[str]
                   ) -> 'tuple[Optional[str], str]':
    """``precision`` and ``decode`` of :func:`score` after ``fast``; ``decode='gpu'`` off CUDA is refused here."""
    import warnings

    import torch

    from .precision import fast_precision
    from .scoring.pipeline import DECODE_MODES

    if decode is not None and decode not in DECODE_MODES:
        raise InvalidArgument('decode', f'must be one of {", ".join(DECODE_MODES)}, got {decode!r}')
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

"""Side-by-side comparison of GRMP-IQA and any pyiqa metric on one labelled dataset.

Every metric scores exactly the same images (each file decoded once) against the same labels, and is judged
by SRCC, KRCC, PLCC and PLCC after the standard 4-parameter logistic fit. Nothing is skipped silently: a
metric that cannot be created, an image that cannot be read and an image a metric fails on are all counted and
explained in the table.

Sign convention: before any correlation is computed, the scores of metrics with ``lower_better`` (e.g. piqe,
niqe) are negated, and so are lower-better labels (DMOS: pyiqa dataset infos with ``lower_better: true``, or
``mos_lower_better=True``), so a metric that agrees with the labels always has positive correlations.
``per_image.csv`` keeps the raw scores and labels.
"""
from __future__ import annotations

import math
import os
import textwrap
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from .data.fewshot_dataset import few_shot_split
from .data.labels import LabelledImages, label_source, read_labels
from .errors import InvalidArgument
from .precision import add_precision_option
from .checkpointing import write_atomically
from .reporting import save_figure_atomically
from .scoring import (Failure, ScoreReport, check_metric_requests, create_metrics, default_workers, encode_path,
                      metric_device, score_paths)
from .stats import correlation_values, logistic_4, logistic_plcc


RESULT_COLUMNS = ['metric', 'srcc', 'krcc', 'plcc', 'plcc_logistic', 'scored', 'failed', 'seconds_per_image',
                  'lower_better', 'error']
#: Failed images named in the ``error`` column of a metric; per_image.csv lists all of them.
LISTED_FAILURES = 3


# --------------------------------------------------------------------------------------------------- the data
def _select_rows(num_rows: int, split: str, split_seed: Optional[int], num_shots: Optional[int],
                 train_ratio: float) -> Tuple[np.ndarray, str]:
    """Row indices to score and a sentence saying which."""
    if split == 'all':
        if split_seed is not None or num_shots is not None:
            raise ValueError("split_seed and num_shots choose a few-shot test split and need split='test' "
                             "(split='all' scores every row)")
        return np.arange(num_rows), 'split all (every row)'
    if split == 'test':
        if split_seed is None or num_shots is None:
            raise ValueError("split='test' needs split_seed and num_shots: those of the fine-tuning run whose "
                             'test split is evaluated')
        test = few_shot_split(num_rows, int(num_shots), int(split_seed), float(train_ratio))['test']
        return test, (f'split test of the few-shot protocol (split_seed {split_seed}, num_shots {num_shots}, '
                      f'train_ratio {train_ratio}) of {num_rows} rows')
    raise ValueError(f"split must be 'all' or 'test', got {split!r}")


def load_labelled_images(*, dataset: Optional[str] = None, data_root: str = './datasets',
                         meta_info: Optional[str] = None, root: Optional[str] = None, split: str = 'all',
                         split_seed: Optional[int] = None, num_shots: Optional[int] = None,
                         train_ratio: float = 0.8, mos_lower_better: Optional[bool] = None) -> LabelledImages:
    """The images and labels a comparison scores, from a pyiqa dataset name or a meta CSV (see :func:`compare`).

    Rows are taken in file order and image paths are ``os.path.join(image folder, column)``, exactly as
    ``FewShotNRDataset`` builds them, so ``split='test'`` gives the same images as its phase ``test``.
    """
    if dataset is not None and meta_info is None and root is not None:
        raise ValueError('root= is the image folder of meta_info=; with dataset= use data_root=')
    source = label_source(dataset, data_root, meta_info, root)
    labels = read_labels(source, mos_lower_better)
    rows, split_text = _select_rows(len(labels.images), split, split_seed, num_shots, train_ratio)
    kind = 'lower-better labels (DMOS)' if labels.lower_better else 'labels: MOS, higher is better'
    return labels.subset(rows, f'{source.description}; {split_text}; {len(rows)} images; {kind}')


# ------------------------------------------------------------------------------------------------ statistics
def correlations(scores: np.ndarray, mos: np.ndarray, lower_better: bool = False,
                 mos_lower_better: bool = False) -> Dict[str, object]:
    """SRCC, KRCC, PLCC and PLCC after the logistic fit of ``scores`` against ``mos``; never raises.

    Lower-better scores or labels are negated first (see the module docstring). ``plcc_logistic`` is the PLCC of
    the fitted values, negative when the fit is decreasing. Undefined values are NaN and ``error`` says why;
    ``logistic_params`` are the fit on the sign-adjusted values, or None.
    """
    pred = -np.asarray(scores, dtype=float) if lower_better else np.asarray(scores, dtype=float)
    labels = -np.asarray(mos, dtype=float) if mos_lower_better else np.asarray(mos, dtype=float)
    result: Dict[str, object] = {'srcc': math.nan, 'krcc': math.nan, 'plcc': math.nan, 'plcc_logistic': math.nan,
                                 'error': '', 'logistic_params': None}
    if len(pred) < 3:
        result['error'] = f'correlations need at least 3 scored images, got {len(pred)}'
    elif np.ptp(pred) == 0:
        result['error'] = (f'the scores are constant ({float(np.asarray(scores)[0]):.6g} on every image), so '
                           'correlations are undefined')
    elif np.ptp(labels) == 0:
        result['error'] = 'the labels are constant, so correlations are undefined'
    if result['error']:
        return result
    result.update(correlation_values(pred, labels))
    try:
        result['plcc_logistic'], result['logistic_params'] = logistic_plcc(pred, labels)
    except ValueError as error:
        result['error'] = f'plcc_logistic: {error}'
    return result


# --------------------------------------------------------------------------------------------------- scoring
class _TimedMetric:
    """A pyiqa metric that adds the wall time of its calls (GPU work included) to ``seconds``.

    It shows scoring what the metric is (mode, device, ``net`` with its declared resize, the input range check),
    so that images reach it as they reach the metric itself in ``score``.
    """

    def __init__(self, metric) -> None:
        self.metric = metric
        self.metric_mode = metric.metric_mode
        self.net = metric.net
        self.device = metric_device(metric)
        self.seconds = 0.0

    @property
    def check_input_range(self) -> bool:
        return self.metric.check_input_range

    @check_input_range.setter
    def check_input_range(self, value: bool) -> None:
        self.metric.check_input_range = value

    def __call__(self, *inputs: torch.Tensor):
        start = time.perf_counter()
        try:
            output = self.metric(*inputs)
            if self.device.type == 'cuda':
                torch.cuda.synchronize()
            return output
        finally:
            self.seconds += time.perf_counter() - start


def split_metric_name(name: str) -> Tuple[str, str]:
    """``NAME@TAG`` -> (pyiqa metric NAME, TAG); a plain name has the tag ''."""
    base, at, tag = name.partition('@')
    if not base or (at and not tag):
        raise ValueError(f'metric {name!r} is not of the form NAME or NAME@TAG')
    return base, tag


def _create_metrics(names: Sequence[str], options: Mapping[str, Mapping[str, object]], device: Optional[str],
                    has_references: bool, report: ScoreReport) -> Dict[str, _TimedMetric]:
    """Create every metric that can be (timed); each one that cannot is recorded in ``report`` with the reason."""
    missing = None if has_references else ('full-reference metric, but the data has no reference images (only '
                                            'pyiqa FR dataset infos, via dataset=, provide them)')
    created = create_metrics(names, dict(options), device, report, missing_references=missing,
                             pyiqa_name=lambda name: split_metric_name(name)[0])
    return OrderedDict((name, _TimedMetric(metric)) for name, metric in created.items())


def _score_all(data: LabelledImages, metrics: Dict[str, _TimedMetric], batch_size: int, progress: bool,
               report: ScoreReport, workers: int) -> None:
    """Decode each image once (in ``workers`` processes) and score it with every metric, in batches (see
    :func:`pyiqa_grmp.scoring.score_stream`)."""
    needs_references = any(m.metric_mode == 'FR' for m in metrics.values())
    reference_of = (lambda index, path: data.references[index]) if needs_references else None
    score_paths(data.images, metrics, report, batch_size, progress, reference_of, desc='comparing', workers=workers)


def _failure_text(failures: List[Failure], total: int) -> str:
    listed = '; '.join(f.reason if f.image in f.reason else f'{f.image}: {f.reason}'
                       for f in failures[:LISTED_FAILURES])
    more = f'; and {len(failures) - LISTED_FAILURES} more' if len(failures) > LISTED_FAILURES else ''
    return f'{len(failures)} of {total} images failed: {listed}{more}'


@dataclass
class _Outcome:
    """What one metric produced: raw scores per row (NaN where it failed) and everything the table shows."""

    name: str
    scores: np.ndarray
    failures: List[Failure]
    stats: Dict[str, object]
    row: Dict[str, object]


def _outcomes(data: LabelledImages, names: Sequence[str], metrics: Dict[str, _TimedMetric],
              report: ScoreReport) -> List[_Outcome]:
    """Per metric: its raw scores, every failure with its reason, its correlations and its row of the table."""
    image_errors = {f.image: f.reason for f in report.errors if f.kind == 'image'}
    metric_errors = {(f.metric, f.image): f.reason for f in report.errors if f.kind == 'score'}
    creation_errors = {f.metric: f.reason for f in report.errors if f.kind == 'metric'}
    total = len(data.images)
    outcomes = []
    for name in names:
        scores = np.full(total, math.nan)
        failures: List[Failure] = []
        if name in metrics:
            for row, path in enumerate(data.images):
                value = report.scores.get(path, {}).get(name, math.nan)
                if path in image_errors or (name, path) in metric_errors:
                    failures.append(Failure(name, path, image_errors.get(path) or metric_errors[(name, path)]))
                elif not math.isfinite(value):
                    failures.append(Failure(name, path, f'the metric returned {value}'))
                else:
                    scores[row] = value
        scored = np.isfinite(scores)
        lower_better = bool(metrics[name].metric.lower_better) if name in metrics else None
        stats = correlations(scores[scored], data.mos[scored], bool(lower_better), data.lower_better)
        errors = [creation_errors[name]] if name in creation_errors else []
        errors += [_failure_text(failures, total)] if failures else []
        errors += [stats['error']] if stats['error'] and name not in creation_errors else []
        seconds = metrics[name].seconds / scored.sum() if name in metrics and scored.any() else math.nan
        row = {'metric': name, **{k: stats[k] for k in ('srcc', 'krcc', 'plcc', 'plcc_logistic')},
               'scored': int(scored.sum()), 'failed': int(total - scored.sum()), 'seconds_per_image': seconds,
               'lower_better': lower_better, 'error': ' | '.join(errors)}
        outcomes.append(_Outcome(name, scores, failures, stats, row))
    return outcomes


# --------------------------------------------------------------------------------------------------- outputs
def _cell(value: object, float_format: str = '.4f') -> str:
    if isinstance(value, float):
        return 'n/a' if math.isnan(value) else format(value, float_format)
    if value is None:
        return ''
    return str(value).replace('|', '\\|').replace('\n', ' ')


def results_markdown(table: pd.DataFrame, description: str) -> str:
    """The results table in Markdown, under a line stating the data, split and number of images."""
    header = ['metric', 'SRCC', 'KRCC', 'PLCC', 'PLCC (logistic)', 'scored', 'failed', 's / image', 'lower better',
              'error']
    lines = [f'Data: {description}.', '',
             'Correlations of lower-better metrics are computed on negated scores, so higher is better for all.', '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for _, row in table.iterrows():
        lines.append('| ' + ' | '.join(_cell(row[c], '.3g' if c == 'seconds_per_image' else '.4f')
                                       for c in RESULT_COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


def _per_image_table(data: LabelledImages, outcomes: List[_Outcome]) -> pd.DataFrame:
    columns: Dict[str, object] = {'image': data.images}
    if data.references is not None:
        columns['reference'] = data.references
    columns['mos'] = data.mos
    for outcome in outcomes:
        columns[outcome.name] = outcome.scores
    reasons: Dict[str, List[str]] = {}
    for outcome in outcomes:
        for failure in outcome.failures:
            reasons.setdefault(failure.image, [])
            if failure.reason not in reasons[failure.image]:
                reasons[failure.image].append(failure.reason)
    columns['errors'] = [' | '.join(reasons.get(path, [])) for path in data.images]
    return pd.DataFrame(columns)


def _scatter_plot(data: LabelledImages, outcomes: List[_Outcome], path: str) -> None:
    """Predicted score against label, one panel per metric with its SRCC; failed metrics get a panel saying why."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(outcomes))
    rows = math.ceil(len(outcomes) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows), layout='constrained')
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    label = 'DMOS (lower is better)' if data.lower_better else 'MOS'
    for axis, outcome in zip(axes, outcomes):
        scored = np.isfinite(outcome.scores)
        if not scored.any():
            axis.set_axis_off()
            axis.text(0.5, 0.5, f'{outcome.name}: no scores\n\n' + textwrap.fill(outcome.row['error'][:400], 45),
                      ha='center', va='center', fontsize=8, color='C3', transform=axis.transAxes)
            continue
        x, y = outcome.scores[scored], data.mos[scored]
        axis.scatter(x, y, s=10, alpha=0.6)
        params = outcome.stats['logistic_params']
        if params is not None:  # the fit maps sign-adjusted scores to sign-adjusted labels
            grid = np.linspace(x.min(), x.max(), 200)
            score_sign = -1.0 if outcome.row['lower_better'] else 1.0
            label_sign = -1.0 if data.lower_better else 1.0
            axis.plot(grid, label_sign * logistic_4(score_sign * grid, *params), color='C1', linewidth=1.5)
        failed = f', {outcome.row["failed"]} failed' if outcome.row['failed'] else ''
        axis.set_title(f'{outcome.name}: SRCC {_cell(outcome.row["srcc"])}{failed}', fontsize=10)
        axis.set_xlabel('score' + (' (lower is better)' if outcome.row['lower_better'] else ''))
        axis.set_ylabel(label)
    for axis in axes[len(outcomes):]:
        axis.set_axis_off()
    save_figure_atomically(figure, path)


def _write_outputs(out_dir: str, table: pd.DataFrame, data: LabelledImages, outcomes: List[_Outcome]) -> None:
    """results.csv, results.md, per_image.csv (paths as in a score CSV) and scatter.png, each written atomically."""
    write_atomically(os.path.join(out_dir, 'results.csv'), table.to_csv(index=False))
    write_atomically(os.path.join(out_dir, 'results.md'), results_markdown(table, data.description))
    per_image = _per_image_table(data, outcomes)
    for column in ('image', 'reference'):
        if column in per_image:
            per_image[column] = per_image[column].map(encode_path)
    write_atomically(os.path.join(out_dir, 'per_image.csv'), per_image.to_csv(index=False))
    _scatter_plot(data, outcomes, os.path.join(out_dir, 'scatter.png'))


# ---------------------------------------------------------------------------------------------------- the API
def compare(metrics: Sequence[str], *, dataset: Optional[str] = None, data_root: str = './datasets',
            meta_info: Optional[str] = None, root: Optional[str] = None, split: str = 'all',
            split_seed: Optional[int] = None, num_shots: Optional[int] = None, train_ratio: float = 0.8,
            mos_lower_better: Optional[bool] = None,
            metric_options: Optional[Mapping[str, Mapping[str, object]]] = None, device: Optional[str] = None,
            batch_size: int = 8, workers: Optional[int] = None, precision: Optional[str] = None,
            out_dir: Optional[str] = None, progress: bool = True) -> pd.DataFrame:
    """Score the same labelled images with every metric and return one row of correlations per metric.

    Data: ``dataset=`` a pyiqa dataset name (its paths re-rooted from ``./datasets`` to ``data_root``) or
    ``meta_info=`` an NR meta CSV (column 0 image path relative to ``root=``, column 1 MOS). ``split='all'``
    scores every row; ``split='test'`` only the test split of the few-shot protocol of ``split_seed`` /
    ``num_shots`` / ``train_ratio``, so a model fine-tuned with that seed is never scored on its training images.
    ``mos_lower_better`` overrides the dataset info's ``lower_better`` (default False for a meta CSV).

    ``metrics`` are pyiqa names, optionally ``NAME@TAG`` to compare variants of one metric; the whole string
    names the row and keys ``metric_options`` (keyword arguments of ``pyiqa.create_metric``). ``precision``
    ('fp32', 'bf16', 'fp16') applies to the GRMP-IQA metrics only (see :mod:`pyiqa_grmp.precision`); an explicit
    ``precision`` in ``metric_options`` wins. Failures are reported in the ``error``, ``scored`` and ``failed``
    columns, never raised; bad arguments raise ValueError.
    ``seconds_per_image`` is the time spent in the metric's calls (retries of failed batches included) per
    scored image; decoding, in ``workers`` processes (0: this one; None: :func:`~pyiqa_grmp.scoring.default_workers`,
    as the command line), is not counted, nor is the fixed resize a metric declares (GRMP-IQA's squash resize),
    which runs with the decoding so that images of any size are batched together.
    With ``out_dir``: results.csv, results.md, per_image.csv (raw scores) and scatter.png are written there.
    """
    names = list(metrics)
    if not names:
        raise ValueError('give at least one metric name')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'metric names must be unique (use NAME@TAG for variants): {duplicates} repeated')
    for name in names:
        split_metric_name(name)
    metric_options = dict(metric_options or {})
    unknown = sorted(set(metric_options) - set(names))
    if unknown:
        raise InvalidArgument('metric_options', f'names metrics that are not compared: {unknown} (keys are the '
                                                f'full names, e.g. grmp_iqa@a)')
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument('batch_size', f'must be an integer >= 1, got {batch_size!r}')
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise InvalidArgument('workers', f'must be an integer >= 0, got {workers!r}')
    metric_options = add_precision_option(names, metric_options, precision, device,
                                          lambda name: split_metric_name(name)[0])
    check_metric_requests(names, metric_options, lambda name: split_metric_name(name)[0])
    data = load_labelled_images(dataset=dataset, data_root=data_root, meta_info=meta_info, root=root, split=split,
                                split_seed=split_seed, num_shots=num_shots, train_ratio=train_ratio,
                                mos_lower_better=mos_lower_better)

    report = ScoreReport(images=data.images, refs={}, metrics=names)
    created = _create_metrics(names, metric_options, device, data.references is not None, report)
    if created:
        _score_all(data, created, batch_size, progress, report, workers)
    outcomes = _outcomes(data, names, created, report)
    table = pd.DataFrame([o.row for o in outcomes], columns=RESULT_COLUMNS)
    table.attrs['description'] = data.description
    if out_dir is not None:
        _write_outputs(out_dir, table, data, outcomes)
    return table

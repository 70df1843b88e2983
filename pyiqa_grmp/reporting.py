"""What a training run leaves to look at: curves.png drawn from its metrics log (:mod:`pyiqa_grmp.metrics_log`),
held-out correlations with bootstrap confidence intervals, and a before/after scatter plot. Files are written
atomically.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .checkpointing import atomic_write
from .metrics_log import METRICS_FILE, read_metrics

CURVES_FILE = 'curves.png'
CORRELATIONS = ('srcc', 'plcc', 'krcc')
KENDALL_PAIRWISE_MAX = 64


# ------------------------------------------------------------------------------------------- atomic files
def write_atomically(path: str, data: Union[bytes, str]) -> None:
    """Write ``data`` (text as UTF-8) so that a reader sees the old file or the complete new one, never a part."""
    payload = data.encode('utf-8') if isinstance(data, str) else data
    atomic_write(path, lambda handle: handle.write(payload))


def copy_atomically(source: str, target: str) -> None:
    """Copy a file with :func:`write_atomically` semantics."""
    with open(source, 'rb') as stream:
        write_atomically(target, stream.read())


def save_figure_atomically(figure, path: str, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG with :func:`write_atomically` semantics."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=dpi)
    write_atomically(path, buffer.getvalue())


def _series(records: Sequence[dict], key: str) -> Tuple[np.ndarray, np.ndarray]:
    points = [(r['iter'], r[key]) for r in records if isinstance(r.get(key), (int, float))
              and not isinstance(r.get(key), bool)]
    if not points:
        return np.array([]), np.array([])
    x, y = zip(*points)
    return np.array(x), np.array(y, dtype=float)


def plot_curves(jsonl_path: str, png_path: str, title: Optional[str] = None) -> str:
    """Draw a metrics log: training losses, validation SRCC/PLCC (and any other validation metric) and the
    learning rate, each against the iteration; returns ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    train = [r for r in records if r['kind'] == 'train']
    val = [r for r in records if r['kind'] == 'val']
    reserved = {'kind', 'iter', 'epoch', 'lr', 'dataset', 'improved'}
    losses = sorted({k for r in train for k in r if k.startswith('l_')})
    train_metrics = sorted({k for r in train for k in r if k not in reserved and not k.startswith('l_')})
    val_metrics = sorted({k for r in val for k in r if k not in reserved})
    datasets = sorted({str(r.get('dataset', '')) for r in val})

    figure = Figure(figsize=(15, 4), layout='constrained')
    FigureCanvasAgg(figure)
    loss_axis, val_axis, lr_axis = figure.subplots(1, 3)
    for name in losses:
        loss_axis.plot(*_series(train, name), label=name, linewidth=1)
    loss_axis.set_title('training losses')
    names = sorted(set(val_metrics) | {name.split('/')[-1] for name in train_metrics})
    colour = {name: f'C{index}' for index, name in enumerate(names)}  # a metric keeps its colour in both
    for name in train_metrics:  # batch metrics of the training step, for comparison with validation
        short = name.split('/')[-1]
        val_axis.plot(*_series(train, name), label=f'train batch {short}', linewidth=0.8, alpha=0.35,
                      color=colour[short])
    for number, dataset in enumerate(datasets):
        rows = [r for r in val if str(r.get('dataset', '')) == dataset]
        for name in val_metrics:
            x, y = _series(rows, name)
            if len(x):
                val_axis.plot(x, y, marker='os^v'[number % 4], markersize=3, color=colour[name],
                              label=f'val {name}' + (f' ({dataset})' if len(datasets) > 1 else ''))
        best = [r for r in rows if r.get('improved')]
        if best:
            val_axis.axvline(best[-1]['iter'], color='grey', linestyle=':', linewidth=1)
    val_axis.set_title('validation (dotted: checkpoint kept)' if val else 'validation: none logged')
    x, y = _series(train, 'lr')
    lr_axis.plot(x, y, color='C3')
    if len(y) and (y > 0).all():
        lr_axis.set_yscale('log')
    lr_axis.set_title('learning rate')
    for axis in (loss_axis, val_axis, lr_axis):
        axis.set_xlabel('iteration')
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    save_figure_atomically(figure, png_path)
    return png_path


def plot_run_curves(opt: Mapping) -> Optional[str]:
    """Draw ``curves.png`` from a training run's ``metrics.jsonl`` (both in its experiment folder, pyiqa's
    ``path.log``); only on rank 0, and only when the run logged anything. Returns the PNG path or None."""
    metrics = os.path.join(opt['path']['log'], METRICS_FILE)
    if opt.get('rank', 0) != 0 or not os.path.isfile(metrics):
        return None
    return plot_curves(metrics, os.path.join(opt['path']['log'], CURVES_FILE), title=opt.get('name'))


# ------------------------------------------------------------------------------------- correlations, CIs
def _ranks(rows: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(rows, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(denominator > 0, (x * y).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair; NaN where a row is constant. Pairwise signs for up to
    ``KENDALL_PAIRWISE_MAX`` images (fast for bootstrap resamples), scipy's O(n log n) per row above that."""
    from scipy.stats import kendalltau

    count = x.shape[-1]
    if count > KENDALL_PAIRWISE_MAX:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # constant rows give NaN
            return np.array([kendalltau(a, b)[0] for a, b in zip(x, y)], dtype=float)
    values = np.empty(x.shape[0])
    chunk = max(1, 4_000_000 // (count * count))
    for start in range(0, x.shape[0], chunk):
        a, b = x[start:start + chunk], y[start:start + chunk]
        sign_a = np.sign(a[:, :, None] - a[:, None, :])
        sign_b = np.sign(b[:, :, None] - b[:, None, :])
        concordance = (sign_a * sign_b).sum(axis=(1, 2))
        untied = np.sqrt(np.abs(sign_a).sum(axis=(1, 2)) * np.abs(sign_b).sum(axis=(1, 2)))
        with np.errstate(invalid='ignore', divide='ignore'):
            values[start:start + chunk] = np.where(untied > 0, concordance / np.where(untied > 0, untied, 1), np.nan)
    return values


_ROW_STATISTICS: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'srcc': lambda x, y: _pearson_rows(_ranks(x), _ranks(y)),
    'plcc': _pearson_rows,
    'krcc': _kendall_rows,
}


def correlation_values(pred: Sequence[float], mos: Sequence[float]) -> Dict[str, float]:
    """SRCC, PLCC (plain Pearson) and KRCC (tau-b) of predictions against labels (higher-better both)."""
    pred, mos = np.asarray(pred, dtype=float)[None], np.asarray(mos, dtype=float)[None]
    return {name: float(_ROW_STATISTICS[name](pred, mos)[0]) for name in CORRELATIONS}


def bootstrap_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, count) image indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def bootstrap_intervals(pred: Sequence[float], mos: Sequence[float], indices: np.ndarray,
                        confidence: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """Percentile bootstrap intervals of SRCC, PLCC and KRCC over the resamples ``indices`` of the images."""
    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for name in CORRELATIONS:
        values = _ROW_STATISTICS[name](pred[indices], mos[indices])
        intervals[name] = (float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail)))
    return intervals


def bootstrap_gain_intervals(before: Sequence[float], after: Sequence[float], mos: Sequence[float],
                             indices: np.ndarray, confidence: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """Paired percentile intervals of (after - before) per correlation: both models on the same resamples."""
    before, after, mos = (np.asarray(v, dtype=float) for v in (before, after, mos))
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for name in CORRELATIONS:
        statistic = _ROW_STATISTICS[name]
        gains = statistic(after[indices], mos[indices]) - statistic(before[indices], mos[indices])
        intervals[name] = (float(np.nanpercentile(gains, tail)), float(np.nanpercentile(gains, 100 - tail)))
    return intervals


def scatter_before_after(mos: Sequence[float], before: Sequence[float], after: Sequence[float], png_path: str,
                         mos_label: str = 'MOS', titles: Tuple[str, str] = ('before', 'after')) -> str:
    """Two panels: predictions of the starting and of the adapted model against the labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4), layout='constrained')
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for axis, values, title in zip(axes, (before, after), titles):
        stats = correlation_values(values, mos)
        axis.scatter(mos, values, s=12, alpha=0.7)
        axis.set_title(f'{title}: SRCC {stats["srcc"]:.3f}, PLCC {stats["plcc"]:.3f}', fontsize=10)
        axis.set_xlabel(mos_label)
        axis.set_ylabel('predicted quality')
    save_figure_atomically(figure, png_path)
    return png_path

"""What a training run leaves to look at: curves.png drawn from its metrics log (:mod:`pyiqa_grmp.metrics_log`)
and a before/after scatter plot (correlations and their bootstrap intervals are :mod:`pyiqa_grmp.stats`). Files are
written atomically.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from .checkpointing import write_atomically
from .data.image_io import open_regular_file
from .metrics_log import METRICS_FILE, read_metrics
from .stats import correlation_values

CURVES_FILE = 'curves.png'


# ------------------------------------------------------------------------------------------- atomic files
def copy_atomically(source: str, target: str) -> None:
    """Copy a regular file with :func:`write_atomically` semantics."""
    with open_regular_file(source) as stream:
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


# ------------------------------------------------------------------------------------------- figures
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

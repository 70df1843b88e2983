"""The demo (``pyiqa-grmp demo``): the first thing to run after installing.

Photos bundled with scikit-image (no download) are scored clean and at 5 levels of 3 distortions by GRMP-IQA
(the authors' weights, downloaded on first use into pyiqa's cache) and two classic pyiqa metrics that need no
download. The command prints the mean scores, and for each metric the share of photo x distortion series it
ranks in the right order (clean best, then quality falling level by level), and draws ``demo.png``: one photo's
series with each metric's score under every image. Without the GRMP-IQA weights (offline) it says where to put
them in one line and shows the other metrics; it exits 0 either way, and 1 only when something is broken.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from .data.synthetic import DISTORTIONS, LEVELS, _square
from .errors import InvalidArgument
from .scoring import MissingWeightsError, build_metrics
from .stats import srcc

DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')
DEMO_DISTORTIONS = ('gaussian_blur', 'gaussian_noise', 'jpeg')
#: grmp_iqa plus two pyiqa NR metrics that run offline (no weights or parameter files to fetch).
DEMO_METRICS = ('grmp_iqa', 'piqe', 'entropy')
DEFAULT_OUT = os.path.join('results', 'demo')
#: Smallest side of the demo photos, in pixels.
MIN_SIZE = 32


@dataclass
class DemoImage:
    """One scored image: its photo, distortion ('clean' for the original), level (0 = clean) and pixels."""

    photo: str
    distortion: str
    level: int
    pixels: np.ndarray  # H x W x 3 uint8


@dataclass
class DemoResult:
    """Scores (one column per metric that ran), ranking shares, and what did not run and why."""

    scores: pd.DataFrame
    lower_better: Dict[str, bool]
    ranking: Dict[str, Tuple[int, int]]  # metric -> (series in the right order, series)
    level_srcc: Dict[str, float] = field(default_factory=dict)  # metric -> mean SRCC of quality with -level
    notes: List[str] = field(default_factory=list)  # expected (weights offline): exit 0
    problems: List[str] = field(default_factory=list)  # broken: exit 1
    written: List[str] = field(default_factory=list)  # files written into out_dir


def demo_images(size: int = 224, seed: int = 0) -> List[DemoImage]:
    """The bundled photos, centre-cropped square at ``size``: each clean and at every level of each distortion."""
    from skimage import data

    rng = np.random.default_rng(seed)
    images = []
    for photo in DEMO_PHOTOS:
        clean = _square(getattr(data, photo)(), size)
        images.append(DemoImage(photo, 'clean', 0, np.asarray(clean)))
        for distortion in DEMO_DISTORTIONS:
            images += [DemoImage(photo, distortion, level, np.asarray(DISTORTIONS[distortion](clean, level, rng)))
                       for level in LEVELS]
    return images


def _missing_weights_line(name: str, error: Exception) -> str:
    from .pretrained import DEFAULT_VARIANT, get_variant, weights_cache_dir

    if isinstance(error, MissingWeightsError):
        file_name, url, folder = error.file_name, error.url, error.folder
    else:
        variant = get_variant(DEFAULT_VARIANT)
        file_name, url, folder = variant.file_name, variant.url(), weights_cache_dir()
    return (f'{name}: the authors\' weights are not available ({type(error).__name__}); put {file_name} '
            f'(from {url}) into {folder} or give it the option pretrained_model_path=FILE (metric_options=, or '
            f'--metric-opt {name}:pretrained_model_path=FILE). Showing the other metrics.')


def _create(names: Sequence[str], options: Mapping[str, Mapping], device: Optional[str],
            result: DemoResult) -> Dict[str, object]:
    from .pretrained import WeightsNotFoundError

    created, failed = build_metrics(names, options, device)
    metrics = {}
    for name in names:
        error = failed.get(name)
        if isinstance(error, WeightsNotFoundError):
            result.notes.append(_missing_weights_line(name, error))
        elif error is not None:
            result.problems.append(f'{name}: cannot create the metric: {type(error).__name__}: {error}')
        elif created[name].metric_mode != 'NR':
            result.problems.append(f'{name}: a full-reference metric; the demo scores single images')
        else:
            metrics[name] = created[name]
            result.lower_better[name] = bool(created[name].lower_better)
    return metrics


def _ranking(scores: pd.DataFrame, name: str, lower_better: bool) -> Tuple[int, int, float]:
    """Series (photo x distortion: clean, then levels 1..5) whose quality falls strictly with the level (a tie is
    not an order), the number of series, and the mean SRCC of quality against minus the level."""
    right = total = 0
    correlations = []
    for photo in DEMO_PHOTOS:
        clean = scores[(scores.photo == photo) & (scores.level == 0)][name].to_numpy()
        for distortion in DEMO_DISTORTIONS:
            rows = scores[(scores.photo == photo) & (scores.distortion == distortion)].sort_values('level')
            series = np.concatenate([clean, rows[name].to_numpy()])
            quality = -series if lower_better else series
            total += 1
            right += bool(np.all(np.diff(quality) < 0))
            correlations.append(srcc(quality, -np.arange(len(quality))) if np.ptp(quality) else 0.0)
    return right, total, float(np.mean(correlations))


def run_demo(metrics: Sequence[str] = DEMO_METRICS, metric_options: Optional[Mapping[str, Mapping]] = None,
             device: Optional[str] = None, size: int = 224, batch_size: int = 16,
             out_dir: Optional[str] = DEFAULT_OUT) -> DemoResult:
    """Score the demo images (``size`` pixels square) with every metric that can be created, and write
    ``scores.csv`` and ``demo.png`` into ``out_dir`` (None: nothing is written); see the module docstring.

    A metric that cannot run is a note (its weights are missing) or a problem (anything else) of the result, never
    an exception; bad arguments raise ValueError.
    """
    from .checkpointing import write_atomically

    metric_options = dict(metric_options or {})
    unknown = sorted(set(metric_options) - set(metrics))
    if unknown:
        raise InvalidArgument('metric_options', f'names metrics that the demo does not run: {unknown}')
    if size < MIN_SIZE:
        raise InvalidArgument('size', f'must be at least {MIN_SIZE} pixels, got {size}')
    images = demo_images(size)
    result = DemoResult(scores=pd.DataFrame({'photo': [i.photo for i in images],
                                             'distortion': [i.distortion for i in images],
                                             'level': [i.level for i in images]}),
                        lower_better={}, ranking={})
    created = _create(metrics, metric_options, device, result)
    pixels = torch.from_numpy(np.stack([i.pixels for i in images])).permute(0, 3, 1, 2).float() / 255
    for name, metric in created.items():
        try:
            with torch.no_grad():
                values = torch.cat([metric(pixels[start:start + batch_size]).detach().float().cpu().reshape(-1)
                                    for start in range(0, len(images), batch_size)])
        except Exception as error:
            result.problems.append(f'{name}: scoring failed: {type(error).__name__}: {error}')
            continue
        if not torch.isfinite(values).all():
            result.problems.append(f'{name}: returned non-finite scores')
        result.scores[name] = values.numpy()
        right, total, level_srcc = _ranking(result.scores, name, result.lower_better[name])
        result.ranking[name], result.level_srcc[name] = (right, total), level_srcc
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        result.written.append(os.path.join(out_dir, 'scores.csv'))
        write_atomically(result.written[-1], result.scores.to_csv(index=False))
        if result.ranking:
            result.written.append(draw_strip(result, images, os.path.join(out_dir, 'demo.png')))
    return result


def summary_table(result: DemoResult) -> str:
    """Mean score over the photos per distortion and level, the share of series in the right order and the mean
    per-series SRCC (quality against minus the level; 1 is a perfect order), as Markdown."""
    names = [n for n in result.ranking]
    header = ['distortion', 'level'] + [f'{n} ({"lower" if result.lower_better[n] else "higher"} is better)'
                                        for n in names]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    means = result.scores.groupby(['distortion', 'level'], sort=False)[names].mean() if names else None
    for (distortion, level), row in (means.iterrows() if names else []):
        lines.append(f'| {distortion} | {level} | ' + ' | '.join(f'{row[n]:.4f}' for n in names) + ' |')
    lines.append('| **series in the right order** | | ' + ' | '.join(
        f'**{right}/{total} ({right / total:.0%})**' for right, total in (result.ranking[n] for n in names)) + ' |')
    lines.append('| mean SRCC of quality with the level, per series | | ' +
                 ' | '.join(f'{result.level_srcc[n]:.3f}' for n in names) + ' |')
    return '\n'.join(lines)


def draw_strip(result: DemoResult, images: Sequence[DemoImage], path: str, photo: str = DEMO_PHOTOS[0]) -> str:
    """``demo.png``: one photo, a row per distortion (clean, then levels 1..5), every metric's score under each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .reporting import save_figure_atomically

    names = list(result.ranking)
    columns = 1 + len(LEVELS)
    figure = Figure(figsize=(2.1 * columns, (2.2 + 0.17 * len(names)) * len(DEMO_DISTORTIONS)), layout='constrained')
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(DEMO_DISTORTIONS), columns, squeeze=False)
    for row, distortion in enumerate(DEMO_DISTORTIONS):
        for column in range(columns):
            level = column
            index = next(k for k, image in enumerate(images) if image.photo == photo and image.level == level and
                         image.distortion == ('clean' if level == 0 else distortion))
            axis = axes[row, column]
            axis.imshow(images[index].pixels)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title('clean' if level == 0 else f'{distortion} {level}', fontsize=9)
            axis.set_xlabel('\n'.join(f'{n} {result.scores[n][index]:.3g}' for n in names), fontsize=8)
    shares = ', '.join(f'{n}: {right}/{total}' for n, (right, total) in result.ranking.items())
    figure.suptitle(f'{photo}: scores under each image; series in the right order over {len(DEMO_PHOTOS)} photos: '
                    f'{shares}' + ('\n' + result.notes[0].split(';')[0] if result.notes else ''), fontsize=9)
    save_figure_atomically(figure, path)
    return path

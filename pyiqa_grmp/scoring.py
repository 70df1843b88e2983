"""Scoring image files with any pyiqa metric (GRMP-IQA included): decoding each file once, batching images of
equal size, bounding memory, and recording every failure instead of stopping or skipping silently."""
from __future__ import annotations

import csv
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .data.image_io import ImageReadError, list_images, read_image

#: Pixels (per channel) read before a chunk of images is scored, whatever the batch size.
MAX_CHUNK_PIXELS = 48_000_000


@dataclass
class ScoreReport:
    """Scores of every metric on every image, and every failure with its reason."""

    images: List[str]
    refs: Dict[str, str]
    metrics: List[str]
    scores: Dict[str, Dict[str, float]] = field(default_factory=dict)  # image -> metric -> score
    errors: List[Tuple[str, str, str]] = field(default_factory=list)  # (metric or '*', image or '*', reason)

    def add_error(self, metric: str, image: str, reason: str) -> None:
        self.errors.append((metric, image, reason))

    def summary(self) -> List[Tuple[str, float, int, int]]:
        """(metric, mean score, images scored, images failed) per metric."""
        rows = []
        for metric in self.metrics:
            values = [s[metric] for s in self.scores.values() if metric in s]
            failed = len(self.images) - len(values)
            mean = sum(values) / len(values) if values else math.nan
            rows.append((metric, mean, len(values), failed))
        return rows


def _collect(path: str, what: str) -> List[str]:
    if os.path.isdir(path):
        found = list_images(path)
        if not found:
            raise FileNotFoundError(f'no image files found in {what} folder {path}')
        return found
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f'{what} {path} does not exist')


def _pair_references(targets: List[str], target_root: str, ref_path: str, report: ScoreReport) -> List[str]:
    """Match each target with a reference: the same file, or the same relative path / file name in a folder."""
    if os.path.isfile(ref_path):
        for target in targets:
            report.refs[target] = ref_path
        return targets
    refs = _collect(ref_path, 'reference')
    by_relative = {os.path.relpath(r, ref_path): r for r in refs}
    by_name = {}
    for r in refs:
        by_name.setdefault(os.path.basename(r), []).append(r)
    paired = []
    for target in targets:
        relative = os.path.relpath(target, target_root) if os.path.isdir(target_root) else os.path.basename(target)
        match = by_relative.get(relative)
        candidates = by_name.get(os.path.basename(target), [])
        if match is None and len(candidates) == 1:
            match = candidates[0]
        if match is None:
            report.add_error('*', target, f'no reference image with the same name in {ref_path}')
        else:
            report.refs[target] = match
            paired.append(target)
    return paired


def _as_scores(output: object, count: int) -> List[float]:
    if isinstance(output, (tuple, list)):
        output = output[0]
    values = torch.as_tensor(output).detach().float().cpu().reshape(-1).tolist()
    if len(values) != count:
        raise RuntimeError(f'metric returned {len(values)} values for {count} images')
    return values


def parse_metric_options(specs: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """``NAME:KEY=VALUE`` strings -> {NAME: {KEY: VALUE}}; values are YAML (numbers, booleans, null, lists, dicts)."""
    import yaml

    options: Dict[str, Dict[str, object]] = {}
    for spec in specs:
        name, sep, assignment = spec.partition(':')
        key, eq, value = assignment.partition('=')
        if not (sep and eq and name and key):
            raise ValueError(f'--metric-opt {spec!r} is not of the form NAME:KEY=VALUE')
        try:
            options.setdefault(name, {})[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f'--metric-opt {spec!r}: value is not valid YAML ({error})') from error
    return options


def create_metrics(names: Sequence[str], options: Dict[str, Dict[str, object]], device: Optional[str],
                   report: ScoreReport, missing_references: Optional[str] = None,
                   pyiqa_name: Callable[[str], str] = lambda name: name) -> Dict[str, object]:
    """Create every metric that can be; each one that cannot is recorded in ``report`` with the reason.

    ``missing_references`` (when the data has none) is the reason recorded for full-reference metrics;
    ``pyiqa_name`` maps a row name (e.g. ``NAME@TAG``) to the name pyiqa knows.
    """
    import pyiqa

    metrics: Dict[str, object] = OrderedDict()
    for name in names:
        try:
            metric = pyiqa.create_metric(pyiqa_name(name), device=device, **options.get(name, {}))
        except Exception as error:
            report.add_error(name, '*', f'cannot create metric: {type(error).__name__}: {error}')
            continue
        if metric.metric_mode == 'FR' and missing_references:
            report.add_error(name, '*', missing_references)
            continue
        metrics[name] = metric
    return metrics


def score_images(metric_names: Sequence[str], target: str, ref: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True,
                 metric_options: Optional[Dict[str, Dict[str, object]]] = None) -> ScoreReport:
    """Score every image under ``target`` with every metric; failures are recorded, never raised or skipped.

    Images are decoded once, grouped into batches of equal size, and a failing batch is retried image by image
    so that one bad image only costs its own score.
    """
    images = _collect(target, 'target')
    report = ScoreReport(images=images, refs={}, metrics=list(metric_names))
    scorable = _pair_references(images, target, ref, report) if ref else images
    metric_options = metric_options or {}
    unknown = sorted(set(metric_options) - set(metric_names))
    if unknown:
        raise ValueError(f'--metric-opt names metrics that are not scored: {unknown}')
    metrics = create_metrics(metric_names, metric_options, device, report,
                             missing_references='full-reference metric: give reference images with -r' if not ref
                             else None)
    reference_of = (lambda index, path: report.refs[path]) if ref else None
    score_paths(scorable, metrics, report, batch_size, progress, reference_of)
    return report


def score_paths(paths: Sequence[str], metrics: Dict[str, object], report: ScoreReport, batch_size: int,
                progress: bool = True, reference_of: Optional[Callable[[int, str], str]] = None,
                desc: str = 'scoring') -> None:
    """Decode each image (and its reference) once and score it with every metric, recording every failure.

    A chunk holds at most ``batch_size`` images and about ``MAX_CHUNK_PIXELS`` pixels, so memory stays bounded
    whatever the image sizes; within it, images of equal size are scored together.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(paths), disable=not progress, desc=desc, unit='img', file=sys.stderr)
    chunk: List[Tuple[str, torch.Tensor, Optional[torch.Tensor]]] = []
    chunk_pixels = read_since_flush = 0
    for index, path in enumerate(paths):
        read_since_flush += 1
        try:
            image = read_image(path)
            reference = None
            if reference_of is not None:
                try:
                    reference = read_image(reference_of(index, path))
                except ImageReadError as error:
                    raise ImageReadError(f'reference of {path}: {error}') from error
            chunk.append((path, image, reference))
            chunk_pixels += image[0].numel()
        except ImageReadError as error:
            report.add_error('*', path, str(error))
        if len(chunk) == batch_size or chunk_pixels >= MAX_CHUNK_PIXELS or index == len(paths) - 1:
            _score_chunk(chunk, metrics, report)
            bar.update(read_since_flush)
            chunk, chunk_pixels, read_since_flush = [], 0, 0
    bar.close()


def _score_chunk(chunk, metrics, report: ScoreReport) -> None:
    """Score images of equal size together (pyiqa metrics take one tensor per call)."""
    groups: Dict[tuple, list] = OrderedDict()
    for item in chunk:
        _, image, reference = item
        key = (tuple(image.shape), None if reference is None else tuple(reference.shape))
        groups.setdefault(key, []).append(item)
    for group in groups.values():
        for name, metric in metrics.items():
            _score_group(name, metric, group, report)


def _score_group(name: str, metric, group, report: ScoreReport) -> None:
    def run(items) -> List[float]:
        target = torch.stack([image for _, image, _ in items])
        if metric.metric_mode == 'FR':
            return _as_scores(metric(target, torch.stack([r for _, _, r in items])), len(items))
        return _as_scores(metric(target), len(items))

    try:
        batches = [(group, run(group))]
    except Exception:
        batches = []
        for item in group:
            try:
                batches.append(([item], run([item])))
            except Exception as error:
                report.add_error(name, item[0], f'{type(error).__name__}: {error}')
    for items, values in batches:
        for (path, _, _), value in zip(items, values):
            report.scores.setdefault(path, {})[name] = value


def write_csv(report: ScoreReport, path: str) -> None:
    """One row per image: its scores per metric and the reasons of any failure."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['image', 'reference', *report.metrics, 'errors'])
        for image in report.images:
            scores = report.scores.get(image, {})
            reasons = [f'{m}: {r}' if m != '*' else r for m, i, r in report.errors if i in (image, '*')]
            writer.writerow([image, report.refs.get(image, ''),
                             *[f'{scores[m]:.6g}' if m in scores else '' for m in report.metrics],
                             ' | '.join(reasons)])

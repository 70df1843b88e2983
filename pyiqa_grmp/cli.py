"""``pyiqa-grmp``: score images with GRMP-IQA and any pyiqa metric, list metrics, train, run the protocol.

pyiqa's own ``pyiqa`` command never loads plugins; this one imports ``pyiqa_grmp`` first, so ``grmp_iqa``
and every built-in metric are available side by side.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
            raise SystemExit(f'error: no image files found in {what} folder {path}')
        return found
    if os.path.isfile(path):
        return [path]
    raise SystemExit(f'error: {what} {path} does not exist')


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
            raise SystemExit(f'error: --metric-opt {spec!r} is not of the form NAME:KEY=VALUE')
        try:
            options.setdefault(name, {})[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise SystemExit(f'error: --metric-opt {spec!r}: value is not valid YAML ({error})') from error
    return options


def score_images(metric_names: Sequence[str], target: str, ref: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True,
                 metric_options: Optional[Dict[str, Dict[str, object]]] = None) -> ScoreReport:
    """Score every image under ``target`` with every metric; failures are recorded, never raised or skipped.

    Images are decoded once, grouped into batches of equal size, and a failing batch is retried image by image
    so that one bad image only costs its own score.
    """
    import pyiqa
    from tqdm import tqdm

    images = _collect(target, 'target')
    report = ScoreReport(images=images, refs={}, metrics=list(metric_names))
    scorable = _pair_references(images, target, ref, report) if ref else images
    metric_options = metric_options or {}
    unknown = sorted(set(metric_options) - set(metric_names))
    if unknown:
        raise SystemExit(f'error: --metric-opt names metrics that are not scored: {unknown}')
    metrics = OrderedDict()
    for name in metric_names:
        try:
            metric = pyiqa.create_metric(name, device=device, **metric_options.get(name, {}))
        except Exception as error:
            report.add_error(name, '*', f'cannot create metric: {type(error).__name__}: {error}')
            continue
        if metric.metric_mode == 'FR' and not ref:
            report.add_error(name, '*', 'full-reference metric: give reference images with -r')
            continue
        metrics[name] = metric

    bar = tqdm(total=len(scorable), disable=not progress, desc='scoring', unit='img', file=sys.stderr)
    chunk: List[Tuple[str, torch.Tensor, Optional[torch.Tensor]]] = []
    chunk_pixels = read_since_flush = 0
    for index, path in enumerate(scorable):
        read_since_flush += 1
        try:
            image = read_image(path)
            reference = read_image(report.refs[path]) if ref else None
            chunk.append((path, image, reference))
            chunk_pixels += image[0].numel()
        except ImageReadError as error:
            report.add_error('*', path, str(error))
        # A chunk holds at most batch_size images and about MAX_CHUNK_PIXELS pixels, so memory stays bounded
        # whatever the image sizes.
        if len(chunk) == batch_size or chunk_pixels >= MAX_CHUNK_PIXELS or index == len(scorable) - 1:
            _score_chunk(chunk, metrics, report)
            bar.update(read_since_flush)
            chunk, chunk_pixels, read_since_flush = [], 0, 0
    bar.close()
    return report


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


def _print_report(report: ScoreReport, verbose: bool) -> None:
    width = max([len(m) for m in report.metrics] + [6])
    if verbose:
        for image in report.images:
            scores = report.scores.get(image, {})
            cells = '  '.join(f'{m}={scores[m]:.4f}' if m in scores else f'{m}=FAILED' for m in report.metrics)
            print(f'{image}  {cells}')
        print()
    print(f'{"metric":<{width}}  {"mean":>10}  {"scored":>6}  {"failed":>6}')
    for metric, mean, scored, failed in report.summary():
        print(f'{metric:<{width}}  {mean:>10.4f}  {scored:>6d}  {failed:>6d}')
    for metric, image, reason in report.errors:
        print(f'FAILED [{metric}] {image}: {reason}', file=sys.stderr)


def _cmd_score(args: argparse.Namespace) -> int:
    report = score_images(args.metrics, args.target, args.ref, args.device, args.batch_size, progress=True,
                          metric_options=parse_metric_options(args.metric_opt))
    _print_report(report, args.verbose)
    if args.csv:
        write_csv(report, args.csv)
        print(f'wrote {args.csv}')
    if report.errors:
        print(f'{len(report.errors)} failure(s); see the messages above', file=sys.stderr)
        return 1
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import pyiqa

    for name in pyiqa.list_models(metric_mode=args.mode):
        print(name)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    argv = ['-opt', args.opt, *(['--auto_resume'] if args.auto_resume else []),
            *(['--debug'] if args.debug else []), *(['--force_yml', *args.force_yml] if args.force_yml else [])]
    train(argv)
    return 0


def _cmd_protocol(args: argparse.Namespace) -> int:
    from .train import run_protocol

    run_protocol(['-opt', args.opt, *(['--force_yml', *args.force_yml] if args.force_yml else [])],
                 runs=args.runs, select=args.select, out_dir=args.out)
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data.synthetic import make_synthetic_dataset

    meta = make_synthetic_dataset(args.out_dir, seed=args.seed, size=args.size)
    print(f'wrote {meta}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='pyiqa-grmp', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)

    score = commands.add_parser('score', help='score images with one or more metrics')
    score.add_argument('metrics', nargs='+', help='metric names, e.g. grmp_iqa piqe (see "pyiqa-grmp list")')
    score.add_argument('-t', '--target', required=True, help='an image file or a folder (scanned recursively)')
    score.add_argument('-r', '--ref', help='reference image or folder, for full-reference metrics')
    score.add_argument('--device', choices=['cpu', 'cuda'], help='default: cuda when available')
    score.add_argument('--batch-size', type=int, default=8, help='images per forward pass (equal sizes only)')
    score.add_argument('--metric-opt', action='append', default=[], metavar='NAME:KEY=VALUE',
                       help='option for one metric, value parsed as YAML, e.g. '
                            'grmp_iqa:pretrained_model_path=experiments/x/models/net_best.pth (repeatable)')
    score.add_argument('--csv', help='write per-image scores and failures to this CSV file')
    score.add_argument('-v', '--verbose', action='store_true', help='print the score of every image')
    score.set_defaults(handler=_cmd_score)

    listing = commands.add_parser('list', help='list all metric names, GRMP-IQA included')
    listing.add_argument('--mode', choices=['NR', 'FR'], help='only no-reference or full-reference metrics')
    listing.set_defaults(handler=_cmd_list)

    training = commands.add_parser(
        'train', help="pyiqa's train_pipeline with GRMP-IQA loaded (experiments under the current directory)")
    training.add_argument('-opt', required=True, help='training YAML')
    training.add_argument('--auto_resume', action='store_true', help='resume from the latest training state')
    training.add_argument('--debug', action='store_true', help="pyiqa's debug mode (a few iterations)")
    training.add_argument('--force_yml', nargs='+', help='pyiqa-style option overrides, KEY:SUB=VALUE')
    training.set_defaults(handler=_cmd_train)

    protocol = commands.add_parser('protocol', help="the paper's repeated random-split few-shot protocol")
    protocol.add_argument('-opt', required=True, help='a fine-tuning YAML with FewShotNRDataset datasets')
    protocol.add_argument('--runs', type=int, default=10)
    protocol.add_argument('--select', choices=['val', 'test'], default='val',
                          help='choose each run\'s checkpoint on the validation carve-out (default) or, as the '
                               'official code, on the test split (optimistic)')
    protocol.add_argument('--force_yml', nargs='+', help='pyiqa-style option overrides, KEY:SUB=VALUE')
    protocol.add_argument('--out', help='folder for protocol.csv / protocol.md (default experiments/NAME_protocol)')
    protocol.set_defaults(handler=_cmd_protocol)

    synthetic = commands.add_parser('make-synthetic', help='write a small labelled IQA dataset from bundled photos')
    synthetic.add_argument('out_dir')
    synthetic.add_argument('--seed', type=int, default=0)
    synthetic.add_argument('--size', type=int, default=256)
    synthetic.set_defaults(handler=_cmd_make_synthetic)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyiqa-grmp`` console script; returns the exit status."""
    import pyiqa_grmp  # noqa: F401  (registers grmp_iqa with pyiqa)

    args = build_parser().parse_args(argv)
    if getattr(args, 'batch_size', 1) < 1:
        raise SystemExit('error: --batch-size must be >= 1')
    return args.handler(args)


if __name__ == '__main__':
    sys.exit(main())

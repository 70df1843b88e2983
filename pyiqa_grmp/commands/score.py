"""``pyiqa-grmp score``: per-image scores of any metrics on a folder, a list or one image (:func:`pyiqa_grmp.score`)."""
from __future__ import annotations

import argparse
import math
import sys

from ..data.image_io import printable
from ..options import parse_metric_options
from ._common import (UsageError, add_batch_arguments, add_command, add_device_argument, add_metric_options_argument,
                      add_precision_argument, api_default, precision_note)

EXAMPLES = (
    'pyiqa-grmp score grmp_iqa piqe entropy -t photos/ --csv scores.csv -v',
    'pyiqa-grmp score grmp_iqa -t photos/ --metric-opt grmp_iqa:pretrained_model_path=net_best.pth',
    'pyiqa-grmp score grmp_iqa -t files.txt --csv scores.csv --resume   # after a crash: only what is missing',
    'pyiqa-grmp score psnr ssim -t distorted/ -r references/            # full-reference: paired by name',
    'torchrun --nproc_per_node 8 -m pyiqa_grmp score grmp_iqa -t /photos --csv scores.csv',
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..api import score

    parser = add_command(subparsers, 'score', 'Score every image with every metric and print the mean per metric. '
                         'Unreadable files and failing metrics are reported by name, the rest is still scored, and '
                         'the exit status is then 1. Under torchrun they are rows too and only rank 0 exits 1 (the '
                         "other ranks 0): torchrun then prints its failure report for rank 0 alone, whose "
                         "traceback line gives the number of failures, and exits 1 (README: \"Exit status under "
                         'torchrun").', EXAMPLES)
    parser.add_argument('metrics', nargs='+', metavar='METRIC',
                        help='metric names, e.g. grmp_iqa piqe (see "pyiqa-grmp list")')
    parser.add_argument('-t', '--target', dest='targets', required=True, metavar='TARGET',
                        help='an image file, a folder (scanned recursively) or a .txt file listing image paths, one '
                             "per line (relative to the list's folder, or absolute)")
    parser.add_argument('-r', '--ref', default=api_default(score, 'ref'),
                        help='reference image or folder, for full-reference metrics')
    add_device_argument(parser, score)
    add_batch_arguments(parser, score)
    add_metric_options_argument(parser, 'grmp_iqa:pretrained_model_path=model.pth')
    add_precision_argument(parser, score)
    parser.add_argument('--csv', dest='csv_path', metavar='FILE', default=api_default(score, 'csv_path'),
                        help='write per-image scores and failures to this CSV file (rows are appended as batches '
                             'finish; the final file is in image order)')
    parser.add_argument('--resume', action='store_true', default=api_default(score, 'resume'),
                        help='keep the rows already in --csv (and its part files) and score only the missing images')
    parser.add_argument('-v', '--verbose', action='store_true', help='print the score of every image')
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..api import score

    if args.resume and not args.csv_path:
        raise UsageError('--resume needs --csv, the file of the run to resume')
    if distributed.launch_rank() == 0:  # every rank would say the same
        precision_note(args.metrics, args.precision)
    try:
        with distributed.warnings_once():
            frame = score(args.targets, args.metrics, ref=args.ref, device=args.device, batch_size=args.batch_size,
                          workers=args.workers, metric_options=parse_metric_options(args.metric_options),
                          precision=args.precision, csv_path=args.csv_path, resume=args.resume)
        status, failures = 0, len(frame.attrs['errors'])
        if distributed.get_rank() == 0:
            _print(frame, args.metrics, args.verbose)
            if args.csv_path:
                print(f'wrote {printable(args.csv_path)}')
            if failures:
                print(f'{failures} failure(s); see the messages above', file=sys.stderr)
                status = 1
        where = f'the errors column of {printable(args.csv_path)}' if args.csv_path else 'the FAILED lines'
        return distributed.leave_with_status(status, f'pyiqa-grmp score: {failures} failure(s) (images or metrics '
                                             f'that could not be scored; the others were): see {where}')
    finally:
        distributed.destroy()


def _print(frame, metrics, verbose: bool) -> None:
    width = max([len(m) for m in metrics] + [6])
    if verbose:
        for _, row in frame.iterrows():
            cells = '  '.join(f'{m}={row[m]:.4f}' if not math.isnan(row[m]) else f'{m}=FAILED' for m in metrics)
            print(f'{printable(row["image"])}  {cells}')
        print()
    print(f'{"metric":<{width}}  {"mean":>10}  {"scored":>6}  {"failed":>6}')
    for metric in metrics:
        scored = int(frame[metric].notna().sum())
        mean = frame[metric].mean() if scored else math.nan
        print(f'{metric:<{width}}  {mean:>10.4f}  {scored:>6d}  {len(frame) - scored:>6d}')
    for failure in frame.attrs['errors']:
        print(f'FAILED [{failure.metric or "*"}] {printable(failure.image or "*")}: {printable(failure.reason)}',
              file=sys.stderr)

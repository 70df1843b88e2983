"""``pyiqa-grmp score``: per-image scores of any metrics on a folder, a list or one image (:func:`pyiqa_grmp.score`)."""
from __future__ import annotations

import argparse
import math
import sys

from ..data.image_io import printable
from ..options import parse_metric_options
from ._common import (UsageError, add_batch_arguments, add_command, add_device_argument, add_metric_options_argument,
                      add_precision_argument, api_default, non_negative_int, positive_int, precision_note)

#: Failed images printed one by one at most, with --out (the rest are counted; their rows say why).
MAX_PRINTED_FAILURES = 20

EXAMPLES = (
    'pyiqa-grmp score grmp_iqa piqe entropy -t photos/ --csv scores.csv -v',
    'pyiqa-grmp score grmp_iqa -t photos/ --metric-opt grmp_iqa:pretrained_model_path=net_best.pth',
    'pyiqa-grmp score grmp_iqa -t files.txt --csv scores.csv --resume   # after a crash: only what is missing',
    'pyiqa-grmp score psnr ssim -t distorted/ -r references/            # full-reference: paired by name',
    'pyiqa-grmp score grmp_iqa -t /photos --csv scores.csv --fast      # bf16 and GPU decoding where they pay',
    'torchrun --nproc_per_node 8 -m pyiqa_grmp score grmp_iqa -t /photos --csv scores.csv',
    "pyiqa-grmp score grmp_iqa -t 'shards/{00000..00999}.tar' --out scores/   # one parquet per shard; reruns skip",
    "pyiqa-grmp score grmp_iqa -t data/*.parquet --image-column jpg --keep-columns url caption --out scores/",
    'pyiqa-grmp score grmp_iqa -t /photos --out scores/ --num-shards 100 --shard-index 7   # or from Slurm/torchrun',
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
    parser.add_argument('-t', '--target', dest='targets', required=True, metavar='TARGET', nargs='+',
                        action='extend',
                        help='an image file, a folder (scanned recursively) or a .txt file listing image paths, one '
                             "per line (relative to the list's folder, or absolute); or shards: webdataset .tar and "
                             '.parquet files, globs and brace ranges (quoted: \'shards/{00000..00999}.tar\')')
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
    shards = parser.add_argument_group('shards (see the README, "Score a large collection")')
    shards.add_argument('--out', metavar='DIR', default=api_default(score, 'out'),
                        help='write one parquet file per shard into DIR (folders and lists are cut into parts of '
                             '--shard-size images); a rerun skips completed shards and redoes partial ones')
    shards.add_argument('--num-shards', type=positive_int, metavar='N', default=api_default(score, 'num_shards'),
                        help='this is one of N tasks sharing the shards (default: from a Slurm array, torchrun or '
                             'Slurm ranks, else 1)')
    shards.add_argument('--shard-index', type=non_negative_int, metavar='I', default=api_default(score, 'shard_index'),
                        help='this task takes the shards I, I+N, I+2N, ... (default: from the scheduler, else 0)')
    shards.add_argument('--shard-size', type=positive_int, metavar='N', default=api_default(score, 'shard_size'),
                        help='images per part of a folder or list (default %(default)s)')
    shards.add_argument('--image-column', metavar='NAME', default=api_default(score, 'image_column'),
                        help='parquet column of image bytes (default: jpg, png, image, ... or an Image struct)')
    shards.add_argument('--key-column', metavar='NAME', default=api_default(score, 'key_column'),
                        help='parquet column naming the rows (default: key, else the row index)')
    shards.add_argument('--keep-columns', metavar='NAME', nargs='+', default=list(api_default(score, 'keep_columns')),
                        help='parquet columns copied into the output')
    parser.add_argument('--decode', choices=('cpu', 'gpu', 'auto'), default=api_default(score, 'decode'),
                        help='where JPEGs are decoded: cpu (default, exact), gpu (nvJPEG on the CUDA device, scores '
                             'within the measured deviation; metrics that declare a fixed resize, e.g. grmp_iqa) or '
                             'auto (gpu where it can be)')
    parser.add_argument('--fast', action='store_true', default=api_default(score, 'fast'),
                        help='the fastest configuration within the measured score deviation: --precision bf16 where '
                             'the device has bf16 (CUDA, CPUs with AVX-512 BF16/AMX/Arm BF16; else fp32, with a note) '
                             'and --decode auto; explicit --precision / --decode win')
    parser.add_argument('-v', '--verbose', action='store_true', help='print the score of every image')
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import distributed

    if args.resume and not args.csv_path:
        raise UsageError('--resume needs --csv, the file of the run to resume')
    if distributed.launch_rank() == 0:  # every rank would say the same
        precision_note(args.metrics, args.precision)
    try:
        with distributed.warnings_once():
            if args.out is not None:
                status, failures = _run_shards(args)
                where = f'the error column of the shards in {printable(args.out)}'
            else:
                status, failures = _run_table(args)
                where = f'the errors column of {printable(args.csv_path)}' if args.csv_path else 'the FAILED lines'
        return distributed.leave_with_status(status, f'pyiqa-grmp score: {failures} failure(s) (images or metrics '
                                             f'that could not be scored; the others were): see {where}')
    finally:
        distributed.destroy()


def _score(args: argparse.Namespace):
    """:func:`pyiqa_grmp.score` with the command's arguments."""
    from ..api import score

    return score(args.targets, args.metrics, ref=args.ref, device=args.device, batch_size=args.batch_size,
                 workers=args.workers, metric_options=parse_metric_options(args.metric_options),
                 precision=args.precision, csv_path=args.csv_path, resume=args.resume, out=args.out,
                 num_shards=args.num_shards, shard_index=args.shard_index, shard_size=args.shard_size,
                 image_column=args.image_column, key_column=args.key_column, keep_columns=args.keep_columns,
                 decode=args.decode, fast=args.fast)


def _run_table(args: argparse.Namespace) -> tuple:
    """``score`` without ``--out``: the table of every image, printed by rank 0; (exit status, failures)."""
    from .. import distributed

    frame = _score(args)
    if 'shard' in frame.columns:  # shards without --out: the merged table, one row per image
        frame = frame.rename(columns={'key': 'image'})
    status, failures = 0, len(frame.attrs['errors'])
    if distributed.get_rank() == 0:
        _print(frame, args.metrics, args.verbose)
        if args.csv_path:
            print(f'wrote {printable(args.csv_path)}')
        if failures:
            print(f'{failures} failure(s); see the messages above', file=sys.stderr)
            status = 1
    return status, failures


def _run_shards(args: argparse.Namespace) -> tuple:
    """``score --out``: this task's shards, a line per shard, the failures (images: the first ones) on stderr;
    (exit status, failures)."""
    frame = _score(args)
    for row in frame.itertuples():
        counts = f'{row.images} images' + (f', {row.failed} with an error' if row.failed > 0 else '')
        print(f'{row.shard}: {row.status} ({counts})  {printable(row.path)}')
    print(f'{int((frame.status == "scored").sum())} shard(s) scored, {int((frame.status == "skipped").sum())} '
          f'skipped (complete already), of {len(frame)} for this task; read them with: pyiqa-grmp merge '
          f'{printable(args.out)}')
    errors = frame.attrs['errors']
    images = [f for f in errors if f.kind != 'metric']
    for failure in [f for f in errors if f.kind == 'metric'] + images[:MAX_PRINTED_FAILURES]:
        print(f'FAILED [{failure.metric or "*"}] {printable(failure.image or "*")}: {printable(failure.reason)}',
              file=sys.stderr)
    if len(images) > MAX_PRINTED_FAILURES:
        print(f'... and {len(images) - MAX_PRINTED_FAILURES} more failed image(s): their rows say why (error column)',
              file=sys.stderr)
    if errors:
        print(f'{len(errors)} failure(s); see the messages above', file=sys.stderr)
    return (1 if errors else 0), len(errors)


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

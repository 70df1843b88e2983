"""``pyiqa-grmp compare``: metrics side by side on one labelled dataset (:func:`pyiqa_grmp.compare`)."""
from __future__ import annotations

import argparse
import os
import sys

from ..options import parse_metric_options
from ._common import (add_batch_arguments, add_command, add_device_argument, add_metric_options_argument,
                      add_precision_argument, api_default, precision_note)

#: Unlike the Python function, which writes files only when given out_dir, the command always writes them.
DEFAULT_OUT = os.path.join('results', 'compare')
EXAMPLES = (
    'pyiqa-grmp compare grmp_iqa piqe niqe --dataset livec --data-root ./datasets',
    'pyiqa-grmp compare grmp_iqa piqe --meta-info labels.csv --root images/ --out results/mine',
    'pyiqa-grmp compare grmp_iqa@ours grmp_iqa@paper --dataset livec --split test --split-seed 0 --num-shots 50 \\',
    '    --metric-opt grmp_iqa@ours:pretrained_model_path=runs/livec50/model.pth',
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..comparison import compare

    parser = add_command(subparsers, 'compare', 'Score the same labelled images with every metric; report SRCC, '
                         'KRCC, PLCC, PLCC after a logistic fit, failures and time per image (results.csv, '
                         'results.md, per_image.csv, scatter.png). Lower-better metrics and labels are correlated '
                         'negated, so agreement is always positive.', EXAMPLES)
    parser.add_argument('metrics', nargs='+', metavar='METRIC',
                        help='pyiqa metric names; NAME@TAG compares variants of one metric, e.g. grmp_iqa@mine')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--dataset', help="a pyiqa dataset name (pyiqa's standard layout under --data-root)")
    source.add_argument('--meta-info', help='an NR meta CSV: column 0 image path relative to --root, column 1 MOS')
    parser.add_argument('--data-root', default=api_default(compare, 'data_root'),
                        help='folder of the pyiqa datasets (default %(default)s)')
    parser.add_argument('--root', help='image folder of --meta-info')
    parser.add_argument('--split', choices=['all', 'test'], default=api_default(compare, 'split'),
                        help='all rows (default), or the few-shot test split of --split-seed / --num-shots')
    parser.add_argument('--split-seed', type=int, help='split_seed of the fine-tuning run (with --split test)')
    parser.add_argument('--num-shots', type=int, help='num_shots of the fine-tuning run (with --split test)')
    parser.add_argument('--train-ratio', type=float, default=api_default(compare, 'train_ratio'),
                        help='train_ratio of the fine-tuning run (default %(default)s)')
    parser.add_argument('--mos-lower-better', action='store_const', const=True,
                        default=api_default(compare, 'mos_lower_better'),
                        help='the labels are DMOS (lower is better); default: the dataset info, else no')
    add_metric_options_argument(parser, 'grmp_iqa@mine:pretrained_model_path=model.pth (NAME may be NAME@TAG)')
    add_device_argument(parser, compare)
    add_precision_argument(parser, compare)
    add_batch_arguments(parser, compare)
    parser.add_argument('--out', dest='out_dir', metavar='DIR', default=DEFAULT_OUT,
                        help='folder for results.csv, results.md, per_image.csv, scatter.png (default %(default)s)')
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the table; 0, or 1 when any metric or image failed."""
    from ..comparison import compare, results_markdown, split_metric_name

    precision_note(args.metrics, args.precision, lambda name: split_metric_name(name)[0])
    table = compare(args.metrics, dataset=args.dataset, data_root=args.data_root, meta_info=args.meta_info,
                    root=args.root, split=args.split, split_seed=args.split_seed, num_shots=args.num_shots,
                    train_ratio=args.train_ratio, mos_lower_better=args.mos_lower_better,
                    metric_options=parse_metric_options(args.metric_options), device=args.device,
                    batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                    out_dir=args.out_dir)
    print(results_markdown(table, table.attrs['description']))
    print(f'wrote {os.path.join(args.out_dir, "results.csv")}, results.md, per_image.csv and scatter.png')
    failed = table[table['failed'] > 0]
    for _, row in failed.iterrows():
        print(f'FAILED [{row["metric"]}] {row["error"]}', file=sys.stderr)
    return 1 if len(failed) else 0

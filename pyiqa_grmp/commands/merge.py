"""``pyiqa-grmp merge``: the parquet files of ``score --out`` as one table (:func:`pyiqa_grmp.merge`), to CSV."""
from __future__ import annotations

import argparse
import math
import sys

from ..data.image_io import printable
from ._common import add_command, api_default

EXAMPLES = (
    'pyiqa-grmp merge scores/ --csv scores.csv',
    'pyiqa-grmp merge scores/ --allow-partial --csv so_far.csv   # while a run goes on, or after shards failed',
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..api import merge

    parser = add_command(subparsers, 'merge', 'Read the per-shard parquet files of "score --out DIR" into one table '
                         '(shard order, then key order), print the mean per metric and optionally write a CSV. '
                         'Shards not complete, or scored with other settings, are refused by name.', EXAMPLES)
    parser.add_argument('out_dir', metavar='DIR', help='the --out folder of score')
    parser.add_argument('--csv', dest='csv_path', metavar='FILE', help='write the table to this CSV file (atomically)')
    parser.add_argument('--allow-partial', action='store_true', default=api_default(merge, 'allow_partial'),
                        help='merge the completed shards even when others are not complete (named on stderr)')
    return parser


def run(args: argparse.Namespace) -> int:
    from ..api import merge
    from ..checkpointing import write_atomically

    frame = merge(args.out_dir, allow_partial=args.allow_partial)
    metrics = frame.attrs['metadata']['metrics']
    if frame.attrs['missing']:
        print(f'note: {len(frame.attrs["missing"])} shard(s) not complete, left out: '
              f'{", ".join(printable(n) for n in frame.attrs["missing"][:10])}', file=sys.stderr)
    width = max([len(m) for m in metrics] + [6])
    print(f'{"metric":<{width}}  {"mean":>10}  {"scored":>8}  {"failed":>8}')
    for metric in metrics:
        scored = int(frame[metric].notna().sum())
        mean = frame[metric].mean() if scored else math.nan
        print(f'{metric:<{width}}  {mean:>10.4f}  {scored:>8d}  {len(frame) - scored:>8d}')
    if args.csv_path:
        write_atomically(args.csv_path, frame.to_csv(index=False, lineterminator='\n'))
        print(f'wrote {printable(args.csv_path)} ({len(frame)} rows)')
    return 0

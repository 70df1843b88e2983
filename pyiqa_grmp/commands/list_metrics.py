"""``pyiqa-grmp list``: the metric names pyiqa knows, ``grmp_iqa`` included (pyiqa only, nothing heavy)."""
from __future__ import annotations

import argparse

from ._common import add_command


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(subparsers, 'list', 'Print every metric name that score, compare and demo take, one per '
                         'line.', ['pyiqa-grmp list --mode NR'])
    parser.add_argument('--mode', choices=['NR', 'FR'], help='only no-reference or full-reference metrics')
    return parser


def run(args: argparse.Namespace) -> int:
    import pyiqa

    for name in pyiqa.list_models(metric_mode=args.mode):
        print(name)
    return 0

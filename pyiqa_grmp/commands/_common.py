"""What several commands share: their common options, the defaults they take from the API, error wording."""
from __future__ import annotations

import argparse
import inspect
import sys
from typing import Callable, Optional, Sequence

from . import summary


class Formatter(argparse.HelpFormatter):
    """argparse's layout, except that indented lines (examples) are kept as written; other lines are paragraphs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return '\n'.join(line if not line.strip() or line.startswith(' ') else super(Formatter, self)._fill_text(
            line, width, indent) for line in text.splitlines())


class UsageError(Exception):
    """Options that do not go together; the command line answers with its usage and exit status 2."""


def add_command(subparsers: argparse._SubParsersAction, name: str, description: str,
                examples: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The sub-parser of command ``name``: its one-line help, a description and an epilog of examples."""
    epilog = 'examples:\n' + '\n'.join(f'  {line}' for line in examples) if examples else None
    return subparsers.add_parser(name, help=summary(name), description=description, epilog=epilog,
                                 formatter_class=Formatter)


def api_default(function: Callable, argument: str) -> object:
    """The default of ``argument`` in the signature of the API ``function``: the one place it is defined."""
    return inspect.signature(function).parameters[argument].default


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def add_device_argument(parser: argparse.ArgumentParser, function: Callable) -> None:
    """``--device cpu|cuda`` with ``function``'s default (None: cuda when available)."""
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=api_default(function, 'device'),
                        help='default: cuda when available')


def add_metric_options_argument(parser: argparse.ArgumentParser, example: str = '') -> None:
    """``--metric-opt NAME:KEY=VALUE`` (repeatable), into ``args.metric_options``; see
    :func:`pyiqa_grmp.options.parse_metric_options`."""
    parser.add_argument('--metric-opt', dest='metric_options', action='append', metavar='NAME:KEY=VALUE',
                        help='an option of one metric (a keyword of pyiqa.create_metric), the value parsed as YAML'
                             + (f', e.g. {example}' if example else '') + ' (repeatable)')


def add_batch_arguments(parser: argparse.ArgumentParser, function: Callable) -> None:
    """``--batch-size`` and ``--workers`` of the commands that score images, with ``function``'s defaults."""
    from ..scoring.pipeline import MAX_DEFAULT_WORKERS

    parser.add_argument('--batch-size', type=positive_int, metavar='N', default=api_default(function, 'batch_size'),
                        help='images per forward pass (any sizes for metrics that declare a fixed resize, such as '
                             'grmp_iqa; equal sizes for the others; default %(default)s)')
    parser.add_argument('--workers', type=non_negative_int, metavar='N', default=api_default(function, 'workers'),
                        help='processes decoding images while the metrics run; 0 decodes in the main process '
                             '(default: the CPUs of this process, shared by the ranks of a machine, at most '
                             f'{MAX_DEFAULT_WORKERS})')


def add_precision_argument(parser: argparse.ArgumentParser, function: Callable) -> None:
    """``--precision`` of ``score`` and ``compare``."""
    from ..precision import PRECISIONS

    parser.add_argument('--precision', choices=PRECISIONS, default=api_default(function, 'precision'),
                        help='GRMP-IQA metrics only: fp32 (default, exact), bf16 (CUDA or CPU) or fp16 (CUDA) '
                             'autocast of the towers, scores computed in fp32; other metrics are left as they are')


def precision_note(metrics: Sequence[str], precision: Optional[str],
                   pyiqa_name: Callable[[str], str] = lambda name: name) -> None:
    """Say on stderr which metrics ``--precision`` leaves alone (those not built on GRMP-IQA)."""
    from ..precision import grmp_metric_names

    if precision in (None, 'fp32'):
        return
    grmp = set(grmp_metric_names(metrics, pyiqa_name))
    others = [name for name in metrics if name not in grmp]
    if others:
        print(f'note: --precision {precision} applies to GRMP-IQA metrics only; {", ".join(others)} keep their own '
              'precision', file=sys.stderr)


def flag_of(parser: argparse.ArgumentParser, argument: str) -> str:
    """The flag of ``parser`` that fills the API argument ``argument`` (its name itself when none does)."""
    for action in parser._actions:
        if action.dest == argument and action.option_strings:
            return max(action.option_strings, key=len)
    return argument

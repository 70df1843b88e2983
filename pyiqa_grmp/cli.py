"""``pyiqa-grmp``, the command line: the top-level parser, and the run of one command of :mod:`pyiqa_grmp.commands`.

Only the module of the command that runs is imported (``pyiqa-grmp list`` loads neither pandas nor the model code).
pyiqa's own ``pyiqa`` command never loads plugins; this one imports ``pyiqa_grmp`` first, so ``grmp_iqa`` and every
built-in metric are available side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Dict, Iterable, Optional, Sequence, Tuple

from .commands import COMMANDS, load, summary
from .commands._common import Formatter, UsageError, flag_of
from .errors import InvalidArgument

DESCRIPTION = ('GRMP-IQA (few-shot image quality assessment by adapting CLIP, ICCV 2025) next to every pyiqa '
               'metric: score images, compare metrics on labelled images, adapt GRMP-IQA to your own labelled '
               "images, train, and run the paper's few-shot protocol.")
EPILOG = '''\
examples:
  pyiqa-grmp demo
  pyiqa-grmp score grmp_iqa piqe -t photos/ --csv scores.csv
  pyiqa-grmp adapt --meta-info labels.csv --root images/ --out runs/mine

"pyiqa-grmp COMMAND --help" shows the options of a command. The same from Python, with the same names \
and defaults: pyiqa_grmp.score, compare, adapt, train and run_protocol.'''


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``pyiqa-grmp`` parser with the full options of ``commands`` (default: all of them); the other commands
    are listed with their one-line help only, so that their modules are not imported."""
    return _build(commands)[0]


def _build(commands: Optional[Iterable[str]]) -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog='pyiqa-grmp', description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=Formatter)
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    parsers = {name: load(name).add_parser(subparsers) if name in full else
               subparsers.add_parser(name, help=summary(name)) for name in COMMANDS}
    return parser, parsers


def _chosen(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv`` (the first word that is not an option), if it is one."""
    word = next((a for a in argv if not a.startswith('-')), None)
    return word if word in COMMANDS else None


class _PrintNotes(logging.Handler):
    """The library's log records (notes such as a batch lowered to the shots), printed as plain lines on the
    standard output of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


@contextlib.contextmanager
def _notes_printed():
    """While a command runs, what :mod:`pyiqa_grmp` logs at INFO and above is printed (libraries log; the command
    decides what the user sees)."""
    logger, handler = logging.getLogger('pyiqa_grmp'), _PrintNotes()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyiqa-grmp`` console script; returns the exit status."""
    import pyiqa_grmp  # noqa: F401  (registers grmp_iqa with pyiqa)

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    parser, parsers = _build([chosen] if chosen else [])
    args = parser.parse_args(argv)
    command = parsers[args.command]
    try:
        with _notes_printed():
            return load(args.command).run(args)
    except UsageError as error:
        command.error(str(error))
    except InvalidArgument as error:  # the library's argument, shown as the flag that fills it
        from .data.image_io import printable

        print(f'pyiqa-grmp {args.command}: error: {printable(error.worded(lambda name: flag_of(command, name)))}',
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:  # bad input or configuration: the message says what
        from .data.image_io import printable

        print(f'pyiqa-grmp {args.command}: error: {printable(str(error))}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

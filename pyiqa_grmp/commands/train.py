"""``pyiqa-grmp train``: train from a pyiqa-style YAML (:func:`pyiqa_grmp.train`)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ._common import add_command, api_default

EXAMPLES = (
    'pyiqa-grmp train -opt configs/smoke/finetune_synthetic.yml',
    'pyiqa-grmp train -opt configs/finetune_livec_50shot.yml --force_yml train:total_epoch=5 name=short',
    'pyiqa-grmp train -opt configs/finetune_livec_50shot.yml --auto_resume     # continue a stopped run',
    'torchrun --nproc_per_node 4 -m pyiqa_grmp train -opt configs/meta_pretrain_kadid10k_tid2013.yml \\',
    '    --launcher pytorch',
)


def add_training_arguments(parser: argparse.ArgumentParser, function: Callable, launcher_help: str) -> None:
    """``-opt``, ``--force_yml`` and ``--launcher``, shared by ``train`` and ``protocol``."""
    from ..training import LAUNCHERS

    parser.add_argument('-opt', dest='options', required=True, metavar='YAML',
                        help='training YAML (read as plain data; python tags refused)')
    parser.add_argument('--force_yml', dest='overrides', nargs='+', default=api_default(function, 'overrides'),
                        metavar='KEY:SUB=VALUE', help='option overrides, the value parsed as plain YAML')
    parser.add_argument('--launcher', choices=list(LAUNCHERS), default=api_default(function, 'launcher'),
                        help=launcher_help)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..training import train

    parser = add_command(subparsers, 'train', 'Train with pyiqa\'s options and parts; experiments go under '
                         './experiments/NAME. SIGTERM or SIGINT write a training state and stop (exit status 128 + '
                         'the signal); --auto_resume then continues exactly where it stopped.', EXAMPLES)
    add_training_arguments(parser, train, 'distributed launch: pytorch under torchrun, slurm under srun')
    parser.add_argument('--auto_resume', action='store_true', default=api_default(train, 'auto_resume'),
                        help='continue from the newest usable training state (cut-short ones are skipped)')
    parser.add_argument('--debug', action='store_true', default=api_default(train, 'debug'),
                        help="pyiqa's debug mode (a few iterations)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingInterrupted, train

    try:
        result = train(args.options, args.overrides, auto_resume=args.auto_resume, launcher=args.launcher,
                       debug=args.debug)
    except TrainingInterrupted as stopped:
        print(f'pyiqa-grmp train: {stopped.worded("--auto_resume")}', file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for "ended by signal N"
    if result.best_text():
        print(result.best_text())  # best: PATH (srcc X at iteration N)
    return 0

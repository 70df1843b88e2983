"""``pyiqa-grmp protocol``: the paper's repeated random-split few-shot protocol (:func:`pyiqa_grmp.run_protocol`)."""
from __future__ import annotations

import argparse

from ._common import add_command, api_default, positive_int
from .train import add_training_arguments

EXAMPLES = (
    'pyiqa-grmp protocol -opt configs/finetune_livec_50shot.yml --runs 10',
    'pyiqa-grmp protocol -opt configs/finetune_livec_50shot.yml --select test   # as the official code',
    'torchrun --nproc_per_node 4 -m pyiqa_grmp protocol -opt configs/finetune_livec_50shot.yml --launcher pytorch',
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..training import SELECTIONS, run_protocol

    parser = add_command(subparsers, 'protocol', 'Per run: a new random split and N-shot sample (split seed + run), '
                         'train, and test the chosen checkpoint on that run\'s test split; write protocol.csv and '
                         'protocol.md (every run, mean, median, std).', EXAMPLES)
    add_training_arguments(parser, run_protocol, 'spread the runs over the processes of torchrun (pytorch) or srun '
                                                 '(slurm)')
    parser.add_argument('--runs', type=positive_int, default=api_default(run_protocol, 'runs'),
                        help='number of random splits (default %(default)s)')
    parser.add_argument('--select', choices=list(SELECTIONS), default=api_default(run_protocol, 'select'),
                        help="choose each run's checkpoint on the validation carve-out (default) or, as the "
                             'official code, on the test split (optimistic)')
    parser.add_argument('--out', dest='out_dir', metavar='DIR', default=api_default(run_protocol, 'out_dir'),
                        help='folder for protocol.csv and protocol.md (default experiments/NAME_protocol)')
    return parser


def run(args: argparse.Namespace) -> int:
    from ..training import run_protocol

    result = run_protocol(args.options, args.overrides, runs=args.runs, select=args.select, launcher=args.launcher,
                          out_dir=args.out_dir)
    if result.out_dir is None:  # ranks > 0 of a parallel run: rank 0 reports
        return 0
    for row in result.runs:
        print(f'run {row["run"]}: split_seed {row["split_seed"]}  test SRCC {row["srcc"]:.4f}  PLCC {row["plcc"]:.4f}')
    mean, median = result.summary['mean'], result.summary['median']
    print(f'\n{result.selection}')
    print(f'SRCC mean {mean["srcc"]:.4f} median {median["srcc"]:.4f} | '
          f'PLCC mean {mean["plcc"]:.4f} median {median["plcc"]:.4f}')
    print(f'wrote {result.out_dir}/protocol.csv and protocol.md')
    return 0

"""``pyiqa-grmp``: score images with GRMP-IQA and any pyiqa metric, list metrics, train, run the protocol,
compare metrics on a labelled dataset.

pyiqa's own ``pyiqa`` command never loads plugins; this one imports ``pyiqa_grmp`` first, so ``grmp_iqa``
and every built-in metric are available side by side.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .adapt import add_adapt_parser
from .commands import export as export_command
from .comparison import add_compare_parser
from .data.image_io import printable
from .demo import add_demo_parser
from .precision import add_precision_argument, add_precision_option
from .scoring import ScoreReport, add_batch_arguments, parse_metric_options, score_images


def _print_report(report: ScoreReport, verbose: bool) -> None:
    width = max([len(m) for m in report.metrics] + [6])
    if verbose:
        for image in report.images:
            scores = report.scores.get(image, {})
            cells = '  '.join(f'{m}={scores[m]:.4f}' if m in scores else f'{m}=FAILED' for m in report.metrics)
            print(f'{printable(image)}  {cells}')
        print()
    print(f'{"metric":<{width}}  {"mean":>10}  {"scored":>6}  {"failed":>6}')
    for metric, mean, scored, failed in report.summary():
        print(f'{metric:<{width}}  {mean:>10.4f}  {scored:>6d}  {failed:>6d}')
    for metric, image, reason in report.errors:
        print(f'FAILED [{metric}] {printable(image)}: {printable(reason)}', file=sys.stderr)


def _cmd_score(args: argparse.Namespace) -> int:
    from . import distributed

    options = add_precision_option(args.metrics, parse_metric_options(args.metric_opt), args.precision, args.device)
    context = distributed.init_distributed(None, device=args.device)  # a torchrun launch is joined automatically
    try:
        report = score_images(args.metrics, args.target, args.ref, str(context.device), args.batch_size,
                              progress=context.is_main, metric_options=options, workers=args.workers,
                              csv_path=args.csv, resume=args.resume)
        status = 0
        if context.is_main:
            _print_report(report, args.verbose)
            if args.csv:
                print(f'wrote {printable(args.csv)}')
            if report.errors:
                print(f'{len(report.errors)} failure(s); see the messages above', file=sys.stderr)
                status = 1
        return distributed.broadcast_object(status)
    finally:
        distributed.destroy()


def _cmd_list(args: argparse.Namespace) -> int:
    import pyiqa

    for name in pyiqa.list_models(metric_mode=args.mode):
        print(name)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainingInterrupted, train

    argv = ['-opt', args.opt, '--launcher', args.launcher, *(['--auto_resume'] if args.auto_resume else []),
            *(['--debug'] if args.debug else []), *(['--force_yml', *args.force_yml] if args.force_yml else [])]
    try:
        train(argv)
    except TrainingInterrupted as stopped:
        print(f'pyiqa-grmp train: {stopped}', file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for "ended by signal N"
    return 0


def _cmd_protocol(args: argparse.Namespace) -> int:
    from .train import run_protocol

    run_protocol(['-opt', args.opt, '--launcher', args.launcher,
                  *(['--force_yml', *args.force_yml] if args.force_yml else [])],
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
    score.add_argument('-t', '--target', required=True,
                       help='an image file, a folder (scanned recursively) or a .txt file listing image paths, one '
                            'per line (relative to the list\'s folder, or absolute)')
    score.add_argument('-r', '--ref', help='reference image or folder, for full-reference metrics')
    score.add_argument('--device', choices=['cpu', 'cuda'], help='default: cuda when available')
    add_batch_arguments(score)
    score.add_argument('--metric-opt', action='append', default=[], metavar='NAME:KEY=VALUE',
                       help='option for one metric, value parsed as YAML, e.g. '
                            'grmp_iqa:pretrained_model_path=experiments/x/models/net_best.pth (repeatable)')
    add_precision_argument(score)
    score.add_argument('--csv', help='write per-image scores and failures to this CSV file (rows are appended as '
                                     'batches finish; the final file is in image order)')
    score.add_argument('--resume', action='store_true',
                       help='keep the rows already in --csv (and its part files) and score only the missing images')
    score.add_argument('-v', '--verbose', action='store_true', help='print the score of every image')
    score.set_defaults(handler=_cmd_score)

    listing = commands.add_parser('list', help='list all metric names, GRMP-IQA included')
    listing.add_argument('--mode', choices=['NR', 'FR'], help='only no-reference or full-reference metrics')
    listing.set_defaults(handler=_cmd_list)

    training = commands.add_parser(
        'train', help='train from a pyiqa-style YAML (experiments under the current directory); SIGTERM/SIGINT '
                      'write a training state and stop; --auto_resume continues exactly')
    training.add_argument('-opt', required=True, help='training YAML (read as plain data; python tags refused)')
    training.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                          help='distributed launch: pytorch under torchrun, slurm under srun')
    training.add_argument('--auto_resume', action='store_true',
                          help='continue from the newest usable training state (cut-short ones are skipped)')
    training.add_argument('--debug', action='store_true', help="pyiqa's debug mode (a few iterations)")
    training.add_argument('--force_yml', nargs='+',
                          help='option overrides KEY:SUB=VALUE, the value parsed as plain YAML')
    training.set_defaults(handler=_cmd_train)

    protocol = commands.add_parser('protocol', help="the paper's repeated random-split few-shot protocol")
    protocol.add_argument('-opt', required=True, help='a fine-tuning YAML with FewShotNRDataset datasets')
    protocol.add_argument('--runs', type=int, default=10)
    protocol.add_argument('--select', choices=['val', 'test'], default='val',
                          help='choose each run\'s checkpoint on the validation carve-out (default) or, as the '
                               'official code, on the test split (optimistic)')
    protocol.add_argument('--force_yml', nargs='+',
                          help='option overrides KEY:SUB=VALUE, the value parsed as plain YAML')
    protocol.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                          help='spread the runs over the processes of torchrun (pytorch) or srun (slurm)')
    protocol.add_argument('--out', help='folder for protocol.csv / protocol.md (default experiments/NAME_protocol)')
    protocol.set_defaults(handler=_cmd_protocol)

    synthetic = commands.add_parser('make-synthetic', help='write a small labelled IQA dataset from bundled photos')
    synthetic.add_argument('out_dir')
    synthetic.add_argument('--seed', type=int, default=0)
    synthetic.add_argument('--size', type=int, default=256)
    synthetic.set_defaults(handler=_cmd_make_synthetic)

    add_compare_parser(commands)
    add_adapt_parser(commands)
    add_demo_parser(commands)
    export_command.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyiqa-grmp`` console script; returns the exit status."""
    import pyiqa_grmp  # noqa: F401  (registers grmp_iqa with pyiqa)

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'batch_size', 1) < 1:
        parser.error('--batch-size must be >= 1')
    if getattr(args, 'workers', 0) < 0:
        parser.error('--workers must be >= 0')
    if getattr(args, 'resume', False) and not args.csv:
        parser.error('--resume needs --csv, the file of the run to resume')
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # bad input or configuration: the message says what
        print(f'pyiqa-grmp {args.command}: error: {printable(str(error))}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

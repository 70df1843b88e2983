"""``pyiqa-grmp demo``: bundled photos, clean and distorted, scored by grmp_iqa and two pyiqa metrics."""
from __future__ import annotations

import argparse
import sys

from ..options import parse_metric_options
from ._common import add_command, add_device_argument, add_metric_options_argument, api_default

EXAMPLES = ('pyiqa-grmp demo',
            'pyiqa-grmp demo --metric-opt grmp_iqa:pretrained_model_path=runs/mine/model.pth --out results/mine')


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..demo import DEMO_METRICS, run_demo

    parser = add_command(subparsers, 'demo', 'Score photos bundled with scikit-image, clean and at 5 levels of blur, '
                         'noise and JPEG, with GRMP-IQA and two pyiqa metrics; print the mean scores and how often '
                         'each metric ranks a series in the right order; write demo.png and scores.csv. Without '
                         "GRMP-IQA's weights (offline) it says where to put them and shows the other metrics.",
                         EXAMPLES)
    parser.add_argument('--metrics', nargs='+', default=list(api_default(run_demo, 'metrics')), metavar='METRIC',
                        help=f'NR metrics to run (default: {" ".join(DEMO_METRICS)}, which need no download but '
                             "grmp_iqa's weights)")
    add_metric_options_argument(parser)
    add_device_argument(parser, run_demo)
    parser.add_argument('--size', type=int, default=api_default(run_demo, 'size'),
                        help='side of the square photos in pixels (default %(default)s)')
    parser.add_argument('--out', dest='out_dir', metavar='DIR', default=api_default(run_demo, 'out_dir'),
                        help='folder for demo.png and scores.csv (default %(default)s)')
    return parser


def run(args: argparse.Namespace) -> int:
    """0 unless a metric or the images are broken (missing weights are not)."""
    from ..demo import DEMO_DISTORTIONS, DEMO_PHOTOS, run_demo, summary_table

    result = run_demo(args.metrics, parse_metric_options(args.metric_options), args.device, args.size,
                      out_dir=args.out_dir)
    for note in result.notes:
        print(note)
    print(f'\n{len(DEMO_PHOTOS)} photos ({", ".join(DEMO_PHOTOS)}), each clean and at levels 1-5 of '
          f'{", ".join(DEMO_DISTORTIONS)}; mean score over the photos:\n')
    print(summary_table(result))
    if result.ranking:
        print(f"\nwrote {result.written[-1]} and scores.csv")
    for problem in result.problems:
        print(f'BROKEN {problem}', file=sys.stderr)
    if not result.ranking:
        print('no metric could score the images', file=sys.stderr)
    return 1 if result.problems or not result.ranking else 0

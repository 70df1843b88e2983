"""``pyiqa-grmp make-synthetic``: the offline synthetic IQA dataset (:mod:`pyiqa_grmp.data.synthetic`)."""
from __future__ import annotations

import argparse

from ._common import add_command, api_default


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..data.synthetic import make_synthetic_dataset

    parser = add_command(subparsers, 'make-synthetic', 'Write bundled photos, clean and at five levels of five '
                         'distortions, and a pyiqa NR meta-info CSV (image_name, mos, distortion, level, reference) '
                         'ready for FewShotNRDataset and the smoke configs.',
                         ['pyiqa-grmp make-synthetic datasets/synthetic --size 128'])
    parser.add_argument('out_dir', help='folder for images/ and meta_info_synthetic.csv')
    parser.add_argument('--seed', type=int, default=api_default(make_synthetic_dataset, 'seed'),
                        help='seed of the random distortions (default %(default)s)')
    parser.add_argument('--size', type=int, default=api_default(make_synthetic_dataset, 'size'),
                        help='side of the square images in pixels (default %(default)s)')
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_synthetic_dataset

    print(f'wrote {make_synthetic_dataset(args.out_dir, seed=args.seed, size=args.size)}')
    return 0

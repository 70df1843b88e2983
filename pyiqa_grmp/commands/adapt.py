"""``pyiqa-grmp adapt``: fine-tune GRMP-IQA on your labelled images and get a report (:func:`pyiqa_grmp.adapt`)."""
from __future__ import annotations

import argparse

from ._common import add_command, add_device_argument, api_default

EXAMPLES = (
    'pyiqa-grmp adapt --meta-info my_labels.csv --root my_images/ --out runs/mine               # paper settings',
    'pyiqa-grmp adapt --meta-info my_labels.csv --root my_images/ --out runs/mine --preset cpu  # minutes on a CPU',
    'pyiqa-grmp adapt --dataset livec --data-root ./datasets --out runs/livec50 --shots 50      # a pyiqa dataset',
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..adaptation import PRESET_HELP, PRESETS, adapt
    from ..precision import PRECISIONS

    def default(name: str) -> object:
        return api_default(adapt, name)

    parser = add_command(subparsers, 'adapt', 'Check the labels and images, split them into shots / validation '
                         'carve-out / held-out test, fine-tune GRMP-IQA, choose the checkpoint on the carve-out and '
                         'report held-out correlations against the starting model. Everything goes to --out: '
                         'model/ (a model folder to share), model.pth, report.md, summary.json, predictions.csv, '
                         'split.csv, options.yml (rerun with pyiqa-grmp train -opt), curves.png, scatter.png, '
                         'experiments/.', EXAMPLES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--meta-info', help='CSV, TSV or .xlsx with a header: an image path relative to --root and '
                                            'a score per row (see --image-column, --score-column)')
    source.add_argument('--dataset', help="a pyiqa dataset name (pyiqa's standard layout under --data-root)")
    parser.add_argument('--root', help='image folder of --meta-info')
    parser.add_argument('--data-root', default=default('data_root'),
                        help='folder of the pyiqa datasets (default %(default)s)')
    parser.add_argument('--out', dest='out_dir', required=True, metavar='RUN_DIR',
                        help='folder for the model, report and run')
    parser.add_argument('--shots', default=default('shots'),
                        help='labelled images to train on, or "all" (default): every image not held out or carved out')
    parser.add_argument('--test-ratio', type=float, default=default('test_ratio'),
                        help='share of images held out for the report (default %(default)s)')
    parser.add_argument('--num-val', type=int, default=default('num_val'),
                        help='images carved out of the pool to choose the checkpoint on (default: 10 %% of the '
                             'images, at least 5)')
    parser.add_argument('--from', dest='start', metavar='CHECKPOINT', default=default('start'),
                        help="starting GRMP-IQA checkpoint (ours or official); default: grmp_iqa's default weights")
    parser.add_argument('--preset', choices=sorted(PRESETS), default=default('preset'),
                        help='; '.join(f'{name}: {text}' for name, text in PRESET_HELP.items()))
    add_device_argument(parser, adapt)
    parser.add_argument('--precision', choices=PRECISIONS, default=default('precision'),
                        help='of training, validation and the held-out scores: fp32 (exact), bf16, or fp16 (CUDA); '
                             'default: bf16 for --preset cpu on a CPU with bf16 instructions (avx512_bf16, amx_bf16), '
                             'else fp32')
    parser.add_argument('--seed', type=int, default=default('seed'),
                        help='split, training and bootstrap seed (default %(default)s)')
    parser.add_argument('--mos-lower-better', action='store_const', const=True, default=default('mos_lower_better'),
                        help='the scores are DMOS (lower is better); default: the dataset info, else no')
    parser.add_argument('--image-column', metavar='NAME', default=default('image_column'),
                        help='header of the image column of --meta-info (default: the one column named image_name, '
                             'image, img_name, filename, ... (any case), else the first column)')
    parser.add_argument('--score-column', metavar='NAME', default=default('score_column'),
                        help='header of the score column of --meta-info (default: the one column named MOS, DMOS or '
                             'score, in any case; a DMOS column means lower is better)')
    parser.add_argument('--override', dest='override_file', metavar='YAML', default=default('override_file'),
                        help='training options merged into the generated ones, e.g. a smaller backbone '
                             '(configs/smoke/adapt_tiny.yml); read as plain data')
    parser.add_argument('--set', dest='overrides', action='append', default=list(default('overrides')),
                        metavar='KEY:SUB=VALUE',
                        help='one training option, value parsed as YAML, e.g. train:total_epoch=5 (repeatable)')
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the held-out results and the lines that use the model."""
    from ..adaptation import adapt, describe_split, interval_text

    result = adapt(args.out_dir, meta_info=args.meta_info, root=args.root, dataset=args.dataset,
                   data_root=args.data_root, shots=args.shots, test_ratio=args.test_ratio, num_val=args.num_val,
                   start=args.start, preset=args.preset, device=args.device, seed=args.seed,
                   mos_lower_better=args.mos_lower_better, override_file=args.override_file,
                   overrides=args.overrides, image_column=args.image_column, score_column=args.score_column,
                   precision=args.precision)
    summary = result.summary
    print(f'data: {summary["data"]["description"]}: {summary["data"]["num_images"]} labelled images')
    print(describe_split(summary['split'], summary['settings']['seed']))
    print(f'\nheld-out test, {summary["split"]["test"]} images (95 % bootstrap intervals):')
    for key, label in (('before', 'starting model (zero-shot)'), ('after', 'adapted'), ('gain', 'gain')):
        row = summary['results'][key]
        print(f'  {label:<27} ' + '  '.join(f'{m.upper()} {interval_text(row[m], row[m + "_ci"])}'
                                           for m in ('srcc', 'plcc', 'krcc')))
    print(f'\nwrote {result.out_dir}/model/ (model.safetensors, config.json, README.md), model.pth, report.md, '
          'summary.json, predictions.csv, split.csv, curves.png, scatter.png')
    print('\nuse the model from Python:')
    print(result.usage['python'])
    print('or from the command line (every image\'s score into scores.csv):')
    print(result.usage['cli'])
    if summary['warnings']:
        print(f'\n{len(summary["warnings"])} warning(s), printed above and in report.md')
    return 0

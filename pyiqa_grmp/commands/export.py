"""``pyiqa-grmp export CHECKPOINT OUT_DIR``: write a checkpoint as a model folder anyone can load by its path, or
with ``--full`` as one file of the whole network (thin over :func:`pyiqa_grmp.export`)."""
from __future__ import annotations

import argparse
import os
import sys

from ..archs.checkpoint import CheckpointMismatchError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` command; its handler is :func:`run`."""
    parser = subparsers.add_parser(
        'export', help='write a GRMP-IQA checkpoint as a model folder (model.safetensors, config.json, README.md)',
        description='Write a checkpoint (of this package, official, or a model folder) as a model folder that '
                    "create_metric('grmp_iqa', pretrained_model_path=OUT_DIR) loads with no other option. "
                    'Nothing in the folder is pickled.')
    parser.add_argument('checkpoint', metavar='CHECKPOINT', help='a .pth checkpoint, a model folder or hf://OWNER/NAME')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='the model folder to write (with --full: a .pth file, '
                                                           'or a folder for OUT_DIR/model.pth)')
    parser.add_argument('--full', action='store_true',
                        help='write one .pth file of the whole network ({"params": state_dict, ...}) that needs no '
                             'base weights, instead of a model folder')
    parser.add_argument('--half', action='store_true',
                        help='store the tensors in fp16 (half the size; scores differ slightly, see the README)')
    parser.add_argument('--network-yaml', metavar='YAML',
                        help='a training YAML whose network: options describe CHECKPOINT, for checkpoints that do '
                             'not say what network they are (written before they carried their options)')
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export, and print the folder (or file) and the line that uses it."""
    from ..model_folder import export
    from ..options import load_yaml

    network = None
    if args.network_yaml is not None:
        if not os.path.isfile(args.network_yaml):
            raise FileNotFoundError(f'--network-yaml file {args.network_yaml} not found')
        network = load_yaml(args.network_yaml).get('network') or {}
    try:
        written = export(args.checkpoint, args.out_dir, full=args.full, half=args.half, network=network)
    except CheckpointMismatchError as error:
        print(f'pyiqa-grmp export: error: {error}', file=sys.stderr)
        return 2
    written = os.path.abspath(written)
    print(f'wrote {written}' + ('' if args.full else ' (model.safetensors, config.json, README.md)'))
    print(f"use it: pyiqa.create_metric('grmp_iqa', pretrained_model_path={written!r})")
    return 0

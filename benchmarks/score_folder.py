"""``pyiqa-grmp score`` end to end on a generated folder: decoding, batching, the metric, the CSV.

Writes ``--images`` seeded noise JPEGs (``--size`` pixels, a few sizes mixed so that batching by size is
exercised) into a temporary folder, scores them with grmp_iqa at random weights (no checkpoint is needed) and
prints the wall time and images per second of the whole command, and its failure count.

    python benchmarks/score_folder.py [--backbone ViT-B-16-quickgelu] [--images 256] [--device cuda]
        [--batch 64] [--precision fp32]
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
import time

import numpy as np
import yaml
from common import benchmark_parser, prepare
from PIL import Image

from pyiqa_grmp.cli import main as cli_main
from pyiqa_grmp.precision import PRECISIONS


def write_folder(folder: str, count: int, size: int) -> None:
    """``count`` noise JPEGs, three quarters ``size`` x ``size``, the rest a little wider."""
    rng = np.random.default_rng(0)
    for index in range(count):
        width = size if index % 4 else size + 32
        pixels = rng.integers(0, 256, (size, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{index:05d}.jpg'), quality=90)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=1, warmup=0)
    parser.add_argument('--images', type=int, default=256)
    parser.add_argument('--size', type=int, default=384)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
    args = parser.parse_args()
    device = prepare(args)
    backbone = args.backbone if isinstance(args.backbone, str) else yaml.safe_dump(args.backbone,
                                                                                  default_flow_style=True).strip()
    with tempfile.TemporaryDirectory() as folder:
        images = os.path.join(folder, 'images')
        os.makedirs(images)
        write_folder(images, args.images, args.size)
        out_csv = os.path.join(folder, 'scores.csv')
        argv = ['score', 'grmp_iqa', '-t', images, '--device', device.type, '--batch-size', str(args.batch),
                '--precision', args.precision, '--csv', out_csv,
                '--metric-opt', 'grmp_iqa:pretrained=false', '--metric-opt', 'grmp_iqa:backbone_pretrained=null',
                '--metric-opt', f'grmp_iqa:backbone={backbone}']
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(argv)
        seconds = time.perf_counter() - start
        with open(out_csv) as handle:
            rows = list(csv.DictReader(handle))
    scored = sum(1 for row in rows if row['grmp_iqa'])
    print(f'device={device} images={args.images} size={args.size} batch={args.batch} precision={args.precision} '
          f'exit status {status}')
    print(f'result: score end to end: {scored}/{args.images} images in {seconds:.1f} s '
          f'({scored / seconds:.1f} img/s, model creation included), exit status {status}')
    if status != 0 or scored != args.images:
        raise SystemExit(1)


if __name__ == '__main__':
    main()

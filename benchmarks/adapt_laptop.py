"""``adapt --preset cpu`` at ViT-B/16 with 50 shots, run in fp32 and in bf16 side by side: wall time of each,
their ratio, and how far the bf16 run's held-out scores are from the fp32 run's, as each run reports them (bf16
trained and scored) and with the bf16-trained model scored in fp32 (the deviation of bf16 training alone).

The labelled set stands in for LIVE Challenge (1162 images of 500 x 500 px, so 233 held out, 116 carved out and
50 shots, as ``adapt --dataset livec --shots 50`` splits it): crops of the photos bundled with scikit-image,
scikit-learn and matplotlib, each pristine or distorted at one of five levels (:mod:`pyiqa_grmp.data.synthetic`'s
distortions), MOS from the level. The starting model has random weights unless ``--from`` names a checkpoint:
that is enough for timing, while the score deviation of random weights (whose scores sit in a narrow band) is a
lower bound of what trained weights show. Both runs use the same split, seed and start; bf16 is fast only on a
CPU with bf16 instructions (avx512_bf16 / amx_bf16; the first line says whether this one has them).

    python benchmarks/adapt_laptop.py [--threads 2] [--quick] [--from CHECKPOINT] [--keep DIR]

``--quick`` checks that it works: 300 images and 2 epochs instead of 12.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
import yaml
from common import benchmark_parser, prepare

import pyiqa_grmp
from pyiqa_grmp.adaptation import predict_test_split
from pyiqa_grmp.data.synthetic import DISTORTIONS, LEVELS, bundled_photos, mos_for_level
from pyiqa_grmp.precision import cpu_bf16_flag
from pyiqa_grmp.stats import correlation_values

#: LIVE Challenge's size: 1162 images of 500 x 500 px.
IMAGES, SIZE = 1162, 500


def make_labelled_images(folder: str, count: int, seed: int = 0) -> str:
    """``count`` JPEGs of SIZE px (random square crops of the bundled photos, pristine or distorted at one level)
    and their labels (``labels.csv``: image_name, mos); returns the CSV path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = list(bundled_photos().values())
    kinds = list(DISTORTIONS)
    rows = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        image = Image.fromarray(np.ascontiguousarray(photo[top:top + side, left:left + side, :3]))
        image = image.resize((SIZE, SIZE), Image.BICUBIC)
        level = int(rng.integers(0, len(LEVELS) + 1))
        if level:
            image = DISTORTIONS[kinds[index % len(kinds)]](image, level, rng)
        name = f'{index:04d}.jpg'
        image.save(os.path.join(folder, name), quality=95)
        rows.append({'image_name': name, 'mos': round(mos_for_level(level) + rng.normal(0, 3), 3)})
    path = os.path.join(folder, 'labels.csv')
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def random_start(path: str, backbone) -> None:
    """A GRMP-IQA checkpoint of ``backbone`` with random weights (seeded)."""
    from pyiqa_grmp.archs.grmp_arch import GRMPIQA

    torch.manual_seed(0)
    model = GRMPIQA(backbone=backbone, backbone_pretrained=None, pretrained=False)
    torch.save({'params': model.state_dict()}, path)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=1, warmup=0)
    parser.add_argument('--shots', type=int, default=50)
    parser.add_argument('--images', type=int, default=None, help=f'labelled images (default {IMAGES}; --quick 300)')
    parser.add_argument('--quick', action='store_true', help='300 images, 2 epochs: checks that it works')
    parser.add_argument('--from', dest='start', help='starting checkpoint (default: random weights)')
    parser.add_argument('--keep', help='folder for the data and both runs (default: a temporary one)')
    args = parser.parse_args()
    device = prepare(args)
    count = args.images or (300 if args.quick else IMAGES)
    overrides = ['train:total_epoch=2'] if args.quick else []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or scratch
        images = os.path.join(work, 'images')
        os.makedirs(images, exist_ok=True)
        labels = make_labelled_images(images, count)
        start = args.start
        override_file = None
        if start is None:
            start = os.path.join(work, 'random_start.pth')
            random_start(start, args.backbone)
        if not isinstance(args.backbone, str) or args.backbone != 'ViT-B-16-quickgelu':
            override_file = os.path.join(work, 'backbone.yml')
            with open(override_file, 'w') as stream:
                yaml.safe_dump({'network': {'backbone': args.backbone}}, stream)
        seconds, runs = {}, {}
        for precision in ('fp32', 'bf16'):
            began = time.perf_counter()
            runs[precision] = pyiqa_grmp.adapt(os.path.join(work, f'run_{precision}'), meta_info=labels, root=images,
                                               shots=str(args.shots), start=start, preset='cpu',
                                               device=device.type, precision=precision, overrides=overrides,
                                               override_file=override_file)
            seconds[precision] = time.perf_counter() - began
        fp32, bf16 = (pd.read_csv(os.path.join(runs[p].out_dir, 'predictions.csv')) for p in ('fp32', 'bf16'))
        with open(os.path.join(runs['bf16'].out_dir, 'options.yml')) as stream:
            options = yaml.safe_load(stream)
        trained_only = predict_test_split(options, runs['bf16'].model_path, device.type, 'fp32')
    if not fp32['image'].equals(bf16['image']) or list(trained_only['paths']) != list(fp32['image']):
        raise RuntimeError('the two runs held out different images')
    reference = fp32['score_after'].to_numpy()
    compared = {'as reported (bf16-trained, bf16-scored)': bf16['score_after'].to_numpy(),
                'bf16-trained, scored in fp32': trained_only['pred']}
    held_out = {p: runs[p].summary['results']['after']['srcc'] for p in runs}
    iterations = {p: runs[p].summary['training']['iterations'] for p in runs}
    backbone = args.backbone if isinstance(args.backbone, str) else 'config dict'
    print(f'device={device} ({os.uname().machine}) cpu bf16 instructions: {cpu_bf16_flag() or "none"} '
          f'backbone={backbone} threads={args.threads} images={count} shots={args.shots} '
          f'start={"random weights" if args.start is None else args.start} quick={args.quick} '
          f'torch={torch.__version__}')
    for precision in ('fp32', 'bf16'):
        print(f'adapt --preset cpu --precision {precision:<4}  {seconds[precision]:8.1f} s  '
              f'({iterations[precision]} iterations; held-out SRCC {held_out[precision]:.4f})')
    ratio = seconds['bf16'] / seconds['fp32']
    print(f'ratio bf16 / fp32: {ratio:.3f}')
    found = {}
    for what, scores in compared.items():
        deviation = np.abs(scores - reference)
        found[what] = (deviation.max(), correlation_values(scores, reference)['srcc'])
        print(f'held-out scores, {what} vs the fp32 run ({len(deviation)} images): max |diff| '
              f'{deviation.max():.2e}, mean |diff| {deviation.mean():.2e}, SRCC between them {found[what][1]:.4f}')
    largest, agreement = found['as reported (bf16-trained, bf16-scored)']
    print(f'result: adapt --preset cpu, {args.shots} shots: bf16 {seconds["bf16"]:.0f} s vs fp32 '
          f'{seconds["fp32"]:.0f} s, time ratio {ratio:.3f} (target: bf16 <= 300 s on 2 cores); held-out score '
          f'max |diff| {largest:.2e}, SRCC {agreement:.4f}')


if __name__ == '__main__':
    main()

"""Images per second of ``pyiqa-grmp score grmp_iqa`` on a folder of mixed-size JPEGs, against its bounds, side by side.

On a generated folder (200 JPEGs by default, ten sizes from 640x480 to 3000x2000 in both orientations, in an
order that mixes the sizes as a real photo folder does) and a GRMP-IQA with ViT-B/16 and random weights, one run
measures:

- model alone: the metric's network on ready, normalised 224x224 batches (an upper bound);
- decode + resize alone: ``scoring.prepared_items`` as ``score`` runs it (JPEG decode in the workers, the declared
  244x244 resize in the workers on a CPU, on the GPU otherwise) with no model, for each ``--workers`` value (the
  bound the decoding sets);
- score end to end: ``scoring.score_images`` as the command runs it (listing, workers, batches, model, streamed
  CSV and its final rewrite), for each ``--workers`` value; the metric is created once beforehand, for all;
- today's score: ``score_paths`` + ``write_csv`` of ``pyiqa_grmp/scoring.py`` as committed before this pipeline
  with the image reading of that commit (``git show``, or ``--baseline-dir``), run on the same metric: decoding
  in the main process and batches of equal-size images only;
- pyiqa's own loop: ``metric(path)`` per image, the way pyiqa's inference script scores a folder;
- shards: ``scoring.score_to_shards`` (a parquet file per shard) on webdataset tars holding the same JPEGs
  (``--tar-shard-size`` per tar) against the same images as files (the folder cut into parts of that size), for
  each ``--workers`` value, with their ratio.

    python benchmarks/score_throughput.py [--images 200] [--workers 0 2] [--batch 8] [--threads 2] [--device cpu]
    python benchmarks/score_throughput.py --device cuda --workers 0 16 --batch 64     # on a GPU machine
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch
from common import benchmark_parser, measure, prepare
from PIL import Image

import pyiqa_grmp  # noqa: F401  (registers grmp_iqa)
from pyiqa_grmp import scoring

BASELINE_COMMIT = '607a155'  # the last commit before the pipeline of workers, resumable CSV and ranks
SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000)]
MODEL_ALONE = 'model alone (ready 224x224 batches)'
TODAY = f"today's score ({BASELINE_COMMIT})"
PYIQA_LOOP = "pyiqa's own loop (metric(path))"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_photo(job: tuple) -> None:
    path, number, width, height = job
    from skimage import data

    photos = [data.astronaut, data.coffee, data.chelsea, data.rocket, data.hubble_deep_field]
    image = Image.fromarray(photos[number % len(photos)]()).resize((width, height), Image.BICUBIC)
    noise = np.random.default_rng(number).normal(0, 3, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(folder: str, count: int) -> list:
    """``count`` JPEGs cycling through the sizes and both orientations (reused when already there; made in
    parallel)."""
    os.makedirs(folder, exist_ok=True)
    shapes = SIZES + [(h, w) for w, h in SIZES]
    jobs = []
    for number in range(count):
        width, height = shapes[number % len(shapes)]
        jobs.append((os.path.join(folder, f'photo{number:04d}_{width}x{height}.jpg'), number, width, height))
    missing = [job for job in jobs if not os.path.exists(job[0])]
    if missing:
        with multiprocessing.get_context('spawn').Pool(min(len(missing), os.cpu_count() or 1)) as pool:
            pool.map(_make_photo, missing)
    return sorted(job[0] for job in jobs)


def make_tar_shards(folder: str, paths: list, per_shard: int) -> list:
    """The JPEGs of ``paths`` as webdataset tars of ``per_shard`` samples (``KEY.jpg`` each) beside ``folder``."""
    tar_folder = f'{folder.rstrip(os.sep)}_tar{per_shard}'
    os.makedirs(tar_folder, exist_ok=True)
    shards = []
    for start in range(0, len(paths), per_shard):
        shard = os.path.join(tar_folder, f'{start // per_shard:05d}.tar')
        with tarfile.open(shard, 'w') as archive:
            for path in paths[start:start + per_shard]:
                archive.add(path, arcname=os.path.basename(path))
        shards.append(shard)
    return shards


def _baseline_module(name: str, relative: str, baseline_dir: str):
    """The module at ``relative`` as committed at BASELINE_COMMIT (or its copy in ``baseline_dir``), as ``name``."""
    if baseline_dir:
        origin = os.path.join(baseline_dir, os.path.basename(relative))
        with open(origin) as handle:
            source = handle.read()
    else:
        source = subprocess.run(['git', 'show', f'{BASELINE_COMMIT}:{relative}'], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout
        origin = f'git {BASELINE_COMMIT}:{relative}'
    spec = importlib.util.spec_from_loader(name, loader=None, origin=origin)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = name.rpartition('.')[0]
    sys.modules[name] = module
    exec(compile(source, origin, 'exec'), module.__dict__)
    return module


def load_baseline(baseline_dir: str):
    """The scoring module committed before this pipeline, reading images as that commit did."""
    image_io = _baseline_module('pyiqa_grmp.data.image_io_before', 'pyiqa_grmp/data/image_io.py', baseline_dir)
    scoring_before = _baseline_module('pyiqa_grmp.scoring_before', 'pyiqa_grmp/scoring.py', baseline_dir)
    scoring_before.read_image = image_io.read_image
    scoring_before.ImageReadError = image_io.ImageReadError
    return scoring_before


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, the GPU's work included."""
    return measure(fn, device)['seconds']


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=1, warmup=1)
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--folder', default=os.path.join(tempfile.gettempdir(), 'pyiqa_grmp_score_throughput'))
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--model-batches', type=int, default=4, help='batches timed for the model alone')
    parser.add_argument('--pyiqa-images', type=int, default=None,
                        help="images for pyiqa's own loop (default all; it is slow on a CPU)")
    parser.add_argument('--baseline-images', type=int, default=None,
                        help="images for today's score (default all; it decodes in one process)")
    parser.add_argument('--tar-shard-size', type=int, default=50, help='images per webdataset tar (and per part of '
                                                                       'the folder it is compared with)')
    parser.add_argument('--baseline-dir', help=f'a folder holding scoring.py and image_io.py of {BASELINE_COMMIT}, '
                                               'where git cannot show them (a copy of the repository without .git)')
    args = parser.parse_args()
    device = prepare(args)
    import pyiqa

    paths = make_folder(args.folder, args.images)
    metric = pyiqa.create_metric('grmp_iqa', device=str(device), pretrained=False, backbone_pretrained=None,
                                 backbone=args.backbone)
    net = metric.net
    resize = scoring.declared_resize(metric)
    before = load_baseline(args.baseline_dir)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else os.uname().machine
    print(f'device={device} ({where}) backbone={args.backbone} random weights; threads={args.threads} '
          f'batch={args.batch} images={len(paths)} ({len(SIZES) * 2} sizes 640x480..3000x2000) cpus={os.cpu_count()} '
          f'torch={torch.__version__} runs={args.runs}')
    rates = {}

    def report(name: str, count: int, seconds: float) -> None:
        rates[name] = count / seconds
        print(f'{name:<40} {count:5d} img in {seconds:8.2f} s  {rates[name]:8.2f} img/s')

    ready = torch.rand(args.batch, 3, net.crop, net.crop, device=device)
    with torch.no_grad():
        for _ in range(args.warmup):
            net.score_pixels(net.normalize(ready))
        seconds = min(timed(lambda: [net.score_pixels(net.normalize(ready)) for _ in range(args.model_batches)],
                            device) for _ in range(args.runs))
    report(MODEL_ALONE, args.batch * args.model_batches, seconds)

    finish_on = scoring.shared_gpu({'grmp_iqa': metric})
    for workers in args.workers:
        seconds = min(timed(lambda: [None for _ in scoring.prepared_items(paths, [resize], False, workers,
                                                                          finish_on=finish_on,
                                                                          in_flight=args.batch)], device)
                      for _ in range(args.runs))
        report(f'decode + resize alone, workers={workers}', len(paths), seconds)

    with tempfile.TemporaryDirectory() as out:
        for workers in args.workers:
            seconds = min(timed(lambda: scoring.score_images(
                ['grmp_iqa'], args.folder, device=str(device), batch_size=args.batch, progress=False,
                workers=workers, csv_path=os.path.join(out, 'scores.csv'), metrics={'grmp_iqa': metric}), device)
                for _ in range(args.runs))
            report(f'score end to end, workers={workers}', len(paths), seconds)

        baseline_paths = paths[:args.baseline_images] if args.baseline_images else paths

        def today() -> None:
            old_report = before.ScoreReport(images=baseline_paths, refs={}, metrics=['grmp_iqa'])
            before.score_paths(baseline_paths, {'grmp_iqa': metric}, old_report, args.batch, progress=False)
            before.write_csv(old_report, os.path.join(out, 'today.csv'))

        seconds = min(timed(today, device) for _ in range(args.runs))
        report(TODAY, len(baseline_paths), seconds)

        tars = make_tar_shards(args.folder, paths, args.tar_shard_size)
        for workers in args.workers:
            for kind, targets in (('files', [args.folder]), ('webdataset', tars)):
                seconds = min(timed(lambda: scoring.score_to_shards(
                    ['grmp_iqa'], targets, tempfile.mkdtemp(dir=out), shard_size=args.tar_shard_size,
                    device=str(device), batch_size=args.batch, progress=False, workers=workers,
                    metrics={'grmp_iqa': metric}), device) for _ in range(args.runs))
                report(f'shards of {kind}, workers={workers}', len(paths), seconds)

    subset = paths[:args.pyiqa_images] if args.pyiqa_images else paths
    with torch.no_grad():
        seconds = min(timed(lambda: [metric(path) for path in subset], device) for _ in range(args.runs))
    report(PYIQA_LOOP, len(subset), seconds)

    model, today_rate = rates[MODEL_ALONE], rates[TODAY]
    for workers in args.workers:
        end_to_end = rates[f'score end to end, workers={workers}']
        print(f'workers={workers}: end to end / model alone {end_to_end / model:.2f} (target >= 0.8 on a CPU); '
              f"/ today's score {end_to_end / today_rate:.2f} (target >= 1.15 on a CPU, >= 10 on a GPU); "
              f"/ pyiqa's loop {end_to_end / rates[PYIQA_LOOP]:.2f}; "
              f"/ decode alone {end_to_end / rates[f'decode + resize alone, workers={workers}']:.2f}")
        tar_rate = rates[f'shards of webdataset, workers={workers}']
        file_rate = rates[f'shards of files, workers={workers}']
        print(f'workers={workers}: webdataset tars / the same images as files {tar_rate / file_rate:.2f} '
              '(target >= 1.0 on a CPU)')


if __name__ == '__main__':
    main()

"""Images per second of ``pyiqa-grmp score grmp_iqa`` on a folder of mixed-size JPEGs, against its bounds, side by side.

On a generated folder (200 JPEGs by default, ten sizes from 640x480 to 3000x2000 in both orientations, in an
order that mixes the sizes as a real photo folder does) and a GRMP-IQA with ViT-B/16 and random weights (or the
checkpoint or model folder ``--model`` names), one run measures:

- model alone, fp32 and bf16: the metric's network on ready, normalised 224x224 batches (an upper bound);
- decode alone (the workers decode, nothing crosses) and decode + exact resize (the workers decode, run the
  declared 244x244 squash and collate batches: ``scoring.pipeline.batched_items``), for each ``--workers``
  value; on CUDA also GPU decode alone (``decode='gpu'``: nvJPEG in batches, the declared resize on the GPU);
- per image on one thread: decode, decode + exact resize from the taps (``SquareResize.resize_decoded``), and
  decode + the former float conversion + ``F.interpolate``, in passes over the first ``--per-image`` images, the
  best of ``--per-image-repeats`` passes;
- score end to end: ``scoring.score_images`` as the command runs it (listing, workers, batches, model, streamed
  CSV and its final rewrite): the exact path (fp32, CPU decoding) for each ``--workers`` value, and with the
  last one bf16, GPU decoding (CUDA) and ``--fast``; the metric is created once beforehand;
- the deviation of each of those from the exact path's scores: largest and mean |delta score|, SRCC and the share
  of images whose rank moves by more than 1 % of the images (target SRCC >= 0.9995), on the folder and on the
  photos bundled with scikit-image (saved as JPEGs, one of them grey);
- today's score: ``score_paths`` + ``write_csv`` of ``pyiqa_grmp/scoring.py`` as committed before the pipeline
  with the image reading of that commit (``git show``, or ``--baseline-dir``), run on the same metric: decoding
  in the main process and batches of equal-size images only;
- pyiqa's own loop: ``metric(path)`` per image, the way pyiqa's inference script scores a folder;
- shards: ``scoring.score_to_shards`` (a parquet file per shard) on webdataset tars holding the same JPEGs
  (``--tar-shard-size`` per tar) against the same images as files (the folder cut into parts of that size), for
  each ``--workers`` value, with their ratio.

Random weights keep scores in a narrow band (the deviation lines print its spread), and the folder holds five
photos at ten sizes each, near-duplicates whose scores almost tie: in rank terms (SRCC, ranks moved) the folder's
deviations of random weights are a pessimistic bound, the bundled photos' a fairer one, and ``--model`` gives
those of trained weights. The process keeps freed memory for reuse, as every process of ``score`` that decodes
does (``pyiqa_grmp.cpu_memory``). Lines starting ``result:`` summarise the run (``benchmarks/gpu_check.sh`` puts
them in its table).

    python benchmarks/score_throughput.py [--images 200] [--workers 0 2] [--batch 8] [--threads 2] [--device cpu]
    python benchmarks/score_throughput.py --device cuda --workers 16 --batch 64     # on a GPU machine
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict

import numpy as np
import torch
from common import benchmark_parser, measure, prepare
from PIL import Image

import pyiqa_grmp  # noqa: F401  (registers grmp_iqa)
from pyiqa_grmp import scoring

BASELINE_COMMIT = '607a155'  # the last commit before the pipeline of workers, resumable CSV and ranks
SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000)]
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


def deviation(exact: Dict[str, float], other: Dict[str, float]) -> Dict[str, float]:
    """How far ``other``'s scores are from ``exact``'s (same images): largest and mean |delta|, SRCC, the share
    of images whose rank moves by more than 1 % of the number of images, and the spread (standard deviation) of
    the exact scores, which says how much a given |delta| can reorder."""
    from scipy.stats import rankdata, spearmanr

    names = sorted(set(exact) & set(other))
    a = np.array([exact[n] for n in names])
    b = np.array([other[n] for n in names])
    moved = np.abs(rankdata(a) - rankdata(b)) > 0.01 * len(names)
    return {'images': len(names), 'max': float(np.abs(a - b).max()), 'mean': float(np.abs(a - b).mean()),
            'srcc': float(spearmanr(a, b)[0]) if len(names) > 2 else float('nan'), 'moved': float(moved.mean()),
            'spread': float(a.std())}


def deviation_line(what: str, found: Dict[str, float]) -> str:
    return (f'{what} ({found["images"]} images): max |delta score| {found["max"]:.2e}, mean {found["mean"]:.2e}, '
            f'SRCC {found["srcc"]:.5f} (target >= 0.9995), rank moved by > 1 %: {100 * found["moved"]:.1f} %; '
            f'spread (std) of the exact scores {found["spread"]:.2e}')


def bundled_photos(folder: str) -> str:
    """The photos bundled with scikit-image as JPEGs (quality 90) in ``folder``."""
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    for name in ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
                 'camera', 'retina', 'motorcycle_left', 'colorwheel'):
        path = os.path.join(folder, f'{name}.jpg')
        if not os.path.exists(path):
            try:
                Image.fromarray(getattr(data, name)()).convert('RGB' if name != 'camera' else 'L').save(path,
                                                                                                        quality=90)
            except Exception:  # a photo of another scikit-image version, or one it must fetch
                continue
    return folder


def per_image_costs(paths: list, resize, repeats: int) -> Dict[str, float]:
    """Seconds on one thread of a pass over ``paths`` (each image once, as a worker streams them): decode, decode +
    exact resize from the taps, decode + the former float conversion and F.interpolate; and the exact resize alone
    on the largest image against its decode. Each is the best of ``repeats``, so that a stall of a shared machine
    does not count."""
    from pyiqa_grmp.data.image_io import decode_image, unit_float

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = {p: decode_image(p) for p in paths}
        largest = max(paths, key=lambda p: images[p][0].numel())

        def best_of(work) -> float:
            best = float('inf')
            for _ in range(repeats):
                begin = time.perf_counter()
                work()
                best = min(best, time.perf_counter() - begin)
            return best

        works = {'decode': lambda p: decode_image(p),
                 'decode + exact resize': lambda p: resize.resize_decoded(decode_image(p)),
                 'decode + float + F.interpolate': lambda p: resize(unit_float(decode_image(p))[None])}
        costs = {name: best_of(lambda: [work(path) for path in paths]) for name, work in works.items()}
        costs['largest decode'] = best_of(lambda: decode_image(largest))
        costs['largest exact resize'] = best_of(lambda: resize.resize_decoded(images[largest]))
        costs['largest size'] = tuple(images[largest].shape[1:])
        return costs
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=1, warmup=1)
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--folder', default=os.path.join(tempfile.gettempdir(), 'pyiqa_grmp_score_throughput'))
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--model-batches', type=int, default=4, help='batches timed for the model alone')
    parser.add_argument('--per-image', type=int, default=20, help='images timed one by one on one thread')
    parser.add_argument('--per-image-repeats', type=int, default=5, help='passes over them (the best counts)')
    parser.add_argument('--pyiqa-images', type=int, default=None,
                        help="images for pyiqa's own loop (default all; it is slow on a CPU)")
    parser.add_argument('--baseline-images', type=int, default=None,
                        help="images for today's score (default all; it decodes in one process)")
    parser.add_argument('--tar-shard-size', type=int, default=50, help='images per webdataset tar (and per part of '
                                                                       'the folder it is compared with)')
    parser.add_argument('--baseline-dir', help=f'a folder holding scoring.py and image_io.py of {BASELINE_COMMIT}, '
                                               'where git cannot show them (a copy of the repository without .git)')
    parser.add_argument('--model', help='a GRMP-IQA checkpoint or model folder to score with (its network options '
                                        'come with it) instead of random weights: the deviations of trained weights')
    args = parser.parse_args()
    device = prepare(args)
    import pyiqa

    from pyiqa_grmp.cpu_memory import keep_freed_memory
    from pyiqa_grmp.precision import cpu_has_bf16, fast_precision
    from pyiqa_grmp.scoring.pipeline import batched_items, decode_mode

    paths = make_folder(args.folder, args.images)
    photos = bundled_photos(args.folder + '_photos')
    if args.model:
        metric = pyiqa.create_metric('grmp_iqa', device=str(device), pretrained_model_path=args.model)
        weights = f'weights {args.model}'
    else:
        metric = pyiqa.create_metric('grmp_iqa', device=str(device), pretrained=False, backbone_pretrained=None,
                                     backbone=args.backbone)
        weights = f'backbone={args.backbone} random weights'
    net = metric.net
    resize = scoring.declared_resize(metric)
    before = load_baseline(args.baseline_dir)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else os.uname().machine
    bf16_note = '' if device.type == 'cuda' else f' cpu_has_bf16={cpu_has_bf16()}'
    kept = keep_freed_memory()  # as score's decoding processes do: every row is measured under the same malloc
    print(f'device={device} ({where}) {weights}; threads={args.threads} '
          f'batch={args.batch} images={len(paths)} ({len(SIZES) * 2} sizes 640x480..3000x2000) cpus={os.cpu_count()} '
          f'torch={torch.__version__} runs={args.runs}{bf16_note} freed_memory_kept={kept}')
    rates = {}

    def report(name: str, count: int, seconds: float) -> None:
        rates[name] = count / seconds
        print(f'{name:<44} {count:5d} img in {seconds:8.2f} s  {rates[name]:8.2f} img/s')

    ready = torch.rand(args.batch, 3, net.crop, net.crop, device=device)
    for precision in ('fp32', 'bf16'):
        net.precision = precision
        with torch.no_grad():
            for _ in range(args.warmup):
                net.score_pixels(net.normalize(ready))
            seconds = min(timed(lambda: [net.score_pixels(net.normalize(ready)) for _ in range(args.model_batches)],
                                device) for _ in range(args.runs))
        report(f'model alone, {precision} (ready 224x224)', args.batch * args.model_batches, seconds)
    net.precision = 'fp32'

    gpu = scoring.shared_gpu({'grmp_iqa': metric})
    for workers in args.workers:
        seconds = min(timed(lambda: [None for _ in scoring.prepared_items(paths, [], False, workers,
                                                                          in_flight=args.batch)], device)
                      for _ in range(args.runs))
        report(f'decode alone, workers={workers}', len(paths), seconds)
        seconds = min(timed(lambda: [None for _ in batched_items(paths, [resize], workers, args.batch, device=gpu)],
                            device) for _ in range(args.runs))
        report(f'decode + exact resize, workers={workers}', len(paths), seconds)
    last = args.workers[-1]
    if gpu is not None:
        seconds = min(timed(lambda: [None for _ in batched_items(paths, [resize], last, args.batch, device=gpu,
                                                                 gpu_jpegs=True)], device) for _ in range(args.runs))
        report(f'GPU decode + resize alone, workers={last}', len(paths), seconds)

    costs = per_image_costs(paths[:args.per_image], resize, args.per_image_repeats)
    count = len(paths[:args.per_image])
    for name in ('decode', 'decode + exact resize', 'decode + float + F.interpolate'):
        print(f'per image, one thread: {name:<31} {1000 * costs[name] / count:8.1f} ms')

    fast_precision_name, fast_note = fast_precision(device.type)
    fast_decode = decode_mode('auto', {'grmp_iqa': metric}, False)
    variants = [(f'exact (fp32, cpu decode), workers={w}', 'fp32', 'cpu', w) for w in args.workers]
    variants.append((f'bf16, cpu decode, workers={last}', 'bf16', 'cpu', last))
    if gpu is not None:
        variants.append((f'fp32, gpu decode, workers={last}', 'fp32', 'gpu', last))
    fast_name = f'--fast ({fast_precision_name}, {fast_decode} decode), workers={last}'
    variants.append((fast_name, fast_precision_name, fast_decode, last))
    if fast_note:
        print(f'--fast: {fast_note}')
    scores: Dict[str, Dict[str, Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for name, precision, decode, workers in variants:
            net.precision = precision
            for folder, key in ((args.folder, name), (photos, name + ' [photos]')):
                found = {}

                def run(folder=folder, found=found, decode=decode, workers=workers) -> None:
                    result = scoring.score_images(['grmp_iqa'], folder, device=str(device), batch_size=args.batch,
                                                  progress=False, workers=workers,
                                                  csv_path=os.path.join(out, 'scores.csv'),
                                                  metrics={'grmp_iqa': metric}, decode=decode)
                    found.update({p: s['grmp_iqa'] for p, s in result.scores.items()})

                seconds = min(timed(run, device) for _ in range(args.runs if folder == args.folder else 1))
                scores[key] = found
                if folder == args.folder:
                    report(f'score end to end, {name}', len(paths), seconds)
        net.precision = 'fp32'

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

    exact_name = f'exact (fp32, cpu decode), workers={last}'
    for name, _, _, _ in variants[len(args.workers):]:
        for suffix, what in (('', 'the folder'), (' [photos]', 'the bundled photos')):
            print('deviation ' + deviation_line(f'{name} vs exact, {what}',
                                                deviation(scores[exact_name + suffix], scores[name + suffix])))

    model, today_rate = rates['model alone, fp32 (ready 224x224)'], rates[TODAY]
    for workers in args.workers:
        end_to_end = rates[f'score end to end, exact (fp32, cpu decode), workers={workers}']
        print(f'workers={workers}: exact end to end / model alone fp32 {end_to_end / model:.2f}; '
              f"/ today's score {end_to_end / today_rate:.2f}; / pyiqa's loop {end_to_end / rates[PYIQA_LOOP]:.2f}; "
              f"/ decode + exact resize alone {end_to_end / rates[f'decode + exact resize, workers={workers}']:.2f}; "
              f"decode + exact resize / decode alone (time) "
              f"{rates[f'decode alone, workers={workers}'] / rates[f'decode + exact resize, workers={workers}']:.2f}")
        tar_rate = rates[f'shards of webdataset, workers={workers}']
        file_rate = rates[f'shards of files, workers={workers}']
        print(f'workers={workers}: webdataset tars / the same images as files {tar_rate / file_rate:.2f} '
              '(target >= 1.0 on a CPU)')
    exact_rate, fast_rate = rates[f'score end to end, {exact_name}'], rates[f'score end to end, {fast_name}']
    per_image = costs['decode + exact resize'] / costs['decode']
    largest = costs['largest exact resize'] / costs['largest decode']
    fast_deviation = deviation(scores[exact_name], scores[fast_name])
    print(f'result: exact {exact_rate:.1f} img/s, --fast {fast_rate:.1f} img/s ({fast_rate / exact_rate:.2f}x; target '
          f'>= 2 on a bf16 CPU, >= 1500 img/s on an H100), today {today_rate:.1f} img/s; --fast vs exact SRCC '
          f'{fast_deviation["srcc"]:.5f}')
    print(f'result: per image on one thread, decode + exact resize / decode {per_image:.2f} (target <= 1.3); exact '
          f'resize / decode of the largest ({costs["largest size"][1]}x{costs["largest size"][0]}) {largest:.2f} '
          f'(target <= 0.3); former float + F.interpolate / decode '
          f'{costs["decode + float + F.interpolate"] / costs["decode"]:.2f}')
    if gpu is not None:
        gpu_deviation = deviation(scores[exact_name], scores[f'fp32, gpu decode, workers={last}'])
        print(f'result: GPU decode alone {rates[f"GPU decode + resize alone, workers={last}"]:.1f} img/s; GPU decode '
              f'vs exact SRCC {gpu_deviation["srcc"]:.5f}, max |delta| {gpu_deviation["max"]:.2e}')


if __name__ == '__main__':
    main()

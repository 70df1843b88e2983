"""Images per second the decoding workers of ``score`` reach, keeping freed memory for reuse or with glibc's defaults.

A GPU run's main process leaves malloc as it is (``pyiqa_grmp.cpu_memory``), so its decoding workers keep freed
memory only because their init (``scoring.pipeline._decoding_worker``) asks for it. This process never does; it
runs, alternated ``--runs`` times (the best counts), the workers as they are and with an init that only sets one
thread, on the benchmark folder of ``score_throughput.py`` (made if missing): decode alone
(``scoring.prepared_items``, native images to this process) and decode + exact resize + batches
(``pipeline.batched_items``). Ratios printed.

    python benchmarks/decode_workers.py [--images 48] [--workers 2] [--batch 8] [--runs 3]
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict, Tuple

import torch
from score_throughput import make_folder

from pyiqa_grmp import scoring
from pyiqa_grmp.data.transforms import SquareResize
from pyiqa_grmp.scoring import pipeline


def _one_thread_only(worker_id: int) -> None:
    torch.set_num_threads(1)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=48)
    parser.add_argument('--folder', default=os.path.join(tempfile.gettempdir(), 'pyiqa_grmp_score_throughput'))
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--runs', type=int, default=3)
    args = parser.parse_args()
    paths = make_folder(args.folder, args.images)
    inits = {'workers keep freed memory': pipeline._decoding_worker,
             "glibc's defaults in the workers": _one_thread_only}
    works: Dict[str, Callable[[], None]] = {
        'decode alone': lambda: [None for _ in scoring.prepared_items(paths, [], False, args.workers,
                                                                      in_flight=args.batch)],
        'decode + exact resize': lambda: [None for _ in pipeline.batched_items(paths, [SquareResize(244)],
                                                                               args.workers, args.batch)]}
    best: Dict[Tuple[str, str], float] = {}
    try:
        for _ in range(args.runs):
            for init_name, init in inits.items():
                pipeline._decoding_worker = init
                for work_name, work in works.items():
                    begin = time.perf_counter()
                    work()
                    seconds = time.perf_counter() - begin
                    best[init_name, work_name] = min(best.get((init_name, work_name), float('inf')), seconds)
    finally:
        pipeline._decoding_worker = inits['workers keep freed memory']
    print(f'{len(paths)} JPEGs (0.3-6 MP) in {args.folder}; workers={args.workers} batch={args.batch} '
          f'runs={args.runs} cpus={os.cpu_count()}')
    for (init_name, work_name), seconds in best.items():
        print(f'{work_name:<24} {init_name:<34} {len(paths) / seconds:8.1f} img/s')
    for work_name in works:
        kept, default = (best[name, work_name] for name in inits)
        print(f'result: {work_name}, workers keeping freed memory / glibc defaults {default / kept:.2f}x')


if __name__ == '__main__':
    main()

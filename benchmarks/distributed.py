"""Seconds per fine-tuning step and per meta-training round on 1 and 2 ranks, the same total batch / tasks.

Each rank is a process of ``torch.multiprocessing`` in one gloo (CPU) or NCCL (CUDA) group, building the model
as ``pyiqa-grmp train --launcher pytorch`` does (rank 0's weights broadcast): fine-tuning averages both
gradients over the ranks before the projection, meta-training spreads a round's tasks over the ranks and sums
the snapshots. On a CPU the ranks share the same cores, so the figures show the synchronisation overhead, not a
speed-up; on a machine with one GPU per rank they show the speed-up.

    python benchmarks/distributed.py [--backbone ViT-B-16-quickgelu] [--batch 8] [--tasks 4] [--device cpu]
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
from common import benchmark_parser
from checkpoint_cost import _meta_options
from finetune_step import _options as finetune_options


def _worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // world))
    from pyiqa.models import build_model

    import pyiqa_grmp  # noqa: F401
    from pyiqa_grmp.distributed import barrier, destroy, init_distributed

    if world > 1:
        init_distributed('torchrun', device=args.device)
    device = torch.device('cuda', rank) if args.device == 'cuda' else torch.device('cpu')
    torch.manual_seed(rank)
    timings = {}
    with tempfile.TemporaryDirectory() as workdir:
        for kind, options in (('fine-tuning step', finetune_options), ('meta-training round', _meta_options)):
            opt = options(args.backbone, workdir, args.device)
            opt.update(dist=world > 1, rank=rank, world_size=world)
            model = build_model(opt)
            if kind == 'fine-tuning step':
                share = args.batch // world
                model.feed_data({'img': torch.rand(share, 3, 244, 244, device=device),
                                 'mos_label': torch.rand(share, 1, device=device)})
                run = lambda: model.optimize_parameters(1)  # noqa: E731
            else:
                model.meta['support_batch'] = model.meta['query_batch'] = 8
                task = {'images': torch.randint(0, 256, (1, 12, 3, 256, 256), dtype=torch.uint8),
                        'mos': torch.rand(1, 12), 'source': torch.tensor([0]), 'idle': torch.tensor([False]),
                        'num_source_tasks': torch.tensor([10 ** 6]), 'item_seed': torch.tensor([rank])}

                def run() -> None:
                    for _ in range(args.tasks // world):  # this rank's share of the round
                        model.feed_data(task)
                        model.optimize_parameters(1)
            seconds = []
            for repeat in range(args.warmup + args.runs):
                barrier()
                if args.device == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if args.device == 'cuda':
                    torch.cuda.synchronize()
                barrier()
                if repeat >= args.warmup:
                    seconds.append(time.perf_counter() - start)
            timings[kind] = statistics.median(seconds)
    if rank == 0:
        results[world] = timings
    destroy()


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=3)
    parser.add_argument('--batch', type=int, default=8, help='total fine-tuning batch, split over the ranks')
    parser.add_argument('--tasks', type=int, default=4, help='tasks of one meta-training round')
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 2], help='numbers of ranks to compare')
    args = parser.parse_args()
    results = mp.Manager().dict()
    for world in args.ranks:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        mp.spawn(_worker, args=(world, port, args, results), nprocs=world, join=True)
    print(f'device={args.device} backbone={args.backbone} threads={args.threads} (shared by the ranks) '
          f'batch={args.batch} tasks={args.tasks} runs={args.runs} torch={torch.__version__}')
    first = args.ranks[0]
    for kind in results[first]:
        cells = '   '.join(f'{world} rank(s) {results[world][kind]:8.3f} s' for world in args.ranks)
        ratios = '   '.join(f'ratio {world}/{first} {results[world][kind] / results[first][kind]:.3f}'
                           for world in args.ranks[1:])
        print(f'{kind:<20} {cells}   {ratios}')


if __name__ == '__main__':
    main()

"""One meta-training task of GRMPMetaPromptModel against plain prompt training of the same model and batches.

Plain prompt training takes the same Adam steps on the same prompt tensors (support batch, then query batch)
with no theta, no reset and no snapshots; meta-training adds exactly those. The ratio of peak memory shows that
no backbone copy is made (target <= 1.2x). Interleaved, median of several tasks; random weights.

    python benchmarks/meta_pretrain.py [--backbone ViT-B-16-quickgelu] [--task-size 20] [--support-batch 16]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from common import benchmark_parser, prepare, run_side_by_side
from pyiqa.models import build_model

import pyiqa_grmp  # noqa: F401
from pyiqa_grmp.presets import paper_settings


def _options(args: argparse.Namespace, workdir: str) -> dict:
    paper = paper_settings('meta_pretrain')
    return {
        'name': 'bench', 'model_type': 'GRMPMetaPromptModel', 'num_gpu': 1 if args.device == 'cuda' else 0,
        'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1, 'manual_seed': 0,
        'network': {'type': 'GRMPIQA', 'pretrained': False, 'backbone': args.backbone, 'backbone_pretrained': None},
        'path': {'models': workdir, 'training_states': workdir, 'pretrain_network': None},
        'train': {'optim': paper['train']['optim'],  # the paper's inner Adam and outer step, smaller batches
                  'meta': dict(paper['train']['meta'], support_batch=args.support_batch, query_batch=args.query_batch)},
        'val': {'key_metric': 'srcc', 'metrics': {'srcc': {'type': 'calculate_srcc'}}},
    }


def plain_prompt_training(model) -> None:
    """The same inner steps on the same prompts, nothing else (no theta, reset, snapshot or outer step)."""
    count = model.task_images.shape[0]
    order = torch.randperm(count)
    num_support = round(model.meta['support_ratio'] * count)
    support, query = order[:num_support], order[num_support:]
    net = model.get_bare_model(model.net)
    for start in range(0, num_support, model.meta['support_batch']):
        batch = support[start:start + model.meta['support_batch']]
        model._inner_step(net, model._pixels(batch, True), model.task_mos[batch])
        batch = query[:model.meta['query_batch']]
        model._inner_step(net, model._pixels(batch, False), model.task_mos[batch])


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=3)
    parser.add_argument('--task-size', type=int, default=20)
    parser.add_argument('--support-batch', type=int, default=16)
    parser.add_argument('--query-batch', type=int, default=4)
    args = parser.parse_args()
    device = prepare(args)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(_options(args, workdir))
    model.feed_data({'images': torch.randint(0, 256, (1, args.task_size, 3, 256, 256), dtype=torch.uint8),
                     'mos': torch.rand(1, args.task_size), 'task': ['bench:01'], 'source': torch.tensor([0]),
                     'num_source_tasks': torch.tensor([10 ** 6]),  # no outer step inside the timing
                     'idle': torch.tensor([False]), 'item_seed': torch.tensor([0])})
    candidates = {
        'plain prompt training': lambda: plain_prompt_training(model),
        'GRMPMetaPromptModel task': lambda: model.optimize_parameters(1),
    }
    details = (f'task={args.task_size} images, support batch {args.support_batch}, query batch {args.query_batch}, '
               f'prompt parameters={sum(t.numel() for t in model.theta):,}')
    summary = run_side_by_side(candidates, args, device, details)
    plain, meta = (summary[name] for name in candidates)
    memory = meta['peak_mib'] / plain['peak_mib'] if plain['peak_mib'] > 0 else float('nan')  # tiny models: ~0
    print(f'ratio meta / plain: time {meta["seconds"] / plain["seconds"]:.3f}, peak memory {memory:.3f}  '
          '(memory target <= 1.2)')
    print(f'result: task of {args.task_size}: peak +{meta["peak_mib"]:.0f} MiB vs plain +{plain["peak_mib"]:.0f} MiB '
          f'(ratio {memory:.3f}, target <= 1.2), time ratio {meta["seconds"] / plain["seconds"]:.3f}')


if __name__ == '__main__':
    main()

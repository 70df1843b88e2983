"""Cost of one checkpoint (network + training state) at ViT-B/16: whole-network files against compact ones.

Full (the code path before compact checkpoints): ``net_<iter>.pth`` holds every tensor of the network, frozen
backbone included, then ``<iter>.state``, each written atomically. Compact (today's ``model.save``): the network
file holds only the tensors training changes plus the reference of the base they apply to. Both for
fine-tuning (the paper's trainable set, SGD) and meta-training (prompts, Adam, snapshot sums), side by side on the
same model after one training step; seconds are the median of interleaved saves into the same folder, bytes what
one save leaves on disk. Once per run, the compact path also digests the frozen tensors, and writes them once
(``base-<digest>.safetensors``) when they were initialised at random, as here (random weights, no download);
that one-off cost is printed apart.

    python benchmarks/checkpoint_cost.py [--backbone ViT-B-16-quickgelu] [--runs 3] [--threads 2]
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
from common import benchmark_parser, prepare, run_side_by_side
from finetune_step import _options as finetune_options
from pyiqa.models import build_model

import pyiqa_grmp  # noqa: F401
from pyiqa_grmp.archs.checkpoint import tensor_digest
from pyiqa_grmp.checkpointing import atomic_torch_save
from pyiqa_grmp.model_folder import checkpoint_description


def full_save(model, current_iter: int) -> None:
    """The whole network then the state, as ``save`` wrote them before checkpoints became compact."""
    bare = model.get_bare_model(model.net)
    with model.theta_in_network() if hasattr(model, 'theta_in_network') else torch.no_grad():
        weights = {key: value.detach().cpu() for key, value in bare.state_dict().items()}
        atomic_torch_save({'params': weights, **checkpoint_description(bare, None)},
                          os.path.join(model.opt['path']['models'], f'net_{current_iter}.pth'))
    model.save_training_state(0, current_iter, loop_state={})


def _files(folder: str, current_iter: int) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in (f'net_{current_iter}.pth',
                                                                         f'{current_iter}.state'))


def _meta_options(backbone: str, workdir: str, device: str) -> dict:
    opt = finetune_options(backbone, workdir, device)
    opt['model_type'] = 'GRMPMetaPromptModel'
    opt['train'] = {'optim': {'type': 'Adam', 'lr': 1e-4}, 'meta': {'mode': 'reptile'}}
    return opt


def _after_one_step(model, meta: bool, device: torch.device) -> None:
    """Fill the optimizer (and for meta-training, the snapshot sums) as training would have."""
    if meta:
        images = (torch.rand(1, 12, 3, 256, 256, device=device) * 255).to(torch.uint8)
        model.feed_data({'images': images, 'mos': torch.rand(1, 12), 'source': torch.tensor([0]),
                         'num_source_tasks': torch.tensor([4]), 'idle': torch.tensor([False]),
                         'item_seed': torch.tensor([0])})
        model.meta['support_batch'] = model.meta['query_batch'] = 4
    else:
        model.feed_data({'img': torch.rand(4, 3, 244, 244, device=device), 'mos_label': torch.rand(4, 1)})
    model.optimize_parameters(1)


def main() -> None:
    args = benchmark_parser(__doc__.splitlines()[0], runs=3).parse_args()
    device = prepare(args)
    for kind, options in (('fine-tuning', finetune_options), ('meta-training', _meta_options)):
        with tempfile.TemporaryDirectory() as workdir:
            model = build_model(options(args.backbone, workdir, args.device))
            _after_one_step(model, kind == 'meta-training', device)
            bare = model.get_bare_model(model.net)
            trainable = set(model.trainable_keys(bare))
            start = time.perf_counter()
            tensor_digest({k: v for k, v in bare.state_dict().items() if k not in trainable})
            digest_seconds = time.perf_counter() - start
            start = time.perf_counter()
            reference = model.compact_reference(bare)
            once = time.perf_counter() - start
            stored = reference['base'].get('file')
            stored_bytes = os.path.getsize(os.path.join(workdir, stored)) if stored else 0
            candidates = {f'{kind}: full save': lambda: full_save(model, 1),
                          f'{kind}: compact save': lambda: model.save(0, 2, loop_state={})}
            summary = run_side_by_side(candidates, args, device, kind)
            full, compact = (summary[name]['seconds'] for name in candidates)
            full_bytes, compact_bytes = _files(workdir, 1), _files(workdir, 2)
            print(f'{kind}: bytes per save (network + state) full {full_bytes:,}, compact {compact_bytes:,}; '
                  f'ratios full / compact: bytes {full_bytes / compact_bytes:.1f}x, time {full / compact:.1f}x')
            print(f'{kind}: once per run (and per load): digest of the {reference["tensors"]} frozen tensors '
                  f'{digest_seconds:.2f} s; the first save also wrote a stored base of {stored_bytes:,} bytes '
                  f'({"random-init base" if stored else "none: the base is rebuilt from its weights"}), '
                  f'{once:.2f} s with its digest')


if __name__ == '__main__':
    main()

"""Cost of one checkpoint (network + training state) at ViT-B/16: the crash-safe save against the former one.

Former: pyiqa's ``save_network`` and ``save_training_state`` (``torch.save`` in place), then the training state
read back and written again with our part added (what the models did before the writes became atomic). Now: the
network, then the whole state in one write, each to a temporary file that is flushed, fsynced and renamed. Both
for fine-tuning (SGD state of the trainable blocks) and meta-training (prompts, snapshot sums); seconds are the
median of interleaved saves into the same folder, bytes what one save leaves on disk.

    python benchmarks/checkpoint_cost.py [--backbone ViT-B-16-quickgelu] [--runs 3] [--threads 2]
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from common import benchmark_parser, prepare, run_side_by_side
from finetune_step import _options as finetune_options
from pyiqa.models import build_model
from pyiqa.models.base_model import BaseModel

import pyiqa_grmp  # noqa: F401
from pyiqa_grmp.models.base_model import plain


def former_save(model, current_iter: int) -> None:
    """pyiqa's in-place writes, then the state read back and rewritten with our part (the former code path)."""
    with model.theta_in_network() if hasattr(model, 'theta_in_network') else contextlib.nullcontext():
        BaseModel.save_network(model, model.net, 'net', current_iter)
    BaseModel.save_training_state(model, 0, current_iter)
    path = os.path.join(model.opt['path']['training_states'], f'{current_iter}.state')
    state = torch.load(path, map_location='cpu', weights_only=True)
    state['grmp'] = plain({'best_monitor': model.best_monitor, 'best_metric_results': model.best_metric_results,
                           'model': model.extra_training_state()})
    torch.save(state, path)


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
            candidates = {f'{kind}: former save (in place)': lambda: former_save(model, 1),
                          f'{kind}: atomic save (fsync)': lambda: model.save(0, 2, loop_state={})}
            summary = run_side_by_side(candidates, args, device, kind)
            former, atomic = (summary[name]['seconds'] for name in candidates)
            print(f'{kind}: bytes per save former {_files(workdir, 1):,}, atomic {_files(workdir, 2):,}; '
                  f'time ratio atomic / former {atomic / former:.3f}  (target < 2)')


if __name__ == '__main__':
    main()

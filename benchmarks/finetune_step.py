"""Fine-tuning step of GRMPFinetuneModel against a straightforward two-forward, two-backward implementation.

Both apply the same rule (quality gradient projected against the scene gradient, official mode, lambda 5) to
the same model, batch and trainable parameters; the straightforward one runs the student twice and calls
``backward`` once per loss (what a direct port of the official training loop does), ours runs one forward and
two ``autograd.grad`` calls on the same graph. Interleaved, median of several steps; random weights.

    python benchmarks/finetune_step.py [--backbone ViT-B-16-quickgelu] [--batch 16] [--runs 3] [--threads 2]
"""
from __future__ import annotations

import copy
import tempfile

import torch
from common import benchmark_parser, prepare, run_side_by_side
from pyiqa.models import build_model

import pyiqa_grmp  # noqa: F401
from pyiqa_grmp import regularize_gradients
from pyiqa_grmp.presets import paper_settings


def _options(backbone: str, workdir: str, device: str) -> dict:
    paper = paper_settings('finetune')
    return {
        'name': 'bench', 'model_type': 'GRMPFinetuneModel', 'num_gpu': 1 if device == 'cuda' else 0,
        'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1, 'manual_seed': 0,
        'network': {'type': 'GRMPIQA', 'pretrained': False, 'backbone': backbone, 'backbone_pretrained': None},
        'path': {'models': workdir, 'training_states': workdir, 'pretrain_network': None},
        'train': {key: paper['train'][key] for key in ('optim', 'grad_reg')},  # the paper's SGD and rule
        'val': {'key_metric': 'srcc', 'metrics': {'srcc': {'type': 'calculate_srcc'}}},
    }


def straightforward_step(model, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Two forwards, two backwards: g_d from one, g_g from the other, then the same projection and step."""
    net, params = model.get_bare_model(model.net), model.trainable_params
    pixels = net.preprocess(images, random_crop=True)
    teacher_logits = model.teacher(pixels)
    model.optimizer.zero_grad(set_to_none=True)
    score, _ = net.score_pixels(pixels, return_scene_logits=True)
    model.cri_quality(score, labels).backward()
    g_d = [None if p.grad is None else p.grad.clone() for p in params]
    model.optimizer.zero_grad(set_to_none=True)
    _, scene_logits = net.score_pixels(pixels, return_scene_logits=True)
    model.cri_scene(scene_logits, teacher_logits).backward()
    g_g = [None if p.grad is None else p.grad.clone() for p in params]
    for param, grad in zip(params, regularize_gradients(g_d, g_g, lam=5.0, mode='official')):
        param.grad = grad
    model.optimizer.step()


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=3)
    parser.add_argument('--batch', type=int, default=16)
    args = parser.parse_args()
    device = prepare(args)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(_options(args.backbone, workdir, args.device))
    baseline = copy.copy(model)  # same network, optimizer and teacher: both variants update the same weights
    images = torch.rand(args.batch, 3, 244, 244, device=device)
    labels = torch.rand(args.batch, 1, device=device)
    model.feed_data({'img': images, 'mos_label': labels})
    candidates = {
        'two forwards + two backwards': lambda: straightforward_step(baseline, images, labels),
        'GRMPFinetuneModel (one forward)': lambda: model.optimize_parameters(1),
    }
    trainable = sum(p.numel() for p in model.trainable_params)
    summary = run_side_by_side(candidates, args, device, f'batch={args.batch} trainable={trainable:,}')
    base, ours = list(candidates)
    ratio = summary[ours]['seconds'] / summary[base]['seconds']
    print(f'ratio GRMPFinetuneModel / straightforward: {ratio:.3f}  (target <= 0.75)')
    print(f'result: batch {args.batch}: step {summary[ours]["seconds"] * 1000:.0f} ms vs straightforward '
          f'{summary[base]["seconds"] * 1000:.0f} ms, time ratio {ratio:.3f} (target <= 0.75)')


if __name__ == '__main__':
    main()

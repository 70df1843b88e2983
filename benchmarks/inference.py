"""Inference cost of grmp_iqa against the bare open_clip image encoder of the same backbone, side by side.

Both share the very same weights (the bare encoder *is* ``model.clip.visual``), batch, device and threads;
ours gets 244x244 input (it resizes/crops itself), the bare encoder 224x224. Calls are interleaved and the
median of several runs is compared. Random weights are fine for timing.

    python benchmarks/inference.py [--backbone ViT-B-16-quickgelu] [--batch 4] [--runs 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List

import torch

from common import measure

from pyiqa_grmp.archs.grmp_arch import GRMPIQA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backbone', default='ViT-B-16-quickgelu')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GRMPIQA(backbone=args.backbone, backbone_pretrained=None, pretrained=False).eval().to(device)
    bare = model.clip.visual
    size = model.clip.visual.image_size[0]
    ours_input = torch.rand(args.batch, 3, model.resize, model.resize, device=device)
    bare_input = torch.rand(args.batch, 3, size, size, device=device)
    candidates = {
        'bare open_clip encoder (224)': lambda: bare(bare_input),
        'grmp_iqa (244 in, full metric)': lambda: model(ours_input),
    }
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for _ in range(args.runs):
            for name, fn in candidates.items():
                results[name].append(measure(fn, device))

    print(f'device={device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else os.uname().machine}) '
          f'backbone={args.backbone} batch={args.batch} threads={args.threads} runs={args.runs} '
          f'torch={torch.__version__}')
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r['seconds'] for r in runs)
        peak = max(r['peak_mib'] for r in runs)
        print(f'{name:<34} median {medians[name] * 1000:8.1f} ms  {args.batch / medians[name]:7.1f} img/s  '
              f'peak +{peak:7.1f} MiB')
    bare_name, ours_name = list(candidates)
    print(f'ratio grmp_iqa / bare encoder: {medians[ours_name] / medians[bare_name]:.3f}  (target <= 1.05)')


if __name__ == '__main__':
    main()

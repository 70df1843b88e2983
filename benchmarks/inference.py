"""Inference cost of grmp_iqa against the bare open_clip image encoder of the same backbone, side by side.

Both share the very same weights (the bare encoder *is* ``model.clip.visual``), batch, device, threads and
precision (``--precision bf16|fp16``: the metric's own autocast, the same autocast around the bare encoder);
ours gets 244x244 input (it resizes/crops itself), the bare encoder 224x224. Calls are interleaved and the
median of several runs is compared. Random weights are fine for timing.

    python benchmarks/inference.py [--backbone ViT-B-16-quickgelu] [--batch 4] [--precision fp32] [--runs 7]
        [--threads 2] [--device cuda]
"""
from __future__ import annotations

import torch
from common import benchmark_parser, prepare, run_side_by_side

from pyiqa_grmp.archs.grmp_arch import GRMPIQA
from pyiqa_grmp.precision import PRECISIONS, autocast


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=7, warmup=2)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
    args = parser.parse_args()
    device = prepare(args)
    model = GRMPIQA(backbone=args.backbone, backbone_pretrained=None, pretrained=False,
                    precision=args.precision).eval().to(device)
    bare = model.clip.visual
    size = model.clip.visual.image_size[0]
    ours_input = torch.rand(args.batch, 3, model.resize, model.resize, device=device)
    bare_input = torch.rand(args.batch, 3, size, size, device=device)

    def bare_encoder() -> torch.Tensor:
        with autocast(args.precision, device.type):
            return bare(bare_input)

    candidates = {
        'bare open_clip encoder (224)': bare_encoder,
        'grmp_iqa (244 in, full metric)': lambda: model(ours_input),
    }
    with torch.no_grad():
        summary = run_side_by_side(candidates, args, device, f'batch={args.batch} precision={args.precision}')
    bare_name, ours_name = list(candidates)
    for name in candidates:
        print(f'{name:<34} {args.batch / summary[name]["seconds"]:8.1f} img/s')
    ratio = summary[ours_name]['seconds'] / summary[bare_name]['seconds']
    print(f'ratio grmp_iqa / bare encoder: {ratio:.3f}  (target <= 1.05)')
    print(f'result: {args.precision} batch {args.batch}: grmp_iqa {args.batch / summary[ours_name]["seconds"]:.1f} '
          f'img/s, bare encoder {args.batch / summary[bare_name]["seconds"]:.1f} img/s, time ratio {ratio:.3f}')


if __name__ == '__main__':
    main()

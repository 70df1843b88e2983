"""How far bf16 / fp16 scoring moves GRMP-IQA scores from fp32, on one fixed batch (not a timing).

One random-weight model (seed 0; LayerNorms and biases perturbed so that they matter), one fixed batch of
bundled photos and seeded noise images; per precision: the largest and mean absolute score difference against
fp32 and the dtype of the scores. fp16 runs on CUDA only.

    python benchmarks/precision.py [--backbone ViT-B-16-quickgelu] [--device cuda] [--threads 2]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import benchmark_parser, prepare

from pyiqa_grmp.archs.grmp_arch import GRMPIQA


def fixed_batch(count: int = 8) -> torch.Tensor:
    """Bundled scikit-image photos (resized to 300x300) and seeded noise images, in [0, 1]."""
    from skimage import data

    images = []
    for name in ('astronaut', 'coffee', 'chelsea', 'rocket'):
        photo = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        images.append(F.interpolate(photo, size=(300, 300), mode='bilinear', align_corners=False))
    generator = torch.Generator().manual_seed(0)
    images.append(torch.rand(count - len(images), 3, 300, 300, generator=generator))
    return torch.cat(images).clamp(0, 1)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], runs=1, warmup=0)
    args = parser.parse_args()
    device = prepare(args)
    model = GRMPIQA(backbone=args.backbone, backbone_pretrained=None, pretrained=False).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.to(device)
    images = fixed_batch().to(device)
    precisions = ['bf16', 'fp16'] if device.type == 'cuda' else ['bf16']
    with torch.no_grad():
        exact = model(images)
        print(f'device={device} backbone={args.backbone if isinstance(args.backbone, str) else "config dict"} '
              f'batch={images.shape[0]} fp32 scores {exact.min().item():.4f}..{exact.max().item():.4f} '
              f'torch={torch.__version__}')
        differences = []
        for precision in precisions:
            model.precision = precision
            scores = model(images)
            difference = (scores - exact).abs()
            differences.append(f'{precision} max {difference.max().item():.2e} mean {difference.mean().item():.2e}')
            print(f'{precision}: max |score - fp32| {difference.max().item():.2e}, mean {difference.mean().item():.2e},'
                  f' scores {scores.dtype}')
    print(f'result: score difference vs fp32 on {images.shape[0]} images: {"; ".join(differences)}')


if __name__ == '__main__':
    main()

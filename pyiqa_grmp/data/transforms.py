"""Square resize and crops of image batches: the one implementation used by the arch's preprocessing, the
meta-learner's support and query crops, and the datasets' stored images.

Images are (N, C, H, W) float tensors in [0, 1] unless said otherwise; only torch is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def square_resize(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of (N, C, H, W) to size x size, aspect ratio not kept (as the official data preparation)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode='bicubic', align_corners=False, antialias=antialias)


@dataclass(frozen=True)
class SquareResize:
    """:func:`square_resize` to ``size`` as a picklable value: GRMP-IQA's declared fixed input resize.

    Scoring runs it in data-loading workers (see :data:`pyiqa_grmp.scoring.FIXED_RESIZE_ATTRIBUTE`), so it
    must be, and is, the very call :meth:`pyiqa_grmp.archs.grmp_arch.GRMPIQA.preprocess` makes.
    """

    size: int
    antialias: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return square_resize(images, self.size, self.antialias)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of square images (the official test-time crop)."""
    top = (images.shape[-2] - size) // 2
    left = (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def random_crop_and_flip(images: torch.Tensor, size: int) -> torch.Tensor:
    """Per sample: a random size x size crop and a horizontal flip with probability 0.5 (training augmentation)."""
    height, width = images.shape[-2:]
    tops = torch.randint(0, height - size + 1, (images.shape[0],)).tolist()
    lefts = torch.randint(0, width - size + 1, (images.shape[0],)).tolist()
    flips = (torch.rand(images.shape[0]) < 0.5).tolist()
    crops = []
    for image, top, left, flip in zip(images, tops, lefts, flips):
        crop = image[:, top:top + size, left:left + size]
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


def stored_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] squashed to size x size (bicubic) and stored as uint8, like the official
    pre-resized .mat files; datasets keep images in this form and hand them out as ``stored / 255``."""
    resized = square_resize(image.unsqueeze(0), size)[0]
    return (resized.clamp(0, 1) * 255).round().to(torch.uint8)

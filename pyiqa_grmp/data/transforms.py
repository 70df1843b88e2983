"""Square resize and crops of image batches: the one implementation used by the arch's preprocessing, the
meta-learner's support and query crops, and the datasets' stored images.

Images are (N, C, H, W) float tensors in [0, 1] unless said otherwise; only torch is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F

#: The cubic convolution constant of PyTorch's bicubic interpolation (and OpenCV's).
CUBIC_A = -0.75


def square_resize(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of (N, C, H, W) to size x size, aspect ratio not kept (as the official data preparation)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode='bicubic', align_corners=False, antialias=antialias)


@dataclass(frozen=True)
class SquareResize:
    """:func:`square_resize` to ``size`` as a picklable value: GRMP-IQA's declared fixed input resize.

    Scoring runs it ahead of the model (see :data:`pyiqa_grmp.scoring.FIXED_RESIZE_ATTRIBUTE`), so the call
    must be, and is, the very one :meth:`pyiqa_grmp.archs.grmp_arch.GRMPIQA.preprocess` makes; data-loading
    workers run :meth:`resize_decoded`, the same computation within 1e-6.
    """

    size: int
    antialias: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return square_resize(images, self.size, self.antialias)

    def resize_decoded(self, image: torch.Tensor) -> torch.Tensor:
        """This resize of one decoded (C, H, W) image (uint8, or float in [0, 1]) as float32 (C, size, size).

        Equal within 1e-6 to ``self(unit_float(image)[None])[0]``, at a fraction of its cost on a CPU: without
        antialias only 4 input rows and columns per output pixel count, so only those are gathered from the
        decoded pixels and made float (:func:`squash_bicubic`), for images of more pixels than those taps (about
        1 MP for 244); smaller ones, and antialias, take the plain call, which costs as little there.
        """
        from .image_io import unit_float

        if self.antialias or image.shape[-2] * image.shape[-1] <= (4 * self.size) ** 2:
            return self(unit_float(image).unsqueeze(0))[0]  # no more pixels than the taps read: as cheap
        return squash_bicubic(image, self.size)


@lru_cache(maxsize=256)
def bicubic_taps(input_size: int, output_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 4 input indices (clamped to the border) and weights of each output pixel of a bicubic resize along one
    axis, as ``F.interpolate(mode='bicubic', align_corners=False, antialias=False)`` computes them on a CPU.

    Source coordinate ``in/out * (i + 0.5) - 0.5``, not clamped (cubic); its floor (at most ``input_size - 1``)
    and the fraction clamped to [0, 1]; Keys' cubic kernel with A = -0.75. All in float32, with the fused
    multiply-adds PyTorch's compiled kernel contracts to (emulated exactly: a float32 product is exact in float64),
    so the weights match its own to about one float32 rounding. Returns (output_size, 4) int64 indices and
    float32 weights.
    """
    scale = torch.tensor(input_size, dtype=torch.float32) / output_size
    real = _fma(scale, torch.arange(output_size, dtype=torch.float32) + 0.5, -0.5)
    first = torch.clamp(torch.floor(real).long(), max=input_size - 1)
    t = torch.clamp(real - first, 0.0, 1.0)
    a = torch.tensor(CUBIC_A, dtype=torch.float32)

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1: ((a + 2) x - (a + 3)) x x + 1
        return _fma(_fma(a + 2, x, -(a + 3)) * x, x, 1.0)

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 <= |x| < 2: ((a x - 5 a) x + 8 a) x - 4 a
        return _fma(_fma(_fma(a, x, -5 * a), x, 8 * a), x, -4 * a)

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far((1 - t) + 1)], dim=1)
    indices = (first.unsqueeze(1) + torch.arange(-1, 3)).clamp(0, input_size - 1)
    return indices, weights


def _fma(x: torch.Tensor, y: torch.Tensor, z: object) -> torch.Tensor:
    """x * y + z in float32 with one rounding (a fused multiply-add)."""
    return (x.double() * torch.as_tensor(y).double() + torch.as_tensor(z).double()).float()


def squash_bicubic(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize (no antialias) of one (C, H, W) image, uint8 or float, to float32 (C, size, size).

    ``F.interpolate`` of ``unit_float(image)`` to within a few float32 roundings (same taps and weights, summed
    along the width, then the height, as PyTorch does), reading only what the taps touch: the rows they name (at
    most 4 * size) and in those the 4 * size columns, tap-major, so that both passes are weighted sums of contiguous
    blocks; only those are made float, never a float copy of the whole image.
    """
    from .image_io import unit_float

    channels, height, width = image.shape
    rows, row_weights = bicubic_taps(height, size)
    columns, column_weights = bicubic_taps(width, size)
    needed_rows, row_taps = torch.unique(rows, return_inverse=True)  # at most 4 * size, fewer for small images
    pixels = image.permute(1, 2, 0)  # (H, W, C): a view; rows are contiguous in a decoded (channels-last) image
    if len(needed_rows) < height:
        pixels = pixels.index_select(0, needed_rows)
    taps = pixels.index_select(1, columns.t().reshape(-1))
    taps = unit_float(taps).view(len(needed_rows), 4, size * channels)  # (row, column tap, column and channel)
    column_weights = column_weights.t().repeat_interleave(channels, dim=1)  # (4, size * C), contiguous rows
    across = taps[:, 0] * column_weights[0]
    for k in range(1, 4):
        across.addcmul_(taps[:, k], column_weights[k])
    row_weights = row_weights.t().contiguous().unsqueeze(-1)  # (4, size, 1)
    down = across.index_select(0, row_taps[:, 0]) * row_weights[0]
    for k in range(1, 4):
        down.addcmul_(across.index_select(0, row_taps[:, k]), row_weights[k])
    return down.view(size, size, channels).permute(2, 0, 1).contiguous()


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

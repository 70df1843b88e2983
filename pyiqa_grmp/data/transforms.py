"""Square resize and crops of image batches: the one implementation used by the arch's preprocessing, the
meta-learner's support and query crops, and the datasets' stored images.

Images are (N, C, H, W) float tensors in [0, 1] unless said otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import numpy as np
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
        """This resize of one decoded (C, H, W) CPU image (uint8, or float in [0, 1]) as float32 (C, size, size).

        Equal within 1e-6 to ``self(unit_float(image)[None])[0]``, at a fraction of its cost: without antialias
        only 4 input rows and columns per output pixel count, so only those are gathered from the decoded pixels
        (:func:`squash_bicubic`); antialias takes the plain call, and an image of the size already is only made
        float, as the plain call leaves it.
        """
        from .image_io import unit_float

        if self.antialias or image.shape[-2:] == (self.size, self.size):
            return self(unit_float(image).unsqueeze(0))[0]
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
    """Bicubic resize (no antialias) of one (C, H, W) CPU image, uint8 or float, to float32 (C, size, size).

    ``F.interpolate`` of ``unit_float(image)`` within a few float32 roundings (the same taps and weights; tested
    within 1e-6), reading only what the taps touch, and never a float copy of the whole image: unit_float's 1/255
    is in the first pass's weights, which compute in float32 from the decoded bytes. Two orders, whichever moves
    less. Rows first (most photos): the ``size`` rows of each row tap are taken whole (contiguous copies) and
    summed, then the 4 * size columns of that (size, W) result. Columns first (images over 3x as wide as the rows
    they need, at most 4 * size): the 4 * size columns of the rows needed are gathered (numpy's ``take`` over the
    elements of a row, a third of the cost of ``index_select`` over 3-byte pixels) and summed, then the rows of
    that. A decoded (channels-last) image is read in place; any other layout is made channels-last first.
    """
    channels, height, width = image.shape
    unit = 255.0 if image.dtype == torch.uint8 else 1.0
    rows, row_weights = bicubic_taps(height, size)
    pixels = image.permute(1, 2, 0).contiguous().view(height, width * channels)
    if width <= 3 * min(height, 4 * size):
        resized = _column_pass(_row_pass(pixels, rows, row_weights / unit), width, size, channels, 1.0)
    else:
        needed_rows, row_taps = torch.unique(rows, return_inverse=True)
        if len(needed_rows) < height:
            pixels = pixels.index_select(0, needed_rows)
        resized = _row_pass(_column_pass(pixels, width, size, channels, unit), row_taps, row_weights)
    return resized.view(size, size, channels).permute(2, 0, 1).contiguous()


def _row_pass(pixels: torch.Tensor, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(size, L) float32: row i is the sum over k of ``weights[i, k] * pixels[taps[i, k]]`` (pixels (N, L))."""
    weights = weights.t().unsqueeze(-1)  # (4, size, 1)
    summed = pixels.index_select(0, taps[:, 0]) * weights[0]
    for k in range(1, 4):
        summed.addcmul_(pixels.index_select(0, taps[:, k]), weights[k])
    return summed


def _column_pass(pixels: torch.Tensor, width: int, size: int, channels: int, unit: float) -> torch.Tensor:
    """(N, size * channels) float32: the bicubic resize along the width of channels-last rows (N, width *
    channels), divided by ``unit``."""
    elements, weights = _column_taps(width, size, channels, unit)
    taps = torch.from_numpy(np.take(pixels.numpy(), elements, axis=1)).view(len(pixels), 4, size * channels)
    summed = taps[:, 0] * weights[0]
    for k in range(1, 4):
        summed.addcmul_(taps[:, k], weights[k])
    return summed


@lru_cache(maxsize=256)
def _column_taps(width: int, size: int, channels: int, unit: float) -> Tuple[np.ndarray, torch.Tensor]:
    """The columns of :func:`bicubic_taps` as element indices into a channels-last row, tap-major ((4 * size *
    channels,) for ``np.take``), and their weights / ``unit`` repeated per channel ((4, size * channels))."""
    columns, weights = bicubic_taps(width, size)
    elements = (columns.t().unsqueeze(-1) * channels + torch.arange(channels)).reshape(-1).numpy()
    return elements, (weights.t() / unit).repeat_interleave(channels, dim=1).contiguous()


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

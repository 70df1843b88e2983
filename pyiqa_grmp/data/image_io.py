"""Reading image files into tensors the way IQA users expect: any PIL mode, EXIF orientation applied."""
from __future__ import annotations

import os
import warnings
from typing import List

import numpy as np
import torch
from PIL import Image, ImageOps

#: The EXIF tag of the orientation (1: as stored).
EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm', '.pgm', '.jp2')


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def list_images(folder: str) -> List[str]:
    """All files with an image extension under ``folder`` (recursive, sorted)."""
    found = []
    for root, _, files in os.walk(folder):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def decode_image(path: str, shared: bool = False) -> torch.Tensor:
    """Decode ``path`` into a (3, H, W) tensor as the file stores it: uint8 for 8-bit images, float32 in [0, 1]
    for 16-bit and float ones.

    EXIF orientation is applied; grey, palette, CMYK and alpha images become RGB (alpha is dropped, as pyiqa
    does). Keeping 8-bit pixels as uint8 makes a decoded image 4x smaller to pass between processes and leaves
    the float conversion (:func:`unit_float`) to wherever it is cheapest, e.g. a GPU. ``shared`` puts an 8-bit
    image straight into shared memory, so that a data-loading worker passes it on without another copy.
    """
    try:
        with Image.open(path) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)  # a transposed copy; without a rotation it would copy too
            image.load()
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                array = np.asarray(image, dtype=np.float32) / 65535.0
                array = np.repeat(array[..., None], 3, axis=-1)
            elif image.mode == 'F':
                array = np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=-1)
            else:
                rgb = image if image.mode == 'RGB' else image.convert('RGB')
                return _rgb_tensor(rgb.tobytes(), rgb.height, rgb.width, shared)
    except Exception as error:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise ImageReadError(f'cannot read image {path}: {type(error).__name__}: {error}') from error
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not torch.isfinite(tensor).all():
        raise ImageReadError(f'image {path} contains NaN or Inf values')
    return tensor.clamp_(0.0, 1.0)


def _rgb_tensor(pixels: bytes, height: int, width: int, shared: bool) -> torch.Tensor:
    """Packed RGB bytes as a writable (3, H, W) uint8 view of an (H, W, 3) tensor (one copy)."""
    tensor = torch.empty((height, width, 3), dtype=torch.uint8)
    if shared:
        tensor.share_memory_()
    with warnings.catch_warnings():  # the bytes are only read: they are copied into ``tensor``
        warnings.filterwarnings('ignore', message='The given buffer is not writable')
        tensor.view(-1).copy_(torch.frombuffer(pixels, dtype=torch.uint8))
    return tensor.permute(2, 0, 1)


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """A decoded image (:func:`decode_image`) as float32 in [0, 1], on the device it is on (uint8 / 255)."""
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255.0)
    return image


def read_image(path: str) -> torch.Tensor:
    """Decode ``path`` into a (3, H, W) float32 tensor in [0, 1] (see :func:`decode_image`).

    16-bit images keep their precision instead of being truncated to 8 bits.
    """
    return unit_float(decode_image(path))

"""Reading image files into tensors the way IQA users expect: any PIL mode, EXIF orientation applied."""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm', '.pgm', '.jp2')


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def list_images(folder: str) -> List[str]:
    """All files with an image extension under ``folder`` (recursive, sorted)."""
    found = []
    for root, _, files in os.walk(folder):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def read_image(path: str) -> torch.Tensor:
    """Decode ``path`` into a (3, H, W) float tensor in [0, 1].

    EXIF orientation is applied; grey, palette, CMYK and alpha images become RGB (alpha is dropped, as pyiqa
    does); 16-bit images keep their precision instead of being truncated to 8 bits.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                array = np.asarray(image, dtype=np.float32) / 65535.0
                array = np.repeat(array[..., None], 3, axis=-1)
            elif image.mode == 'F':
                array = np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=-1)
            else:
                array = np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0
    except Exception as error:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise ImageReadError(f'cannot read image {path}: {type(error).__name__}: {error}') from error
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not torch.isfinite(tensor).all():
        raise ImageReadError(f'image {path} contains NaN or Inf values')
    return tensor.clamp_(0.0, 1.0)

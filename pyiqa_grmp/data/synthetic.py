"""A small labelled IQA dataset made offline from photos bundled in installed packages.

Photos: scikit-image (astronaut, chelsea, coffee, rocket, motorcycle), scikit-learn (china, flower) and
matplotlib (grace_hopper). Each is centre-cropped square, resized to ``size`` and distorted with five types at
five ordered levels. Labels: ``MOS = 100 * (1 - level / 6)``, so 100 for the pristine image (level 0) down to
16.7 at level 5, the same ladder for every type. Within a type the order of levels is a defensible ground truth
(severity ladders of these distortions track BRISQUE/NIQE with SRCC ~0.95); across types it is a convention.

It is the offline stand-in for a real dataset: a pyiqa NR meta-info CSV (``image_name, mos, distortion, level,
reference``) plus the images, ready for ``FewShotNRDataset`` and the smoke configs.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Dict, List

import numpy as np
from PIL import Image, ImageFilter

LEVELS = (1, 2, 3, 4, 5)
META_INFO_NAME = 'meta_info_synthetic.csv'


def mos_for_level(level: int) -> float:
    """The documented label of a distortion level (0 = pristine)."""
    return 100.0 * (1.0 - level / 6.0)


def bundled_photos() -> Dict[str, np.ndarray]:
    """Colour photos shipped inside scikit-image, scikit-learn and matplotlib wheels (no network)."""
    from matplotlib import cbook
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ('astronaut', 'chelsea', 'coffee', 'rocket')}
    photos['motorcycle'] = data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        photos[os.path.splitext(os.path.basename(filename))[0]] = image
    with cbook.get_sample_data('grace_hopper.jpg') as handle:
        photos['grace_hopper'] = np.asarray(Image.open(handle).convert('RGB'))
    return photos


def _square(image: np.ndarray, size: int) -> Image.Image:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side, :3]))
    return crop.resize((size, size), Image.BICUBIC)


def _noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    sigma = (0.02, 0.05, 0.08, 0.12, 0.18)[level - 1]
    pixels = np.asarray(image, np.float32) / 255 + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def _blur(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur((0.8, 1.5, 2.5, 4.0, 6.0)[level - 1]))


def _jpeg(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=(60, 35, 20, 10, 5)[level - 1])
    buffer.seek(0)
    return Image.open(buffer).convert('RGB')


def _pixelate(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    factor = (2, 3, 4, 6, 8)[level - 1]
    small = image.resize((image.width // factor, image.height // factor), Image.BOX)
    return small.resize(image.size, Image.NEAREST)


def _contrast(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    keep = (0.75, 0.55, 0.4, 0.28, 0.18)[level - 1]
    pixels = np.asarray(image, np.float32)
    faded = pixels.mean() + keep * (pixels - pixels.mean())
    return Image.fromarray(np.clip(faded, 0, 255).round().astype(np.uint8))


DISTORTIONS: Dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    'gaussian_noise': _noise, 'gaussian_blur': _blur, 'jpeg': _jpeg, 'pixelate': _pixelate, 'contrast': _contrast,
}


def make_synthetic_dataset(out_dir: str, seed: int = 0, size: int = 256) -> str:
    """Write the images and ``meta_info_synthetic.csv`` under ``out_dir``; return the CSV path."""
    import pandas as pd

    if size < 32:
        raise ValueError(f'size must be at least 32 pixels, got {size}')
    image_dir = os.path.join(out_dir, 'images')
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: List[dict] = []
    for photo_name, array in sorted(bundled_photos().items()):
        clean = _square(array, size)
        versions = [('pristine', 0, clean)]
        versions += [(kind, level, distort(clean, level, rng))
                     for kind, distort in DISTORTIONS.items() for level in LEVELS]
        for kind, level, image in versions:
            file_name = f'{photo_name}_{kind}_{level}.png'
            image.save(os.path.join(image_dir, file_name))
            rows.append({'image_name': f'images/{file_name}', 'mos': round(mos_for_level(level), 4),
                         'distortion': kind, 'level': level, 'reference': photo_name})
    meta_path = os.path.join(out_dir, META_INFO_NAME)
    pd.DataFrame(rows).to_csv(meta_path, index=False)
    return meta_path

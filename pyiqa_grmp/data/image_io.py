"""Reading image files into tensors the way IQA users expect: any PIL mode, EXIF orientation applied.

Only regular files (or links to them) are ever opened: a FIFO, socket or device named like an image is an
:class:`ImageReadError` naming the file and its kind, checked before opening and again on the open descriptor
(opened non-blocking, so that a file swapped in meanwhile cannot hang the reader). An image of more than
:data:`MAX_IMAGE_PIXELS` pixels (Pillow's decompression-bomb bound) is refused the same way, before it is decoded.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from typing import BinaryIO, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

#: The EXIF tag of the orientation (1: as stored).
EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm', '.pgm', '.jp2')
#: Images of more pixels than this are refused unread (Pillow's own error bound, whatever ``Image.MAX_IMAGE_PIXELS``).
MAX_IMAGE_PIXELS = 2 * 89_478_485
_FILE_KINDS = ((stat.S_ISDIR, 'folder'), (stat.S_ISFIFO, 'FIFO'), (stat.S_ISSOCK, 'socket'),
               (stat.S_ISCHR, 'character device'), (stat.S_ISBLK, 'block device'))
_UNPRINTABLE = re.compile('[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]')


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


class NotARegularFileError(OSError):
    """A path names a FIFO, socket, device or folder where a regular file is needed; the message names it."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f'{printable(path)} is not a regular file but a {kind}')
        self.path, self.kind = path, kind

    def __reduce__(self):  # picklable, e.g. out of a DataLoader worker
        return type(self), (self.path, self.kind)


def file_kind(mode: int) -> str:
    """'regular file', or what else an ``st_mode`` describes ('FIFO', 'socket', 'character device', ...)."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), 'regular file' if stat.S_ISREG(mode) else
                'special file')


def open_regular_file(path: str) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (or a link to one), else
    :class:`NotARegularFileError`; a FIFO, socket or device is never opened, and the open cannot block."""
    kind = file_kind(os.stat(path).st_mode)
    if kind != 'regular file':
        raise NotARegularFileError(path, kind)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(descriptor).st_mode)  # replaced since the stat?
        if kind != 'regular file':
            raise NotARegularFileError(path, kind)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, 'rb')
    except BaseException:
        os.close(descriptor)
        raise


def escape_undecodable(text: str) -> str:
    """``text`` with each byte of a file name that is not UTF-8 (a lone surrogate U+DC80-U+DCFF, PEP 383) as
    ``\\xhh``, and any other lone surrogate as ``\\udxxx``, so that it can be written as UTF-8."""
    return re.sub('[\ud800-\udfff]', _escaped, text)


def printable(text: str) -> str:
    """``text`` safe for a terminal or a one-line message: :func:`escape_undecodable`, and control characters
    (all but tab, e.g. newlines and terminal escapes) as ``\\xhh``."""
    return _UNPRINTABLE.sub(_escaped, text)


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f'\\x{code - 0xDC00:02x}'
    return f'\\x{code:02x}' if code < 0x100 else f'\\u{code:04x}'


def list_images(folder: str) -> List[str]:
    """Everything but folders with an image extension under ``folder`` (recursive, sorted): files that are not
    regular are listed too, so that reading them reports them by name (:func:`decode_image` never opens them)."""
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
    image straight into shared memory, so that a data-loading worker passes it on without another copy. A file
    that is not regular, or has more than :data:`MAX_IMAGE_PIXELS` pixels, is an :class:`ImageReadError`.
    """
    try:
        with open_regular_file(path) as stream:
            return _decode_stream(stream, path, shared)
    except NotARegularFileError as error:
        raise ImageReadError(f'cannot read image {printable(path)}: not a regular file but a '
                             f'{error.kind}') from error
    except OSError as error:
        raise ImageReadError(f'cannot read image {printable(path)}: {type(error).__name__}: {error}') from error


def read_image_bytes(path: str, limit: int) -> Optional[bytes]:
    """The encoded bytes of image file ``path``, or None when it holds more than ``limit`` bytes (left to
    :func:`decode_image`, which streams it); a file that is not regular or cannot be read is an
    :class:`ImageReadError` worded as :func:`decode_image` words it."""
    try:
        with open_regular_file(path) as stream:
            if os.fstat(stream.fileno()).st_size > limit:
                return None
            data = stream.read(limit + 1)  # a file that grew since: still bounded
            return data if len(data) <= limit else None
    except NotARegularFileError as error:
        raise ImageReadError(f'cannot read image {printable(path)}: not a regular file but a '
                             f'{error.kind}') from error
    except OSError as error:
        raise ImageReadError(f'cannot read image {printable(path)}: {type(error).__name__}: {error}') from error


def decode_image_bytes(data: bytes, name: str, shared: bool = False) -> torch.Tensor:
    """Decode an encoded image held in memory (a tar member, a parquet cell) as :func:`decode_image` decodes a
    file; ``name`` names it in errors (e.g. ``shard.tar:key.jpg``)."""
    return _decode_stream(io.BytesIO(data), name, shared)


def _decode_stream(stream: BinaryIO, name: str, shared: bool) -> torch.Tensor:
    """The image in ``stream`` (see :func:`decode_image`); every failure is an :class:`ImageReadError` naming it."""
    try:
        with Image.open(stream) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f'image size ({image.width * image.height} pixels, {image.width}x{image.height}) exceeds the '
                    f'limit of {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)')
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
    except Image.UnidentifiedImageError as error:  # Pillow names the open stream, not the path
        raise ImageReadError(f'cannot read image {printable(name)}: UnidentifiedImageError: cannot identify image '
                             f"file '{printable(name)}'") from error
    except Exception as error:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise ImageReadError(f'cannot read image {printable(name)}: {type(error).__name__}: {error}') from error
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not torch.isfinite(tensor).all():
        raise ImageReadError(f'image {printable(name)} contains NaN or Inf values')
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

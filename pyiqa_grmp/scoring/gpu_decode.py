"""JPEG decoding on the GPU for scoring (``decode='gpu'``): which files go there, their EXIF orientation, and the
batched nvJPEG call with its fallbacks.

The decoding workers read each image's encoded bytes and :func:`gpu_plan` looks at the JPEG header alone (no
pixel is decoded): a baseline, extended or progressive Huffman JPEG of 8-bit grey or YCbCr pixels within
:data:`~pyiqa_grmp.data.image_io.MAX_IMAGE_PIXELS`, whole (it ends with an EOI marker), goes to the GPU with its
EXIF orientation; anything else (not a JPEG, CMYK or Adobe RGB, 12-bit, lossless, arithmetic-coded, truncated, an
orientation in XMP, a header that cannot be parsed) is decoded on the CPU in the worker as ``decode='cpu'`` does,
so a broken file is reported there by name. The main process decodes the GPU's share of a batch in one
``torchvision.io.decode_jpeg(list, device=...)`` call (:func:`decode_jpegs`); if that call fails, each image is
retried alone, and an image nvJPEG still refuses is decoded on the CPU, so only a file that no decoder reads fails.

nvJPEG's pixels differ slightly from Pillow's (its IDCT and chroma upsampling), so GPU-decoded scores are close to,
not equal to, the exact path's; ``benchmarks/score_throughput.py`` reports the deviation.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..data.image_io import MAX_IMAGE_PIXELS

#: SOF markers nvJPEG decodes: baseline, extended sequential and progressive DCT, Huffman-coded.
GPU_FRAME_MARKERS = {0xC0: 'baseline', 0xC1: 'extended sequential', 0xC2: 'progressive'}
#: The other SOF markers (lossless, hierarchical, arithmetic-coded): decoded on the CPU.
OTHER_FRAME_MARKERS = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
_XMP_HEADER = b'http://ns.adobe.com/xap/1.0/\x00'


@dataclass(frozen=True)
class GpuPlan:
    """What :func:`gpu_plan` found: ``orientation`` (EXIF, 1-8) when the GPU takes the file, else ``reason``."""

    orientation: int = 1
    reason: Optional[str] = None

    @property
    def on_gpu(self) -> bool:
        return self.reason is None


def gpu_plan(data: bytes) -> GpuPlan:
    """Whether nvJPEG takes the encoded image ``data`` (see the module docstring), judged from its header."""
    if data[:2] != b'\xff\xd8':
        return GpuPlan(reason='not a JPEG')
    try:
        return _scan_jpeg(data)
    except (struct.error, IndexError, ValueError) as error:
        return GpuPlan(reason=f'JPEG header not understood ({error})')


def _scan_jpeg(data: bytes) -> GpuPlan:
    position, orientation, frame = 2, None, None
    while True:
        if data[position] != 0xFF:
            raise ValueError(f'no marker at byte {position}')
        while data[position] == 0xFF:  # fill bytes
            position += 1
        marker = data[position]
        position += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            return GpuPlan(reason='no image data before the end marker')
        (length,) = struct.unpack('>H', data[position:position + 2])
        if length < 2 or position + length > len(data):
            return GpuPlan(reason='truncated header')
        payload = data[position + 2:position + length]
        position += length
        if marker == 0xE1 and payload[:6] == b'Exif\x00\x00' and orientation is None:
            orientation = _exif_orientation(payload[6:])  # the first Exif segment counts, as in Pillow
        elif marker == 0xE1 and payload.startswith(_XMP_HEADER) and b'tiff:Orientation' in payload:
            return GpuPlan(reason='orientation in XMP')
        elif marker == 0xEE and payload[:5] == b'Adobe' and len(payload) >= 12 and payload[11] == 0:
            return GpuPlan(reason='Adobe RGB or CMYK (no YCbCr transform)')
        elif marker in OTHER_FRAME_MARKERS:
            return GpuPlan(reason=f'SOF{marker - 0xC0} frame (lossless, hierarchical or arithmetic-coded)')
        elif marker in GPU_FRAME_MARKERS:
            precision, height, width, components = struct.unpack('>BHHB', payload[:6])
            frame = (precision, height, width, components)
        elif marker == 0xDA:
            break
    if frame is None:
        return GpuPlan(reason='no frame header before the scan')
    precision, height, width, components = frame
    if precision != 8:
        return GpuPlan(reason=f'{precision}-bit samples')
    if components not in (1, 3):
        return GpuPlan(reason=f'{components} components (CMYK?)')
    if height == 0 or width == 0 or height * width > MAX_IMAGE_PIXELS:
        return GpuPlan(reason=f'{width}x{height} pixels')
    if data.rfind(b'\xff\xd9') < position:
        return GpuPlan(reason='truncated (no end marker)')
    if orientation is not None and not 1 <= orientation <= 8:
        orientation = 1  # Pillow's exif_transpose ignores values it does not know
    return GpuPlan(orientation=orientation or 1)


def _exif_orientation(tiff: bytes) -> Optional[int]:
    """The orientation tag (0x0112) of IFD0 of a TIFF-structured EXIF block, or None."""
    order = {b'II': '<', b'MM': '>'}.get(tiff[:2])
    if order is None:
        return None
    (ifd,) = struct.unpack(order + 'I', tiff[4:8])
    (count,) = struct.unpack(order + 'H', tiff[ifd:ifd + 2])
    for entry in range(count):
        start = ifd + 2 + 12 * entry
        tag, kind = struct.unpack(order + 'HH', tiff[start:start + 4])
        if tag == 0x0112:
            if kind == 3:  # SHORT
                return struct.unpack(order + 'H', tiff[start + 8:start + 10])[0]
            if kind == 4:  # LONG
                return struct.unpack(order + 'I', tiff[start + 8:start + 12])[0]
            return None
    return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as displayed: the transposition of ``PIL.ImageOps.exif_transpose`` for ``orientation``."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


Decoder = Callable[[List[torch.Tensor]], List[torch.Tensor]]


def torchvision_decoder(device: Union[str, torch.device]) -> Decoder:
    """``torchvision.io.decode_jpeg`` of a list of encoded JPEGs (1-D uint8 CPU tensors) to RGB on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(encoded: List[torch.Tensor]) -> List[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            warnings.simplefilter('ignore')
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    return decode


def decode_jpegs(encoded: Sequence[torch.Tensor], decoder: Decoder) -> List[Union[torch.Tensor, str]]:
    """Every encoded JPEG decoded by ``decoder``: all in one call, and when that call fails, one by one; an image
    that fails alone gets the reason (a string) instead of its pixels, for the caller's CPU fallback."""
    if not encoded:
        return []
    try:
        images = decoder(list(encoded))
        if len(images) == len(encoded):
            return list(images)
    except Exception:  # nvJPEG raises RuntimeError for one bad stream in a batch: find which one
        pass
    decoded: List[Union[torch.Tensor, str]] = []
    for data in encoded:
        try:
            decoded.append(decoder([data])[0])
        except Exception as error:
            decoded.append(f'{type(error).__name__}: {error}')
    return decoded

r"""What a scoring run scores: the images of a target (folder, list, file), their references, and their names.

Each image is an :class:`ImageSource`: a ``key`` naming it in reports and CSVs and a way to decode its pixels.
Files are :class:`ImageFile` (the key is the path); another kind of collection (an archive, a table of encoded
images) only adds a kind of source, and the pipeline reads every kind the same way.

File names in a score CSV (the ``image`` and ``reference`` columns; :func:`encode_path`, :func:`decode_path`):
Linux names are bytes, and Python holds the bytes that are not UTF-8 as lone surrogates (PEP 383). A CSV is UTF-8
text, so a path is written as the UTF-8 text of its bytes, unchanged, unless its bytes are not valid UTF-8, or it
holds a line break (CR or LF), or it starts with :data:`ESCAPED_PATH_PREFIX` (``fsbytes:``). Then it is written as
``fsbytes:`` followed by its bytes, where each backslash is written ``\\``, each CR ``\x0d``, each LF ``\x0a``,
each byte that is not part of valid UTF-8 ``\xhh`` (two lowercase hex digits), and everything else as its UTF-8
text. For example ``b'/photos/caf\xe9.png'`` is written ``fsbytes:/photos/caf\xe9.png``, while a UTF-8 name
that really is ``/photos/caf\xe9.png`` is written as it is. Text not starting with the prefix is never unescaped,
and names that start with it are always escaped, so the encoding is lossless and no two names share a text;
``--resume`` decodes it back to the bytes and matches the files by them. Failure reasons (the ``errors`` column)
and console messages show such bytes as ``\xhh`` too, and control characters escaped, for reading only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple, Union

import torch

from ..data.image_io import (decode_image, decode_image_bytes, list_images, open_regular_file, printable,
                             read_image_bytes)

#: A ``-t`` file with this extension lists image paths, one per line.
IMAGE_LIST_EXTENSIONS = ('.txt',)
#: A path in a score CSV starting with this is written escaped (see the module docstring).
ESCAPED_PATH_PREFIX = 'fsbytes:'


# ----------------------------------------------------------------------------------------------- the items
class ImageSource(Protocol):
    """One image to score: ``key`` names it (reports, CSV rows, resume); :meth:`decode` reads its pixels.

    A source may also have ``read_bytes(limit: int) -> Optional[bytes]``: its encoded bytes, or None when there
    are more than ``limit`` (ImageReadError when they cannot be read). GPU decoding (``decode='gpu'``) needs
    them, and decodes a source without the method, or that returns None, on the CPU (:func:`encoded_bytes`).
    """

    @property
    def key(self) -> str: ...

    def decode(self, shared: bool = False) -> torch.Tensor:
        """The image as :func:`pyiqa_grmp.data.image_io.decode_image` gives it; ImageReadError if it cannot be."""


@dataclass(frozen=True)
class ImageFile:
    """An image file; its key is its path."""

    path: str

    @property
    def key(self) -> str:
        return self.path

    def decode(self, shared: bool = False) -> torch.Tensor:
        return decode_image(self.path, shared)

    def read_bytes(self, limit: int) -> Optional[bytes]:
        return read_image_bytes(self.path, limit)


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image held in memory (a tar member, a parquet cell, a Ray batch row); ``key`` names it."""

    key: str
    data: bytes

    def decode(self, shared: bool = False) -> torch.Tensor:
        return decode_image_bytes(self.data, self.key, shared)

    def read_bytes(self, limit: int) -> Optional[bytes]:
        return self.data if len(self.data) <= limit else None


def encoded_bytes(source: ImageSource, limit: int) -> Optional[bytes]:
    """The encoded bytes of ``source`` (at most ``limit``), or None when it has no ``read_bytes`` or more bytes."""
    read = getattr(source, 'read_bytes', None)
    return read(limit) if read is not None else None


def as_source(image: Union[str, ImageSource]) -> ImageSource:
    """``image`` as a source: a path names an :class:`ImageFile`."""
    return ImageFile(image) if isinstance(image, str) else image


# ------------------------------------------------------------------------------------------------ the images
def read_image_list(path: str) -> List[str]:
    """Image paths listed one per line in ``path``; relative ones are relative to the list's folder.

    Lines are file names as the file system has them (bytes, as ``find`` prints them; not UTF-8 is fine)."""
    folder = os.path.dirname(path)
    try:
        with open_regular_file(path) as handle:
            lines = [os.fsdecode(line.rstrip(b'\r')) for line in handle.read().split(b'\n')]
    except OSError as error:
        raise ValueError(f'cannot read the image list {printable(path)}: {error}') from error
    images: List[str] = []
    first_line: Dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image = os.path.join(folder, line.strip())
        if image in first_line:
            raise ValueError(f'image list {printable(path)} names {printable(image)} twice (lines '
                             f'{first_line[image]} and {number})')
        first_line[image] = number
        images.append(image)
    if not images:
        raise ValueError(f'image list {printable(path)} names no image')
    return images


def collect_targets(target: str) -> List[str]:
    """The images of ``-t``: a folder (recursive, sorted), a ``.txt`` list (in its order) or one image file."""
    if os.path.isfile(target) and target.lower().endswith(IMAGE_LIST_EXTENSIONS):
        return read_image_list(target)
    return _collect(target, 'target')


def _collect(path: str, what: str) -> List[str]:
    """The images of a folder, or ``[path]`` for a file of any kind (reading reports one that is not regular)."""
    if os.path.isdir(path):
        found = list_images(path)
        if not found:
            raise FileNotFoundError(f'no image files found in {what} folder {printable(path)}')
        return found
    if os.path.exists(path):
        return [path]
    raise FileNotFoundError(f'{what} {printable(path)} does not exist')


def pair_references(targets: List[str], target_root: str, ref_path: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Match each target with a reference: the same file, or the same relative path / file name in a folder.

    Returns the reference of each paired target and, for each target left unpaired, the reason.
    """
    if os.path.exists(ref_path) and not os.path.isdir(ref_path):
        return {target: ref_path for target in targets}, {}
    refs = _collect(ref_path, 'reference')
    by_relative = {os.path.relpath(r, ref_path): r for r in refs}
    by_name: Dict[str, List[str]] = {}
    for r in refs:
        by_name.setdefault(os.path.basename(r), []).append(r)
    paired: Dict[str, str] = {}
    unpaired: Dict[str, str] = {}
    for target in targets:
        relative = os.path.relpath(target, target_root) if os.path.isdir(target_root) else os.path.basename(target)
        match = by_relative.get(relative)
        candidates = by_name.get(os.path.basename(target), [])
        if match is None and len(candidates) == 1:
            match = candidates[0]
        if match is None:
            unpaired[target] = f'no reference image with the same name in {printable(ref_path)}'
        else:
            paired[target] = match
    return paired, unpaired


# ------------------------------------------------------------------------------------------------ their names
def encode_path(path: str) -> str:
    """The text of ``path`` in a score CSV: its name as it is, or escaped (see the module docstring)."""
    raw = os.fsencode(path)
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith(ESCAPED_PATH_PREFIX) and '\n' not in text and '\r' not in text:
        return text
    body = raw.replace(b'\\', b'\\\\').replace(b'\r', b'\\x0d').replace(b'\n', b'\\x0a')
    return ESCAPED_PATH_PREFIX + re.sub('[\udc80-\udcff]', lambda match: f'\\x{ord(match.group()) - 0xDC00:02x}',
                                        body.decode('utf-8', 'surrogateescape'))


_ESCAPE = re.compile(r'\\(?:(\\)|x([0-9a-f]{2}))?')


def decode_path(text: str) -> str:
    """The path a score CSV's text names (the inverse of :func:`encode_path`); ValueError for a bad escape."""
    if not text.startswith(ESCAPED_PATH_PREFIX):
        return os.fsdecode(text.encode('utf-8'))
    body, raw, position = text[len(ESCAPED_PATH_PREFIX):], bytearray(), 0
    for match in _ESCAPE.finditer(body):
        raw += body[position:match.start()].encode('utf-8')
        if match.group(1):
            raw += b'\\'
        elif match.group(2):
            raw.append(int(match.group(2), 16))
        else:
            raise ValueError(f'the path {text!r} has a backslash that starts neither \\\\ nor \\xhh')
        position = match.end()
    raw += body[position:].encode('utf-8')
    return os.fsdecode(bytes(raw))

"""Input shards: webdataset tars, parquet files, and folders or lists cut into virtual parts; listed and read.

A run scores shards, and each shard gives one output file (:mod:`.shard_output`). :func:`list_shards` names the
shards of the targets without reading them (brace ranges such as ``shards/{00000..00999}.tar`` and globs are
expanded, in the order given, each sorted); :func:`read_shard` reads one shard's index into small, picklable
:class:`~pyiqa_grmp.scoring.collect.ImageSource` objects that read their own bytes in the decoding workers, so
the main process never holds a shard's image bytes.

- **Webdataset tar** (``.tar``, not compressed: members are read by offset): the headers are walked without
  extracting anything (only regular members are kept; links, folders and devices are skipped, and nothing is
  written, so member names are never paths on this machine). Members are grouped into samples as webdataset
  does: the key is the member name up to the first dot of its last path component, consecutive members with the
  same key form a sample. Every image member (``jpg``, ``jpeg``, ``png``, ``webp``, ... by its last extension)
  is scored: under the sample's key when it is the sample's only image, else under ``KEY.EXT`` (e.g.
  ``000123.jpg`` and ``000123.seg.png``). A tar cut short (or with a corrupt header) is reported by name, and
  the samples before the damage are kept.
- **Parquet** (``.parquet``): the image bytes column is ``image_column``, else the first of
  :data:`IMAGE_COLUMN_NAMES` (a binary column, or a Hugging Face ``Image`` struct ``{bytes, path}``), else the
  only such struct; the key is ``key_column``, else the column ``key``, else the row index (zero-padded to the
  file's row count, so keys sort in row order). ``keep_columns`` are carried over. The main process reads the
  footer and the small key and kept columns; each worker reads the image column one row group at a time.
- **Folders, ``.txt`` lists and image files**: their images (:func:`~pyiqa_grmp.scoring.collect.collect_targets`)
  cut into parts of ``shard_size`` images named ``part-00000``, ``part-00001``, ... in listing order, so that a
  big folder is scored, resumed and spread over machines part by part as tar shards are.
"""
from __future__ import annotations

import glob
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data.image_io import IMAGE_EXTENSIONS, ImageReadError, decode_image_bytes, open_regular_file, printable
from ..errors import InvalidArgument
from .collect import ImageFile, ImageSource, collect_targets
from .results import Failure

#: Column names taken as the image bytes of a parquet file, in this order, when ``image_column`` is not given.
IMAGE_COLUMN_NAMES = ('jpg', 'jpeg', 'png', 'webp', 'image', 'img')
#: A tar member or parquet cell larger than this is a failed row, not read (no image this large decodes anyway).
MAX_ENCODED_IMAGE_BYTES = 1 << 29
#: A tar's pax or GNU long-name header larger than this ends the walk as a corrupt tar.
MAX_TAR_HEADER_BYTES = 1 << 20
#: A parquet file whose image column has a row group larger than this (uncompressed) is refused: each worker
#: holds one row group of it.
MAX_ROW_GROUP_BYTES = 1 << 31
_IMAGE_SUFFIXES = {extension.lstrip('.') for extension in IMAGE_EXTENSIONS}
_BLOCK = 512


# ---------------------------------------------------------------------------------------------- the listing
@dataclass(frozen=True)
class Shard:
    """One input shard: ``name`` names its output; ``kind`` is 'webdataset', 'parquet' or 'files' (a virtual
    part of a folder or list, whose ``images`` are listed here)."""

    name: str
    kind: str
    path: str = ''
    images: Tuple[str, ...] = ()


def expand_braces(pattern: str) -> List[str]:
    """``pattern`` with its brace groups expanded, as a shell does: ``{00000..00012}`` (numeric ranges, padded to
    the width of their first bound) and ``{a,b}`` (alternatives); groups may repeat and nest."""
    match = re.search(r'\{([^{}]*)\}', pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if numeric:
        first, last = numeric.groups()
        step = 1 if int(last) >= int(first) else -1
        choices = [f'{n:0{len(first)}d}' for n in range(int(first), int(last) + step, step)]
    elif ',' in body:
        choices = body.split(',')
    else:  # not a brace group (e.g. a literal "{x}" in a name): keep it and expand the rest
        return [head + '{' + body + '}' + rest for rest in expand_braces(tail)]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand_targets(targets: Sequence[str]) -> List[str]:
    """The paths ``targets`` name: brace ranges expanded, then globs (each sorted) where a path does not exist."""
    paths: List[str] = []
    for target in targets:
        for path in expand_braces(target):
            if os.path.exists(path) or not glob.has_magic(path):
                paths.append(path)
                continue
            found = sorted(glob.glob(path))
            if not found:
                raise FileNotFoundError(f'target {printable(path)} matches no file')
            paths.extend(found)
    return paths


def shard_kind(path: str) -> Optional[str]:
    """'webdataset' or 'parquet' for a file of that kind (by its extension), else None."""
    lower = path.lower()
    if lower.endswith('.tar'):
        return 'webdataset'
    if lower.endswith('.parquet'):
        return 'parquet'
    if lower.endswith(('.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.tar.zst')):
        raise ValueError(f'{printable(path)} is a compressed tar: webdataset shards are read by member offset, '
                         'so they must be plain .tar files (most are)')
    return None


def list_shards(targets: Sequence[str], shard_size: int) -> List[Shard]:
    """The shards of ``targets`` in order: one per tar or parquet file, and the images of folders, lists and image
    files cut into parts of ``shard_size`` (see the module docstring). Output names must be unique."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InvalidArgument('shard_size', f'must be an integer >= 1, got {shard_size!r}')
    shards: List[Shard] = []
    images: List[str] = []
    parts = itertools.count()

    def cut_images() -> None:
        for start in range(0, len(images), shard_size):
            shards.append(Shard(f'part-{next(parts):05d}', 'files', '', tuple(images[start:start + shard_size])))
        images.clear()

    for path in expand_targets(targets):
        kind = shard_kind(path) if os.path.isfile(path) else None
        if kind is None:
            images.extend(collect_targets(path))
            continue
        cut_images()
        name = os.path.basename(path)[:-len('.tar' if kind == 'webdataset' else '.parquet')]
        shards.append(Shard(name, kind, path))
    cut_images()
    seen: Dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f'the shards {printable(seen[shard.name])} and {printable(shard.path)} would both be '
                             f'written as {printable(shard.name)}.parquet: give shards with distinct file names')
        seen[shard.name] = shard.path
    return shards


# ------------------------------------------------------------------------------------------------ the reading
@dataclass
class ShardContents:
    """What a shard holds: its images (in order) and, for parquet, the kept columns (arrow arrays, one value per
    image); ``failures`` are the shard's own (a truncated tar), each naming it."""

    sources: List[ImageSource]
    columns: Dict[str, object] = field(default_factory=dict)
    failures: List[Failure] = field(default_factory=list)


def read_shard(shard: Shard, image_column: Optional[str] = None, key_column: Optional[str] = None,
               keep_columns: Sequence[str] = ()) -> ShardContents:
    """The images of ``shard`` as sources that read themselves (see the module docstring)."""
    if shard.kind == 'files':
        if keep_columns:
            raise InvalidArgument('keep_columns', 'only applies to parquet targets')
        return ShardContents([ImageFile(path) for path in shard.images])
    if keep_columns and shard.kind != 'parquet':
        raise InvalidArgument('keep_columns', 'only applies to parquet targets')
    if shard.kind == 'webdataset':
        return _read_tar(shard.path)
    return _read_parquet(shard.path, image_column, key_column, list(keep_columns))


# ------------------------------------------------------------------------------------------------- tar shards
@dataclass(frozen=True)
class TarMember:
    """An image member of a tar shard, read by offset; ``key`` names its row, ``member`` its name in the tar."""

    key: str
    path: str
    member: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The member's bytes; ImageReadError when they cannot be had."""
        name = f'{self.path}:{self.member}'
        if self.size > MAX_ENCODED_IMAGE_BYTES:
            raise ImageReadError(f'cannot read image {printable(name)}: {self.size} bytes, more than the '
                                 f'{MAX_ENCODED_IMAGE_BYTES} an image may have')
        try:
            with open_regular_file(self.path) as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as error:
            raise ImageReadError(f'cannot read image {printable(name)}: {type(error).__name__}: {error}') from error
        if len(data) != self.size:
            raise ImageReadError(f'cannot read image {printable(name)}: the tar ends inside it')
        return data

    def decode(self, shared: bool = False) -> torch.Tensor:
        return decode_image_bytes(self.read(), f'{self.path}:{self.member}', shared)

    def read_bytes(self, limit: int) -> Optional[bytes]:
        """The member's bytes, or None when it has more than ``limit`` (for GPU decoding)."""
        return self.read() if self.size <= limit else None


def _tar_number(field_bytes: bytes) -> int:
    """A tar header number: octal text, or GNU base-256 (high bit set) for large values."""
    if field_bytes[:1] and field_bytes[0] & 0x80:
        return int.from_bytes(field_bytes[1:], 'big')
    text = field_bytes.split(b'\0', 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(header: bytes) -> bool:
    try:
        recorded = _tar_number(header[148:156])
    except ValueError:
        return False
    return recorded == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _pax_path(data: bytes) -> Optional[str]:
    """The ``path`` record of a pax extended header, if any (records are ``LENGTH key=value\\n``)."""
    position, found = 0, None
    while position < len(data):
        space = data.find(b' ', position)
        if space < 0:
            break
        try:
            length = int(data[position:space])
        except ValueError:
            break
        if length <= space - position:
            break
        record = data[space + 1:position + length - 1]
        key, _, value = record.partition(b'=')
        if key == b'path':
            found = value.decode('utf-8', 'surrogateescape')
        position += length
    return found


def tar_entries(path: str) -> Tuple[List[Tuple[str, int, int]], Optional[str]]:
    """The regular members of the tar ``path`` as (name, data offset, size), read from the headers only, and
    why the walk stopped early (a truncated or corrupt tar), else None. Memory: one header at a time."""
    entries: List[Tuple[str, int, int]] = []
    try:
        handle = open_regular_file(path)
    except OSError as error:
        raise ValueError(f'cannot read the webdataset shard {printable(path)}: {error}') from error
    with handle:
        file_size = os.fstat(handle.fileno()).st_size
        position, next_name = 0, None
        while True:
            header = handle.read(_BLOCK)
            if not header:
                return entries, None
            if len(header) < _BLOCK:
                return entries, f'it ends inside the header at byte {position} (file of {file_size} bytes)'
            if header == b'\0' * _BLOCK:
                return entries, None
            if not _header_ok(header):
                return entries, f'the header at byte {position} is corrupt (bad checksum)'
            size = _tar_number(header[124:136])
            kind = header[156:157]
            data_offset = position + _BLOCK
            if data_offset + size > file_size:
                return entries, (f'it ends inside the member at byte {position} ({size} bytes announced, '
                                 f'{file_size - data_offset} there)')
            if kind in (b'x', b'L'):
                if size > MAX_TAR_HEADER_BYTES:
                    return entries, f'the extended header at byte {position} announces {size} bytes'
                data = handle.read(size)
                next_name = _pax_path(data) if kind == b'x' else data.split(b'\0', 1)[0].decode(
                    'utf-8', 'surrogateescape')
            elif kind in (b'0', b'\0', b'7'):
                name = header[:100].split(b'\0', 1)[0]
                if header[257:262] == b'ustar' and header[345:500].strip(b'\0'):
                    name = header[345:500].split(b'\0', 1)[0] + b'/' + name
                entries.append((next_name or name.decode('utf-8', 'surrogateescape'), data_offset, size))
                next_name = None
            else:  # a folder, link, device or global header: nothing to score
                next_name = None if kind != b'g' else next_name
            position = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            handle.seek(position)


def split_member_name(name: str) -> Tuple[str, str]:
    """(key, extension) of a webdataset member: the name up to the first dot of its last component, and the rest."""
    folder, _, base = name.rpartition('/')
    stem, dot, extension = base.partition('.')
    return (f'{folder}/{stem}' if folder else stem), extension


def _read_tar(path: str) -> ShardContents:
    entries, damage = tar_entries(path)
    samples: List[Tuple[str, List[Tuple[str, str, int, int]]]] = []
    previous = None
    for name, offset, size in entries:  # consecutive members with one key are a sample, images or not
        key, extension = split_member_name(name)
        if key != previous:
            samples.append((key, []))
            previous = key
        if key and extension.rpartition('.')[2].lower() in _IMAGE_SUFFIXES:
            samples[-1][1].append((name, extension, offset, size))
    sources: List[ImageSource] = []
    for key, members in samples:
        for name, extension, offset, size in members:
            row_key = key if len(members) == 1 else f'{key}.{extension}'
            sources.append(TarMember(row_key, path, name, offset, size))
    failures = []
    if damage:
        failures.append(Failure(None, path, f'webdataset shard {printable(path)} is damaged: {damage}; the '
                                            f'{len(sources)} image(s) before it are scored'))
    elif not sources:
        failures.append(Failure(None, path, f'webdataset shard {printable(path)} holds no image member'))
    return ShardContents(sources, failures=failures)


# --------------------------------------------------------------------------------------------- parquet shards
#: The image column of one row group, in this process (a worker reads each row group it needs once).
_ROW_GROUP_CACHE: Dict[Tuple[str, int, str, Optional[str]], object] = {}


@dataclass(frozen=True)
class ParquetCell:
    """The image bytes of one row of a parquet file: ``column`` (its ``bytes`` field when ``struct_field``)."""

    key: str
    path: str
    row_group: int
    row: int
    column: str
    struct_field: Optional[str] = None

    def read(self) -> bytes:
        name = f'{self.path}:{self.key}'
        cache_key = (self.path, self.row_group, self.column, self.struct_field)
        values = _ROW_GROUP_CACHE.get(cache_key)
        if values is None:
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=[self.column])
            except Exception as error:  # pyarrow raises OSError, ArrowInvalid, ... for damaged files
                raise ImageReadError(f'cannot read image {printable(name)}: row group {self.row_group}: '
                                     f'{type(error).__name__}: {error}') from error
            values = table.column(0).combine_chunks()
            if self.struct_field is not None:
                values = values.field(self.struct_field)
            _ROW_GROUP_CACHE.clear()  # one row group at a time: memory stays that of one
            _ROW_GROUP_CACHE[cache_key] = values
        data = values[self.row].as_py()
        if data is None:
            raise ImageReadError(f'cannot read image {printable(name)}: its {self.column} cell holds no bytes')
        if len(data) > MAX_ENCODED_IMAGE_BYTES:
            raise ImageReadError(f'cannot read image {printable(name)}: {len(data)} bytes, more than an image may '
                                 'have')
        return data

    def decode(self, shared: bool = False) -> torch.Tensor:
        return decode_image_bytes(self.read(), f'{self.path}:{self.key}', shared)

    def read_bytes(self, limit: int) -> Optional[bytes]:
        """The cell's bytes, or None when it holds more than ``limit`` (for GPU decoding)."""
        data = self.read()
        return data if len(data) <= limit else None


def release_row_groups() -> None:
    """Drop the row group this process holds (after a shard read with ``workers=0``, in the main process)."""
    _ROW_GROUP_CACHE.clear()


def _image_column(schema, path: str, image_column: Optional[str]) -> Tuple[str, Optional[str]]:
    """(column, struct field or None) of the image bytes in a parquet ``schema``."""
    import pyarrow as pa

    def kind(name: str) -> Optional[Tuple[str, Optional[str]]]:
        column_type = schema.field(name).type
        if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
            return name, None
        if pa.types.is_struct(column_type) and column_type.get_field_index('bytes') >= 0:
            inner = column_type.field('bytes').type
            if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
                return name, 'bytes'
        return None

    columns = list(schema.names)
    if image_column is not None:
        if image_column not in columns:
            raise InvalidArgument('image_column', f'{image_column!r} is not a column of {printable(path)} (its '
                                                  f'columns: {", ".join(columns)})')
        found = kind(image_column)
        if found is None:
            raise InvalidArgument('image_column', f'{image_column!r} of {printable(path)} holds '
                                                  f'{schema.field(image_column).type}, not image bytes')
        return found
    for name in IMAGE_COLUMN_NAMES:
        if name in columns and kind(name) is not None:
            return kind(name)
    structs = [name for name in columns if kind(name) is not None and kind(name)[1] is not None]
    if len(structs) == 1:
        return structs[0], 'bytes'
    raise InvalidArgument('image_column', f'is needed: parquet file {printable(path)} has no image column (a binary '
                                          f'column named {", ".join(IMAGE_COLUMN_NAMES)}, or an Image struct '
                                          f'{{bytes, path}}); its columns are {", ".join(columns)}')


def _read_parquet(path: str, image_column: Optional[str], key_column: Optional[str],
                  keep_columns: List[str]) -> ShardContents:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # not parquet, damaged footer, ...
        raise ValueError(f'cannot read the parquet file {printable(path)}: {type(error).__name__}: {error}') from error
    schema = parquet.schema_arrow
    column, struct_field = _image_column(schema, path, image_column)
    columns = list(schema.names)
    if key_column is not None and key_column not in columns:
        raise InvalidArgument('key_column', f'{key_column!r} is not a column of {printable(path)} (its columns: '
                                            f'{", ".join(columns)})')
    missing = [name for name in keep_columns if name not in columns]
    if missing:
        raise InvalidArgument('keep_columns', f'names {", ".join(missing)}, not columns of {printable(path)} (its '
                                              f'columns: {", ".join(columns)})')
    metadata = parquet.metadata
    index = columns.index(column)
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).column(index).total_uncompressed_size
        if size > MAX_ROW_GROUP_BYTES:
            raise ValueError(f'parquet file {printable(path)}: row group {group} holds {size} bytes of images, more '
                             f'than {MAX_ROW_GROUP_BYTES}: write it with smaller row groups')
    key_column = key_column or ('key' if 'key' in columns and column != 'key' else None)
    rows = metadata.num_rows
    width = len(str(max(rows - 1, 0)))
    keys = [f'{i:0{width}d}' for i in range(rows)]
    if key_column is not None:
        keys = [f'{i:0{width}d}' if value is None else str(value)
                for i, value in enumerate(parquet.read(columns=[key_column]).column(0).to_pylist())]
    kept = {}
    if keep_columns:
        table = parquet.read(columns=keep_columns)
        kept = {name: table.column(name).combine_chunks() for name in keep_columns}
    sources: List[ImageSource] = []
    row = 0
    for group in range(metadata.num_row_groups):
        for position in range(metadata.row_group(group).num_rows):
            sources.append(ParquetCell(keys[row], path, group, position, column, struct_field))
            row += 1
    return ShardContents(sources, kept)

r"""Scoring image collections with any pyiqa metric (GRMP-IQA included), at any scale.

Pipeline: images are decoded in ``workers`` processes of a ``torch.utils.data.DataLoader`` while the main process
runs the metrics. A metric whose preprocessing starts with a fixed resize declares it (the protocol below), and
that very resize runs ahead of the metric (in the workers on a CPU; on the GPU in the main process, the workers
passing uint8 pixels), so images of any size arrive equal-sized and batches are full; other metrics get
native-resolution images and batches of equal-size images. A failing batch is retried image by image, so one
bad image only costs its own score, and every failure is recorded with the image's name.

Results: rows go to the ``csv_path`` file as batches finish (flushed), so a killed run loses only the batches in
flight; ``resume`` keeps the rows of an earlier run and scores the rest. Under ``torchrun`` the images are split
over the ranks (:mod:`pyiqa_grmp.distributed`) and rank 0 writes the one CSV a single process would.

Fixed-resize protocol: the arch of a pyiqa ``InferenceModel`` (its ``.net``) may have an attribute named
:data:`FIXED_RESIZE_ATTRIBUTE` holding a picklable callable, or None. The callable maps a float32 (N, 3, H, W)
batch in [0, 1] to (N, 3, h, w) with h, w fixed, and must be the first step of the arch's own preprocessing, which
must leave an input of that size unresized, so that scoring a pre-resized image is the same computation as scoring
the original. Only no-reference metrics are resized ahead; the metric's input range check is skipped for those
inputs (bicubic overshoot may leave [0, 1]; the decoded image itself is always in range).

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

import csv
import io
import math
import os
import re
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import distributed
from .checkpointing import atomic_write
from .data.image_io import (ImageReadError, NotARegularFileError, decode_image, file_kind, list_images,
                             open_regular_file, printable, unit_float)
from .errors import InvalidArgument

#: Pixels (per channel) of native-resolution images held before a chunk is scored, whatever the batch size.
MAX_CHUNK_PIXELS = 48_000_000
#: Attribute of a metric's arch declaring its fixed input resize (see the module docstring).
FIXED_RESIZE_ATTRIBUTE = 'fixed_input_resize'
#: A ``-t`` file with this extension lists image paths, one per line.
IMAGE_LIST_EXTENSIONS = ('.txt',)
#: At most this many decoding workers by default (a GPU rarely needs more to stay busy).
MAX_DEFAULT_WORKERS = 16
#: A path in a score CSV starting with this is written escaped (see the module docstring).
ESCAPED_PATH_PREFIX = 'fsbytes:'
#: The longest field (characters) a score CSV read back may hold; a longer one means it is not a score CSV.
MAX_CSV_FIELD = 1 << 24


@dataclass
class ScoreReport:
    """Scores of every metric on every image, and every failure with its reason."""

    images: List[str]
    refs: Dict[str, str]
    metrics: List[str]
    scores: Dict[str, Dict[str, float]] = field(default_factory=dict)  # image -> metric -> score
    errors: List[Tuple[str, str, str]] = field(default_factory=list)  # (metric or '*', image or '*', reason)

    def add_error(self, metric: str, image: str, reason: str) -> None:
        self.errors.append((metric, image, reason))

    def summary(self) -> List[Tuple[str, float, int, int]]:
        """(metric, mean score, images scored, images failed) per metric."""
        rows = []
        for metric in self.metrics:
            values = [s[metric] for s in self.scores.values() if metric in s]
            failed = len(self.images) - len(values)
            mean = sum(values) / len(values) if values else math.nan
            rows.append((metric, mean, len(values), failed))
        return rows


@dataclass
class ImageResult:
    """What scoring one image gave: its scores per metric and its failures as (metric or '*', reason)."""

    index: int
    path: str
    scores: Dict[str, float] = field(default_factory=dict)
    errors: List[Tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- the images
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


def _pair_references(targets: List[str], target_root: str, ref_path: str, report: ScoreReport) -> List[str]:
    """Match each target with a reference: the same file, or the same relative path / file name in a folder."""
    if os.path.exists(ref_path) and not os.path.isdir(ref_path):
        for target in targets:
            report.refs[target] = ref_path
        return targets
    refs = _collect(ref_path, 'reference')
    by_relative = {os.path.relpath(r, ref_path): r for r in refs}
    by_name: Dict[str, List[str]] = {}
    for r in refs:
        by_name.setdefault(os.path.basename(r), []).append(r)
    paired = []
    for target in targets:
        relative = os.path.relpath(target, target_root) if os.path.isdir(target_root) else os.path.basename(target)
        match = by_relative.get(relative)
        candidates = by_name.get(os.path.basename(target), [])
        if match is None and len(candidates) == 1:
            match = candidates[0]
        if match is None:
            report.add_error('*', target, f'no reference image with the same name in {printable(ref_path)}')
        else:
            report.refs[target] = match
            paired.append(target)
    return paired


# ---------------------------------------------------------------------------------------------- the metrics
def create_metrics(names: Sequence[str], options: Dict[str, Dict[str, object]], device: Optional[str],
                   report: ScoreReport, missing_references: Optional[str] = None,
                   pyiqa_name: Callable[[str], str] = lambda name: name) -> Dict[str, object]:
    """Create every metric that can be; each one that cannot is recorded in ``report`` with the reason.

    ``missing_references`` (when the data has none) is the reason recorded for full-reference metrics;
    ``pyiqa_name`` maps a row name (e.g. ``NAME@TAG``) to the name pyiqa knows.
    """
    import pyiqa

    from .trusted_loading import trusted_loading

    metrics: Dict[str, object] = OrderedDict()
    for name in names:
        try:
            with trusted_loading(options.get(name, {})):
                metric = pyiqa.create_metric(pyiqa_name(name), device=device, **options.get(name, {}))
        except Exception as error:
            report.add_error(name, '*', f'cannot create metric: {type(error).__name__}: {error}')
            continue
        if metric.metric_mode == 'FR' and missing_references:
            report.add_error(name, '*', missing_references)
            continue
        metrics[name] = metric
    return metrics


def declared_resize(metric: object) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The fixed input resize a no-reference metric's arch declares (see the module docstring), or None."""
    if getattr(metric, 'metric_mode', None) != 'NR':
        return None
    resize = getattr(getattr(metric, 'net', None), FIXED_RESIZE_ATTRIBUTE, None)
    return resize if callable(resize) else None


def default_workers() -> int:
    """Decoding workers for this process: the CPUs it may use, shared with the other ranks of its machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // ranks_here))


# ------------------------------------------------------------------------------------------ decoding workers
class DecodedImages(torch.utils.data.Dataset):
    """Decoded images (and references) as dicts, one per index; runs in the DataLoader's workers.

    An item holds ``index``, ``path``, ``error`` (why the image or its reference cannot be read, else None),
    ``native`` (the image), ``reference`` and ``views`` (see :func:`finish_item`). With ``finish_in_worker`` the
    worker also runs :func:`finish_item`; without it the item keeps the images as decoded (uint8 for 8-bit files)
    and ``views`` empty, for the main process to finish.
    """

    def __init__(self, paths: Sequence[str], references: Optional[Sequence[str]] = None,
                 resizes: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (), keep_native: bool = True,
                 first_index: Sequence[int] = (), finish_in_worker: bool = True) -> None:
        self.paths = list(paths)
        self.references = list(references) if references is not None else None
        self.resizes = list(resizes)
        self.keep_native = keep_native
        self.indices = list(first_index) or list(range(len(self.paths)))
        self.finish_in_worker = finish_in_worker

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> dict:
        path = self.paths[position]
        item = {'index': self.indices[position], 'path': path, 'error': None, 'native': None, 'reference': None,
                'views': []}
        try:
            shared = torch.utils.data.get_worker_info() is not None  # passed to the main process: no extra copy
            item['native'] = decode_image(path, shared)
            if self.references is not None:
                try:
                    item['reference'] = decode_image(self.references[position], shared)
                except ImageReadError as error:
                    raise ImageReadError(f'reference of {path}: {error}') from error
        except ImageReadError as error:
            item.update(error=str(error), native=None, reference=None)
            return item
        if self.finish_in_worker:
            finish_item(item, self.resizes, self.keep_native)
        return item


def finish_item(item: dict, resizes: Sequence[Callable[[torch.Tensor], torch.Tensor]], keep_native: bool,
                device: Optional[torch.device] = None) -> None:
    """Make a decoded item what the metrics take, in place (on ``device`` when given, else where it is).

    ``native`` and ``reference`` become float32 in [0, 1] (``native`` is dropped unless ``keep_native``), and
    ``views`` holds, per callable of ``resizes``, the resized image (a (3, h, w) tensor) or the reason the
    resize failed (a string), so that a failure is reported per metric and never raised.
    """
    if item['error'] is not None:
        return
    image = unit_float(_moved(item['native'], device))
    if item['reference'] is not None:
        item['reference'] = unit_float(_moved(item['reference'], device))
    views: List[object] = []
    for resize in resizes:
        try:
            views.append(resize(image.unsqueeze(0))[0])
        except Exception as error:
            views.append(f'{type(error).__name__}: {error}')
    item['views'] = views
    item['native'] = image if keep_native else None


def _moved(tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return tensor if device is None else tensor.to(device, non_blocking=True)


def _as_is(item: dict) -> dict:
    return item


def decoding_loader(dataset: DecodedImages, workers: int, pin_memory: bool = False,
                    in_flight: int = 0) -> torch.utils.data.DataLoader:
    """The items of ``dataset`` in order, one by one, decoded by ``workers`` processes (0: this process).

    The workers keep about ``in_flight`` items (at least two each) decoded ahead, so that they go on decoding
    while the metrics run on a whole batch.
    """
    prefetch = max(2, math.ceil(in_flight / workers)) if workers else None
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       collate_fn=_as_is, pin_memory=pin_memory, prefetch_factor=prefetch)


def prepared_items(paths: Sequence[str], resizes: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                   keep_native: bool, workers: int, references: Optional[Sequence[str]] = None,
                   indices: Sequence[int] = (), finish_on: Optional[torch.device] = None,
                   in_flight: int = 0) -> Iterator[dict]:
    """The items of ``paths`` in order, decoded by ``workers`` processes (about ``in_flight`` ahead) and finished
    (:func:`finish_item`).

    Without ``finish_on`` the workers finish them too. With it they only decode, and this process finishes each
    item on that device: for a GPU, the workers then pass uint8 pixels (4x fewer bytes, through pinned memory)
    and the float conversion and resize of a large photo take microseconds there instead of most of a
    worker's time on a CPU. The computation is the one the metric itself runs on that device.
    """
    dataset = DecodedImages(paths, references, resizes, keep_native, indices, finish_in_worker=finish_on is None)
    pin = finish_on is not None and finish_on.type == 'cuda'
    for item in decoding_loader(dataset, workers, pin_memory=pin, in_flight=in_flight):
        if finish_on is not None:
            finish_item(item, resizes, keep_native, finish_on)
        yield item


def metric_device(metric: object) -> torch.device:
    """The device a pyiqa metric computes on."""
    parameter = getattr(metric, 'dummy_param', None)
    if isinstance(parameter, torch.Tensor):
        return parameter.device
    return torch.device(getattr(metric, 'device', None) or 'cpu')


def shared_gpu(metrics: Dict[str, object]) -> Optional[torch.device]:
    """The CUDA device all ``metrics`` compute on, if they share one (images are then finished there), else None."""
    devices = {metric_device(metric) for metric in metrics.values()}
    if len(devices) == 1:
        device = devices.pop()
        if device.type == 'cuda':
            return device
    return None


def _as_scores(output: object, count: int) -> List[float]:
    if isinstance(output, (tuple, list)):
        output = output[0]
    values = torch.as_tensor(output).detach().float().cpu().reshape(-1).tolist()
    if len(values) != count:
        raise RuntimeError(f'metric returned {len(values)} values for {count} images')
    return values


@contextmanager
def _input_range_unchecked(metric: object) -> Iterator[None]:
    """pyiqa's range check would reject the bicubic overshoot of a pre-resized input; the original passed it."""
    saved = getattr(metric, 'check_input_range', None)
    if saved is not None:
        metric.check_input_range = False
    try:
        yield
    finally:
        if saved is not None:
            metric.check_input_range = saved


def _score_group(name: str, metric, items: List[dict], view: Optional[int], results: Dict[int, ImageResult]) -> None:
    """Score ``items`` together (their tensors have equal sizes), then one by one if the batch fails."""
    def run(batch: List[dict]) -> List[float]:
        if view is not None:
            with _input_range_unchecked(metric):
                return _as_scores(metric(torch.stack([i['views'][view] for i in batch])), len(batch))
        target = torch.stack([i['native'] for i in batch])
        if metric.metric_mode == 'FR':
            return _as_scores(metric(target, torch.stack([i['reference'] for i in batch])), len(batch))
        return _as_scores(metric(target), len(batch))

    try:
        scored = [(items, run(items))]
    except Exception:
        scored = []
        for item in items:
            try:
                scored.append(([item], run([item])))
            except Exception as error:
                results[item['index']].errors.append((name, f'{type(error).__name__}: {error}'))
    for batch, values in scored:
        for item, value in zip(batch, values):
            results[item['index']].scores[name] = value


def _score_chunk(items: List[dict], metrics: Dict[str, object], views: Dict[str, Optional[int]]) -> List[ImageResult]:
    """Every metric on every readable image of ``items``: resized views all together, native images by size."""
    results = OrderedDict((i['index'], ImageResult(i['index'], i['path'])) for i in items)
    for item in items:
        if item['error'] is not None:
            results[item['index']].errors.append(('*', item['error']))
    readable = [i for i in items if i['error'] is None]
    for name, metric in metrics.items():
        view = views[name]
        if view is None:
            groups: Dict[tuple, List[dict]] = OrderedDict()
            for item in readable:
                reference = item['reference']
                key = (tuple(item['native'].shape), None if reference is None else tuple(reference.shape))
                groups.setdefault(key, []).append(item)
            batches = list(groups.values())
        else:
            batches = [[i for i in readable if torch.is_tensor(i['views'][view])]]
            for item in readable:
                if not torch.is_tensor(item['views'][view]):
                    results[item['index']].errors.append((name, f'resize failed: {item["views"][view]}'))
        for batch in batches:
            if batch:
                _score_group(name, metric, batch, view, results)
    return list(results.values())


def score_stream(paths: Sequence[str], metrics: Dict[str, object], batch_size: int, workers: int = 0,
                 references: Optional[Sequence[str]] = None, indices: Sequence[int] = ()
                 ) -> Iterator[List[ImageResult]]:
    """Score ``paths`` with every metric, yielding the results of each chunk in path order as it finishes.

    Decoding runs in ``workers`` DataLoader processes (0: in this process); the float conversion and the declared
    resizes run there too, or, when the metrics share a GPU, on it in this process (:func:`prepared_items`). A
    chunk holds at most ``batch_size`` images and, of native-resolution ones, about ``MAX_CHUNK_PIXELS`` pixels,
    so memory stays bounded whatever the image sizes. ``indices`` (default 0, 1, ...) number the results.
    """
    resizes: List[Callable] = []
    views: Dict[str, Optional[int]] = {}
    for name, metric in metrics.items():
        resize = declared_resize(metric)
        if resize is not None and resize not in resizes:
            resizes.append(resize)
        views[name] = None if resize is None else resizes.index(resize)
    keep_native = any(v is None for v in views.values())
    chunk: List[dict] = []
    pixels = 0
    items = prepared_items(paths, resizes, keep_native, workers, references, indices, shared_gpu(metrics),
                           in_flight=batch_size)
    for item in items:
        chunk.append(item)
        pixels += item['native'][0].numel() if item['native'] is not None else 0
        if len(chunk) == batch_size or pixels >= MAX_CHUNK_PIXELS:
            yield _score_chunk(chunk, metrics, views)
            chunk, pixels = [], 0
    if chunk:
        yield _score_chunk(chunk, metrics, views)


def _progress_bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, unit='img', file=sys.stderr)


def score_paths(paths: Sequence[str], metrics: Dict[str, object], report: ScoreReport, batch_size: int,
                progress: bool = True, reference_of: Optional[Callable[[int, str], str]] = None,
                desc: str = 'scoring', workers: int = 0) -> None:
    """Score ``paths`` with every metric into ``report`` (scores and failures), in one process; see
    :func:`score_stream`. ``reference_of(index, path)`` names each image's reference for full-reference metrics."""
    references = [reference_of(i, p) for i, p in enumerate(paths)] if reference_of is not None else None
    with _progress_bar(len(paths), progress, desc) as bar:
        for results in score_stream(paths, metrics, batch_size, workers, references):
            for result in results:
                if result.scores:
                    report.scores.setdefault(result.path, {}).update(result.scores)
                for metric, reason in result.errors:
                    report.add_error(metric, result.path, reason)
            bar.update(len(results))


# -------------------------------------------------------------------------------------------------- CSV rows
def csv_header(metrics: Sequence[str]) -> List[str]:
    """The columns of a score CSV."""
    return ['image', 'reference', *metrics, 'errors']


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


def _one_line(text: str) -> str:
    return printable(text.replace('\r', ' ').replace('\n', ' '))


def _reason_text(metric: str, reason: str) -> str:
    return _one_line(reason if metric == '*' else f'{metric}: {reason}')


def _row(image: str, reference: str, scores: Dict[str, float], metrics: Sequence[str],
         reasons: Sequence[Tuple[str, str]]) -> List[str]:
    return [encode_path(image), encode_path(reference) if reference else '',
            *[f'{scores[m]:.6g}' if m in scores else '' for m in metrics],
            ' | '.join(_reason_text(m, r) for m, r in reasons)]


def write_csv(report: ScoreReport, path: str) -> None:
    """One row per image: its scores per metric and the reasons of any failure (written atomically)."""
    rows = []
    for image in report.images:
        reasons = [(m, r) for m, i, r in report.errors if i in (image, '*')]
        rows.append(_row(image, report.refs.get(image, ''), report.scores.get(image, {}), report.metrics, reasons))
    _write_atomically(path, csv_header(report.metrics), rows)


def _write_atomically(path: str, header: List[str], rows: Sequence[List[str]]) -> None:
    """The CSV written whole, atomically (see :func:`pyiqa_grmp.checkpointing.atomic_write`)."""
    data = _csv_bytes([header, *rows])
    atomic_write(path, lambda handle: handle.write(data))


def part_file(csv_path: str, rank: int) -> str:
    """Where rank ``rank`` (> 0) of a parallel run appends its rows; rank 0 appends to ``csv_path`` itself."""
    return csv_path if rank == 0 else f'{csv_path}.part{rank}'


def existing_part_files(csv_path: str) -> List[str]:
    """Part files of earlier runs next to ``csv_path``."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    pattern = re.compile(re.escape(os.path.basename(csv_path)) + r'\.part[0-9]+$')
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if pattern.match(name))


def _complete_rows(path: str) -> bytes:
    """The bytes of a score CSV up to its last complete line (a killed run may leave half a row)."""
    try:
        with open_regular_file(path) as handle:
            data = handle.read()
    except NotARegularFileError as error:
        raise ValueError(f'the score CSV {error}') from error
    except OSError as error:
        raise ValueError(f'cannot read the score CSV {printable(path)}: {error.strerror or error}') from error
    return data[:data.rfind(b'\n') + 1]


def read_rows(path: str, header: List[str]) -> Dict[str, List[str]]:
    """The complete rows of a score CSV or part file, as written, by the image they name (:func:`decode_path`).

    A file written for other columns, or that is not a score CSV (not UTF-8, NUL bytes, fields that are not
    CSV or too long, scores that are not numbers, bad path escapes), is a ValueError naming the file and line.
    """
    data = _complete_rows(path)
    name = printable(path)
    refusal = 'it is not a score CSV written by this command: give another --csv, or drop --resume to overwrite it'
    if b'\x00' in data:
        raise ValueError(f'{name} line {_line_at(data, data.index(0))} holds a NUL byte: {refusal}')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as error:
        raise ValueError(f'{name} line {_line_at(data, error.start)} is not UTF-8 text: {refusal}') from error
    reader = csv.reader(io.StringIO(text, newline=''), strict=True)
    limit = csv.field_size_limit(MAX_CSV_FIELD)
    try:
        table = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise ValueError(f'{name} line {reader.line_num}: {error}: {refusal}') from error
    finally:
        csv.field_size_limit(limit)
    if not table:
        return {}
    if table[0][1] != header:
        found = table[0][1][2:-1] if table[0][1][:2] == ['image', 'reference'] else table[0][1]
        raise ValueError(f'{name} was written for the metrics {found}, not {header[2:-1]}: give another --csv, or '
                         'drop --resume to overwrite it')
    rows: Dict[str, List[str]] = {}
    for number, row in table[1:]:
        if len(row) != len(header):
            raise ValueError(f'{name} line {number} has {len(row)} fields instead of {len(header)}: it is not a score '
                             'CSV of these metrics')
        for metric, value in zip(header[2:-1], row[2:-1]):
            try:
                float(value or 0)
            except ValueError:
                raise ValueError(f'{name} line {number}: the {metric} score {printable(value[:40])!r} is not a '
                                 f'number: {refusal}') from None
        try:
            image = decode_path(row[0])
            decode_path(row[1])
        except ValueError as error:
            raise ValueError(f'{name} line {number}: {printable(str(error))}: {refusal}') from None
        rows.setdefault(image, row)
    return rows


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b'\n', 0, offset) + 1


def _csv_bytes(rows: Sequence[List[str]]) -> bytes:
    text = io.StringIO(newline='')
    csv.writer(text).writerows(rows)
    return text.getvalue().encode('utf-8')


class RowLog:
    """Rows appended to a CSV file and flushed as they come, after the header; resumes after the last full row.

    The file is never written through a symbolic link: a link at ``path`` is replaced by a regular file (that
    holds the rows of the link's file when resuming), and the link's target is left as it was.
    """

    def __init__(self, path: str, header: List[str], resume: bool) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keep = _complete_rows(path) if resume and os.path.exists(path) else b''
        if not keep or os.path.islink(path):
            start = keep or _csv_bytes([header])
            atomic_write(path, lambda handle: handle.write(start))
            keep = start
        try:  # a link or a FIFO put there meanwhile is refused, not followed or waited on
            descriptor = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ValueError(f'cannot write the score CSV {printable(path)}: {error.strerror}') from error
        kind = file_kind(os.fstat(descriptor).st_mode)
        if kind != 'regular file':
            os.close(descriptor)
            raise ValueError(f'cannot write the score CSV {printable(path)}: it is a {kind}')
        os.set_blocking(descriptor, True)
        self.handle = os.fdopen(descriptor, 'w', newline='', encoding='utf-8')
        self.handle.truncate(len(keep))
        self.handle.seek(len(keep))
        self.writer = csv.writer(self.handle)

    def append(self, rows: Sequence[List[str]]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# ------------------------------------------------------------------------------------------- a whole collection
@dataclass
class _Plan:
    """What rank 0 decided before scoring: the images, their references, the rows kept, what is left to score."""

    images: List[str]
    refs: Dict[str, str]
    pairing_errors: Dict[str, str]
    kept: Dict[str, List[str]]
    todo: List[Tuple[int, str, Optional[str]]]


def _plan(target: str, ref: Optional[str], header: List[str], csv_path: Optional[str], resume: bool) -> _Plan:
    if csv_path and os.path.lexists(csv_path) and not os.path.islink(csv_path):
        kind = file_kind(os.lstat(csv_path).st_mode)
        if kind != 'regular file':
            raise ValueError(f'--csv {printable(csv_path)} is a {kind}, not a regular file: give another --csv')
    images = collect_targets(target)
    pairing = ScoreReport(images=images, refs={}, metrics=[])
    if ref:
        root = target if os.path.isdir(target) else os.path.dirname(target)
        _pair_references(images, root, ref, pairing)
    pairing_errors = {image: reason for _, image, reason in pairing.errors}
    kept: Dict[str, List[str]] = {}
    if csv_path and resume:
        for path in [csv_path, *existing_part_files(csv_path)]:
            if os.path.exists(path):
                for image, row in read_rows(path, header).items():
                    kept.setdefault(image, row)
        _check_kept_rows(kept, set(images), pairing.refs, csv_path)
    elif csv_path:
        for path in existing_part_files(csv_path):
            os.remove(path)
    todo = [(index, image, pairing.refs.get(image)) for index, image in enumerate(images)
            if image not in kept and image not in pairing_errors]
    return _Plan(images, pairing.refs, pairing_errors, kept, todo)


def _check_kept_rows(kept: Dict[str, List[str]], images: set, refs: Dict[str, str], csv_path: str) -> None:
    strangers = [image for image in kept if image not in images]
    if strangers:
        raise ValueError(f'{printable(csv_path)} (or its part files) has rows for {len(strangers)} images that are '
                         f'not in this target, e.g. {printable(strangers[0])}: it was written for another target; '
                         'give another --csv, or drop --resume to overwrite it')
    for image, row in kept.items():
        if decode_path(row[1]) != refs.get(image, ''):
            raise ValueError(f'{printable(csv_path)}: {printable(image)} was scored against the reference '
                             f'{printable(row[1])!r}, this run pairs it with {printable(refs.get(image, ""))!r}; give '
                             'another --csv, or drop --resume to overwrite it')


def _parse_kept(row: List[str], metrics: Sequence[str], creation: set) -> Tuple[Dict[str, float], list]:
    """Scores and failures of a kept row, for the report (the row itself is written back unchanged)."""
    scores = {m: float(v) for m, v in zip(metrics, row[2:-1]) if v != ''}
    errors = []
    for reason in row[-1].split(' | ') if row[-1] else []:
        if reason in creation:
            continue
        metric = next((m for m in metrics if reason.startswith(f'{m}: ')), '*')
        errors.append((metric, reason[len(metric) + 2:] if metric != '*' else reason))
    return scores, errors


def score_images(metric_names: Sequence[str], target: str, ref: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True,
                 metric_options: Optional[Dict[str, Dict[str, object]]] = None, workers: int = 0,
                 csv_path: Optional[str] = None, resume: bool = False,
                 metrics: Optional[Dict[str, object]] = None) -> ScoreReport:
    """Score every image of ``target`` (folder, ``.txt`` list or file) with every metric; failures are recorded,
    never raised or skipped.

    With ``csv_path`` rows are written as batches finish and the file is rewritten at the end in image order
    (atomically); ``resume`` keeps the rows already there (and in part files) and scores only the missing images.
    In a process group (torchrun) the images are split over the ranks; rank 0 gets the report of every image
    and writes the CSV, the other ranks get a report of their share only. ``metrics`` (created metrics by name,
    ``metric_names`` in order) are used instead of creating them, e.g. to time the scoring alone.
    """
    metric_names = list(metric_names)
    metric_options = metric_options or {}
    unknown = sorted(set(metric_options) - set(metric_names))
    if unknown:
        raise InvalidArgument('metric_options', f'names metrics that are not scored: {unknown}')
    if resume and not csv_path:
        raise ValueError('resume needs the CSV file of the earlier run')
    header = csv_header(metric_names)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    plan, failure = None, None
    if rank == 0:
        try:
            plan = _plan(target, ref, header, csv_path, resume)
        except (ValueError, FileNotFoundError) as error:
            failure = error
    plan, failure = distributed.broadcast_object((plan, failure))
    if failure is not None:
        raise failure

    report = ScoreReport(images=plan.images, refs=plan.refs, metrics=metric_names)
    if metrics is None:
        no_references = None if ref else 'full-reference metric: give reference images with -r'
        metrics = create_metrics(metric_names, metric_options, device, report, missing_references=no_references)
    creation_errors = [(metric, reason) for metric, _, reason in report.errors]
    mine = distributed.shard(plan.todo, rank, world_size)
    log = RowLog(part_file(csv_path, rank), header, resume) if csv_path else None
    results: List[ImageResult] = []
    try:
        with _progress_bar(len(mine), progress and rank == 0, 'scoring') as bar:
            if log is not None and rank == 0:
                log.append([_row(image, '', {}, metric_names, [('*', reason)] + creation_errors)
                            for image, reason in plan.pairing_errors.items() if image not in plan.kept])
            stream = score_stream([p for _, p, _ in mine], metrics, batch_size, workers,
                                  [r for _, _, r in mine] if ref else None, [i for i, _, _ in mine])
            for chunk in stream:
                if log is not None:
                    log.append([_row(r.path, plan.refs.get(r.path, ''), r.scores, metric_names,
                                     creation_errors + r.errors) for r in chunk])
                results.extend(chunk)
                bar.update(len(chunk))
    finally:
        if log is not None:
            log.close()
    gathered = distributed.gather_objects((creation_errors, results))
    if rank != 0:
        report.images = [p for _, p, _ in mine]
        _add_results(report, results)
        return report
    _merge_report(report, plan, gathered)
    if csv_path:
        _write_final_csv(csv_path, header, plan, gathered)
    return report


def _add_results(report: ScoreReport, results: Sequence[ImageResult]) -> None:
    for result in results:
        if result.scores:
            report.scores[result.path] = dict(result.scores)
        for metric, reason in result.errors:
            report.add_error(metric, result.path, reason)


def _merge_report(report: ScoreReport, plan: _Plan, gathered: list) -> None:
    """Rank 0's report of the whole collection: each failure once, in image order after the setup failures."""
    creation = [(metric, reason) for errors, _ in gathered for metric, reason in errors]
    creation = list(OrderedDict.fromkeys(creation))
    report.errors = [('*', image, reason) for image, reason in plan.pairing_errors.items()]
    report.errors += [(metric, '*', reason) for metric, reason in creation]
    creation_texts = {_reason_text(m, r) for m, r in creation}
    new = {r.index: r for _, results in gathered for r in results}
    for index, image in enumerate(plan.images):
        if index in new:
            _add_results(report, [new[index]])
        elif image in plan.kept:
            scores, errors = _parse_kept(plan.kept[image], report.metrics, creation_texts)
            if scores:
                report.scores[image] = scores
            report.errors += [(metric, image, reason) for metric, reason in errors
                              if image not in plan.pairing_errors]


def _write_final_csv(csv_path: str, header: List[str], plan: _Plan, gathered: list) -> None:
    """The CSV in image order: kept rows as they were, new rows with the creation failures of their rank."""
    metrics = header[2:-1]
    new = {r.index: (errors, r) for errors, results in gathered for r in results}
    pairing_creation = gathered[0][0]
    rows = []
    for index, image in enumerate(plan.images):
        if image in plan.kept:
            rows.append(plan.kept[image])
        elif image in plan.pairing_errors:
            rows.append(_row(image, '', {}, metrics, [('*', plan.pairing_errors[image])] + pairing_creation))
        elif index in new:
            creation, result = new[index]
            rows.append(_row(image, plan.refs.get(image, ''), result.scores, metrics, creation + result.errors))
        else:
            raise RuntimeError(f'internal error: no row for {printable(image)}')
    _write_atomically(csv_path, header, rows)
    for path in existing_part_files(csv_path):
        os.remove(path)


def failure_text(report: ScoreReport, image: str) -> str:
    """The ``errors`` cell of ``image`` in a score CSV: its failures and those of metrics that could not be created."""
    return ' | '.join(_reason_text(metric, reason) for metric, where, reason in report.errors if where in (image, '*'))

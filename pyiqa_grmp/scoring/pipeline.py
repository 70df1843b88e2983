"""The scoring pipeline: images decoded in DataLoader workers, the declared fixed resize run ahead, full batches.

Images are decoded in ``workers`` processes of a ``torch.utils.data.DataLoader`` (one thread each) while the main
process runs the metrics. A metric whose preprocessing starts with a fixed resize declares it (the protocol below),
and that very resize runs ahead of the metric, so images of any size arrive equal-sized and batches are full;
other metrics get native-resolution images and batches of equal-size images. A failing batch is retried image by
image, so one bad image only costs its own score, and every failure is recorded with the image's name.

When every metric declares a fixed resize (GRMP-IQA alone, say), the workers decode, resize and collate whole
batches (:func:`batched_items`): only one (N, 3, h, w) float tensor per batch crosses to the main process (pinned
once, and copied to the GPU in one transfer), never a full-size image. With ``decode='gpu'`` the workers read the
files' bytes instead and the main process decodes the JPEGs on the GPU in batches (:mod:`.gpu_decode`), the
others being decoded in the workers. Otherwise (native-resolution metrics, references) items travel one by one
(:func:`prepared_items`), as decoded uint8 when the metrics share a GPU, which finishes them.

Fixed-resize protocol: the arch of a pyiqa ``InferenceModel`` (its ``.net``) may have an attribute named
:data:`FIXED_RESIZE_ATTRIBUTE` holding a picklable callable, or None. The callable maps a float32 (N, 3, H, W)
batch in [0, 1] to (N, 3, h, w) with h, w fixed, and must be the first step of the arch's own preprocessing, which
must leave an input of that size unresized, so that scoring a pre-resized image is the same computation as scoring
the original. It may also have ``resize_decoded(image)``, taking one decoded (3, H, W) image (uint8, or float in
[0, 1]) to float32 (3, h, w), equal to the callable on ``unit_float(image)`` within 1e-6 and cheaper on a CPU
(:meth:`pyiqa_grmp.data.transforms.SquareResize.resize_decoded`); CPU workers then use it. Only no-reference
metrics are resized ahead; the metric's input range check is skipped for those inputs (bicubic overshoot may leave
[0, 1]; the decoded image itself is always in range).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..cpu_memory import keep_freed_memory
from ..data.image_io import ImageReadError, decode_image_bytes, unit_float
from ..errors import InvalidArgument
from .collect import ImageSource, as_source, encoded_bytes
from .gpu_decode import Decoder, decode_jpegs, gpu_plan, orient, torchvision_decoder
from .results import Failure, ImageResult, ScoreReport

#: Pixels (per channel) of native-resolution images held before a chunk is scored, whatever the batch size.
MAX_CHUNK_PIXELS = 48_000_000
#: Attribute of a metric's arch declaring its fixed input resize (see the module docstring).
FIXED_RESIZE_ATTRIBUTE = 'fixed_input_resize'
#: At most this many decoding workers by default (a GPU rarely needs more to stay busy).
MAX_DEFAULT_WORKERS = 16
#: ``decode``: in the workers (exact), JPEGs on the GPU, or the GPU when the run allows it (see :func:`decode_mode`).
DECODE_MODES = ('cpu', 'gpu', 'auto')
#: With ``decode='gpu'``, files of more bytes than this are decoded on the CPU (streamed, not read whole).
MAX_ENCODED_BYTES = 256 * 2**20

Resize = Callable[[torch.Tensor], torch.Tensor]


def declared_resize(metric: object) -> Optional[Resize]:
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
@dataclass
class DecodedItem:
    """One image as the pipeline carries it from the decoding workers to the metrics.

    ``error`` says why the image or its reference cannot be read (else None); ``native`` is the image and
    ``reference`` its reference, as decoded (uint8 for 8-bit files) until :func:`finish_item` makes them float32
    in [0, 1]; ``views`` holds the declared resizes' results (see :func:`finish_item`; in a :class:`DecodedBatch`
    a result is the row number in the batch's stacked tensor); ``size`` is the decoded image's (width, height),
    as oriented. With GPU decoding, ``encoded`` holds the JPEG's bytes left for the main process to decode (in a
    batch: ``span``, their start and length in the batch's bytes) and ``orientation`` its EXIF orientation.
    """

    index: int
    path: str
    error: Optional[str] = None
    native: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    views: List[object] = field(default_factory=list)
    encoded: Optional[torch.Tensor] = None
    orientation: int = 1
    span: Optional[Tuple[int, int]] = None
    size: Optional[Tuple[int, int]] = None

    def pin_memory(self) -> 'DecodedItem':
        """This item with its tensors in pinned memory (a DataLoader with ``pin_memory=True`` calls it)."""
        return dataclasses.replace(self, native=_pinned(self.native), reference=_pinned(self.reference),
                                   views=[_pinned(v) if torch.is_tensor(v) else v for v in self.views])


def _size_of(image: torch.Tensor) -> Tuple[int, int]:
    """(width, height) of a (C, H, W) image."""
    return int(image.shape[-1]), int(image.shape[-2])


def _pinned(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.pin_memory() if tensor is not None else None


class DecodedImages(torch.utils.data.Dataset):
    """Decoded images (and references), one :class:`DecodedItem` per index; runs in the DataLoader's workers.

    Images are :class:`~pyiqa_grmp.scoring.collect.ImageSource` (a path names a file). With ``finish_in_worker``
    the worker also runs :func:`finish_item`; without it the item keeps the images as decoded and ``views``
    empty, for the main process to finish. With ``gpu_jpegs`` the worker reads each image's bytes, and those of
    a JPEG the GPU decodes (:func:`~pyiqa_grmp.scoring.gpu_decode.gpu_plan`) travel encoded, unfinished; the
    others are decoded here from the bytes read.
    """

    def __init__(self, paths: Sequence[Union[str, ImageSource]],
                 references: Optional[Sequence[Union[str, ImageSource]]] = None,
                 resizes: Sequence[Resize] = (), keep_native: bool = True,
                 first_index: Sequence[int] = (), finish_in_worker: bool = True, gpu_jpegs: bool = False) -> None:
        self.sources = [as_source(p) for p in paths]
        self.references = [as_source(r) for r in references] if references is not None else None
        self.resizes = list(resizes)
        self.keep_native = keep_native
        self.indices = list(first_index) or list(range(len(self.sources)))
        self.finish_in_worker = finish_in_worker
        self.gpu_jpegs = gpu_jpegs

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> DecodedItem:
        source = self.sources[position]
        item = DecodedItem(self.indices[position], source.key)
        try:
            # decoded straight into shared memory when it is passed to the main process as it is: no extra copy
            passed = self.keep_native or not self.finish_in_worker
            shared = passed and torch.utils.data.get_worker_info() is not None
            data = encoded_bytes(source, MAX_ENCODED_BYTES) if self.gpu_jpegs else None
            if data is not None:
                plan = gpu_plan(data)
                if plan.on_gpu:
                    item.encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    item.orientation = plan.orientation
                    return item
                item.native = decode_image_bytes(data, source.key, shared)
            else:
                item.native = source.decode(shared)
            item.size = _size_of(item.native)
            if self.references is not None:
                try:
                    item.reference = self.references[position].decode(shared)
                except ImageReadError as error:
                    raise ImageReadError(f'reference of {source.key}: {error}') from error
        except ImageReadError as error:
            item.error, item.native, item.reference = str(error), None, None
            return item
        if self.finish_in_worker:
            finish_item(item, self.resizes, self.keep_native)
        return item


def finish_item(item: DecodedItem, resizes: Sequence[Resize], keep_native: bool,
                device: Optional[torch.device] = None) -> None:
    """Make a decoded item what the metrics take, in place (on ``device`` when given, else where it is).

    ``native`` and ``reference`` become float32 in [0, 1] (``native`` is dropped unless ``keep_native``), and
    ``views`` holds, per callable of ``resizes``, the resized image (a (3, h, w) tensor) or the reason the
    resize failed (a string), so that a failure is reported per metric and never raised.
    """
    if item.error is not None:
        return
    decoded = _moved(item.native, device)
    image = unit_float(decoded) if keep_native else None
    if item.reference is not None:
        item.reference = unit_float(_moved(item.reference, device))
    item.views = [_view(resize, decoded, image) for resize in resizes]
    item.native = image


def _view(resize: Resize, decoded: torch.Tensor, image: Optional[torch.Tensor] = None) -> object:
    """``resize`` of one decoded image (``image``: it as float, when already made), or why it failed.

    On a CPU a resize's ``resize_decoded`` (see the module docstring) reads the decoded pixels directly."""
    try:
        fast = getattr(resize, 'resize_decoded', None)
        if fast is not None and decoded.device.type == 'cpu':
            return fast(decoded)
        return resize((unit_float(decoded) if image is None else image).unsqueeze(0))[0]
    except Exception as error:
        return f'{type(error).__name__}: {error}'


def _moved(tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return tensor if device is None else tensor.to(device, non_blocking=True)


def _as_is(item: DecodedItem) -> DecodedItem:
    return item


def _decoding_worker(worker_id: int) -> None:
    """Each decoding worker computes on one thread (the workers, not threads within one, use the cores) and
    keeps freed memory for reuse: a 6 MP photo's decoded buffers are 18 MB each, and glibc maps such blocks afresh
    for every image (:mod:`pyiqa_grmp.cpu_memory` has the figures), also where the main process does not."""
    torch.set_num_threads(1)
    keep_freed_memory()


def decoding_loader(dataset: DecodedImages, workers: int, pin_memory: bool = False,
                    in_flight: int = 0, batch_size: Optional[int] = None) -> torch.utils.data.DataLoader:
    """The items of ``dataset`` in order, decoded by ``workers`` processes (0: this process): one by one, or
    with ``batch_size`` collated into :class:`DecodedBatch` es in the workers.

    The workers keep about ``in_flight`` items (at least two each, or two batches each) decoded ahead, so that
    they go on decoding while the metrics run on a whole batch.
    """
    per_load = batch_size or 1
    prefetch = max(2, math.ceil(in_flight / (workers * per_load))) if workers else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_as_is if batch_size is None else collate_batch,
                                       pin_memory=pin_memory, prefetch_factor=prefetch,
                                       worker_init_fn=_decoding_worker if workers else None)


# --------------------------------------------------------------------------------------------- batches of views
@dataclass
class DecodedBatch:
    """Items resized and collated in a worker: each view of each resize stacked into one tensor per resize.

    ``items`` carry no pixels: a view is the row number of the item's resized image in ``pixels[resize]``, or why
    that resize failed (a string); items left for GPU decoding have a ``span`` of ``encoded`` (the batch's JPEG
    bytes in one tensor) until :func:`decode_on_gpu` makes their views.
    """

    items: List[DecodedItem]
    pixels: List[Optional[torch.Tensor]]
    encoded: Optional[torch.Tensor] = None

    def pin_memory(self) -> 'DecodedBatch':
        """This batch with its stacked views in pinned memory (one pinned copy per batch and resize)."""
        return dataclasses.replace(self, pixels=[_pinned(p) for p in self.pixels])


def collate_batch(items: List[DecodedItem]) -> DecodedBatch:
    """Stack the items' views (made by the workers) resize by resize, in item order; the items keep row numbers.

    The JPEG bytes left for the GPU are joined into one tensor, so a batch crosses to the main process in a few
    pieces whatever its size."""
    items = list(items)
    encoded = [i.encoded for i in items if i.encoded is not None]
    start = 0
    for item in items:
        if item.encoded is not None:
            item.span, item.encoded = (start, len(item.encoded)), None
            start += item.span[1]
    return DecodedBatch(items, _restacked(items), torch.cat(encoded) if encoded else None)


def _restacked(items: List[DecodedItem], pixels: Sequence[Optional[torch.Tensor]] = (),
               device: Optional[torch.device] = None) -> List[Optional[torch.Tensor]]:
    """Per resize, the items' views stacked in item order (taking rows of ``pixels`` for views that are row
    numbers, moved to ``device`` when given); each item's view becomes its row number."""
    count = max((len(i.views) for i in items), default=0)
    stacked: List[Optional[torch.Tensor]] = []
    for view in range(count):
        rows = []
        for item in items:
            value = item.views[view] if len(item.views) > view else None
            if isinstance(value, int):
                value = pixels[view][value]
            if torch.is_tensor(value):
                item.views[view] = len(rows)
                rows.append(value if device is None else value.to(device, non_blocking=True))
        stacked.append(torch.stack(rows) if rows else None)
    return stacked


def _encoded_of(batch: DecodedBatch, item: DecodedItem) -> torch.Tensor:
    return batch.encoded.narrow(0, *item.span)


def decode_on_gpu(batch: DecodedBatch, resizes: Sequence[Resize], device: torch.device,
                  decoder: Optional[Decoder] = None) -> DecodedBatch:
    """Decode the batch's JPEGs left encoded (one ``decoder`` call, default nvJPEG on ``device``), orient and
    resize them there, and stack every view on ``device`` in item order.

    An image the decoder refuses even alone is decoded on the CPU here (EXIF orientation by Pillow, the exact
    resize); one that cannot be read at all gets its error, by name, like an unreadable file in a worker.
    """
    pending = [i for i in batch.items if i.span is not None]
    decoder = decoder or torchvision_decoder(device)
    decoded = decode_jpegs([_encoded_of(batch, i) for i in pending], decoder)
    for item, image in zip(pending, decoded):
        if isinstance(image, str):  # nvJPEG refused it: Pillow, as in a worker
            try:
                image = decode_image_bytes(_encoded_of(batch, item).numpy().tobytes(), item.path)
            except ImageReadError as error:
                item.error = str(error)
        else:
            image = orient(image, item.orientation)
        item.span = None
        if item.error is None:
            item.size = _size_of(image)
            item.views = [_view(resize, image) for resize in resizes]
    moved = [None if p is None else p.to(device, non_blocking=True) for p in batch.pixels]  # one copy each
    return DecodedBatch(batch.items, _restacked(batch.items, moved, device))


def batched_items(paths: Sequence[Union[str, ImageSource]], resizes: Sequence[Resize], workers: int,
                  batch_size: int, indices: Sequence[int] = (), device: Optional[torch.device] = None,
                  gpu_jpegs: bool = False, decoder: Optional[Decoder] = None) -> Iterator[DecodedBatch]:
    """The images of ``paths`` in batches of ``batch_size``, in order, resized by ``resizes`` in the workers and
    collated there (:func:`collate_batch`); each batch's views on ``device`` (default: where they are).

    A worker collates a part of a batch when there are too few batches to keep every worker busy; the parts are
    joined here, so batches hold ``batch_size`` images whatever the number of workers. With ``gpu_jpegs`` the
    JPEGs nvJPEG takes are decoded and resized on ``device`` (:func:`decode_on_gpu`; ``decoder`` replaces nvJPEG,
    e.g. torchvision's CPU decoder in tests).
    """
    dataset = DecodedImages(paths, None, resizes, keep_native=False, first_index=indices, gpu_jpegs=gpu_jpegs)
    pin = device is not None and device.type == 'cuda'
    part = max(1, min(batch_size, math.ceil(len(dataset) / (2 * workers)))) if workers else batch_size

    def finished(batch: DecodedBatch) -> DecodedBatch:
        if gpu_jpegs:
            return decode_on_gpu(batch, resizes, device or torch.device('cpu'), decoder)
        if device is not None:
            return DecodedBatch(batch.items, [None if p is None else p.to(device, non_blocking=True)
                                              for p in batch.pixels])
        return batch

    loader = decoding_loader(dataset, workers, pin_memory=pin, in_flight=batch_size, batch_size=part)
    yield from _rechunked((finished(batch) for batch in loader), batch_size)


def _rechunked(batches: Iterator[DecodedBatch], size: int) -> Iterator[DecodedBatch]:
    """``batches`` joined and split into batches of ``size`` items, in order (the last may hold fewer)."""
    pending: List[DecodedBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch.items)
        while count >= size:
            head, tail = _split(_joined(pending), size)
            yield head
            pending, count = ([tail], len(tail.items)) if tail.items else ([], 0)
    if pending:
        yield _joined(pending)


def _joined(batches: List[DecodedBatch]) -> DecodedBatch:
    if len(batches) == 1:
        return batches[0]
    items = [item for batch in batches for item in batch.items]
    pixels = []
    for view in range(max(len(batch.pixels) for batch in batches)):  # none in a part of unreadable images only
        offset, parts = 0, []
        for batch in batches:
            for item in batch.items:
                if len(item.views) > view and isinstance(item.views[view], int):
                    item.views[view] += offset
            stacked = batch.pixels[view] if view < len(batch.pixels) else None
            if stacked is not None:
                parts.append(stacked)
                offset += len(stacked)
        pixels.append(torch.cat(parts) if parts else None)
    return DecodedBatch(items, pixels)


def _split(batch: DecodedBatch, size: int) -> Tuple[DecodedBatch, DecodedBatch]:
    head, tail = batch.items[:size], batch.items[size:]
    head_pixels, tail_pixels = [], []
    for view, stacked in enumerate(batch.pixels):
        rows = sum(1 for item in head if len(item.views) > view and isinstance(item.views[view], int))
        for item in tail:
            if len(item.views) > view and isinstance(item.views[view], int):
                item.views[view] -= rows
        head_pixels.append(None if stacked is None or rows == 0 else stacked[:rows])
        tail_pixels.append(None if stacked is None or rows == len(stacked) else stacked[rows:])
    return DecodedBatch(head, head_pixels), DecodedBatch(tail, tail_pixels)


def prepared_items(paths: Sequence[Union[str, ImageSource]], resizes: Sequence[Resize], keep_native: bool,
                   workers: int, references: Optional[Sequence[Union[str, ImageSource]]] = None,
                   indices: Sequence[int] = (), finish_on: Optional[torch.device] = None,
                   in_flight: int = 0) -> Iterator[DecodedItem]:
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


# ------------------------------------------------------------------------------------------------- batches
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


def _scores_or_failures(run: Callable[[list], List[float]], members: list) -> Tuple[list, Dict[int, str]]:
    """``run`` on all ``members`` together, else on each alone: the (members, scores) pairs, and each failure's
    reason by the member's position."""
    try:
        return [(members, run(members))], {}
    except Exception:
        pass
    scored, failures = [], {}
    for position, member in enumerate(members):
        try:
            scored.append(([member], run([member])))
        except Exception as error:
            failures[position] = f'{type(error).__name__}: {error}'
    return scored, failures


def _score_group(name: str, metric, items: List[DecodedItem], view: Optional[int],
                 results: Dict[int, ImageResult], pixels: Sequence[Optional[torch.Tensor]] = ()) -> None:
    """Score ``items`` together (their tensors have equal sizes), then one by one if the batch fails.

    With ``pixels`` (a :class:`DecodedBatch`'s) the views are rows of ``pixels[view]``: the whole tensor when the
    group is all of it, so that a batch scores as the stack of its views would, bit for bit."""
    def run(batch: List[DecodedItem]) -> List[float]:
        if view is not None:
            with _input_range_unchecked(metric):
                return _as_scores(metric(_view_input(batch, view, pixels)), len(batch))
        target = torch.stack([i.native for i in batch])
        if metric.metric_mode == 'FR':
            return _as_scores(metric(target, torch.stack([i.reference for i in batch])), len(batch))
        return _as_scores(metric(target), len(batch))

    scored, failures = _scores_or_failures(run, items)
    for position, reason in failures.items():
        results[items[position].index].errors.append(Failure(name, items[position].path, reason))
    for batch, values in scored:
        for item, value in zip(batch, values):
            results[item.index].scores[name] = value


def _view_input(batch: List[DecodedItem], view: int, pixels: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    if not pixels:
        return torch.stack([i.views[view] for i in batch])
    rows = [i.views[view] for i in batch]
    stacked = pixels[view]
    return stacked if rows == list(range(len(stacked))) else stacked[rows]


def _has_view(value: object) -> bool:
    return torch.is_tensor(value) or isinstance(value, int)


def _score_chunk(chunk: Union[List[DecodedItem], DecodedBatch], metrics: Dict[str, object],
                 views: Dict[str, Optional[int]]) -> List[ImageResult]:
    """Every metric on every readable image of ``chunk`` (items, or a :class:`DecodedBatch`): resized views all
    together, native images by size."""
    items, pixels = (chunk.items, chunk.pixels) if isinstance(chunk, DecodedBatch) else (chunk, ())
    results = OrderedDict((i.index, ImageResult(i.index, i.path, size=i.size)) for i in items)
    for item in items:
        if item.error is not None:
            results[item.index].errors.append(Failure(None, item.path, item.error))
    readable = [i for i in items if i.error is None]
    for name, metric in metrics.items():
        view = views[name]
        if view is None:
            groups: Dict[tuple, List[DecodedItem]] = OrderedDict()
            for item in readable:
                reference = item.reference
                key = (tuple(item.native.shape), None if reference is None else tuple(reference.shape))
                groups.setdefault(key, []).append(item)
            batches = list(groups.values())
        else:
            batches = [[i for i in readable if _has_view(i.views[view])]]
            for item in readable:
                if not _has_view(item.views[view]):
                    results[item.index].errors.append(Failure(name, item.path,
                                                              f'resize failed: {item.views[view]}'))
        for batch in batches:
            if batch:
                _score_group(name, metric, batch, view, results, pixels)
    return list(results.values())


def check_decode(decode: str) -> None:
    """``decode`` is one of :data:`DECODE_MODES`, else an :class:`InvalidArgument`."""
    if decode not in DECODE_MODES:
        raise InvalidArgument('decode', f'must be one of {", ".join(DECODE_MODES)}, got {decode!r}')


def decode_mode(decode: str, metrics: Dict[str, object], native_needed: bool) -> str:
    """Where a run decodes: 'cpu' (the workers, exact) or 'gpu' (JPEGs by nvJPEG on the metrics' GPU).

    ``decode='gpu'`` needs the metrics on one CUDA device, each declaring a fixed resize (``native_needed``:
    one does not, or references are scored), and torchvision; it is an :class:`InvalidArgument` otherwise.
    ``decode='auto'`` is 'gpu' where it can be, else 'cpu'.
    """
    check_decode(decode)
    if decode == 'cpu':
        return 'cpu'
    reason = None
    if shared_gpu(metrics) is None:
        devices = sorted({str(metric_device(m)) for m in metrics.values()}) or ['none']
        reason = f'needs the metrics on one CUDA device; they run on {", ".join(devices)}'
    elif native_needed:
        reason = ('needs metrics that all declare a fixed input resize (e.g. grmp_iqa) and no references; the '
                  'others take native-resolution images, decoded on the CPU')
    elif importlib.util.find_spec('torchvision') is None:
        reason = 'needs torchvision (its nvJPEG decoder)'
    if reason is None:
        return 'gpu'
    if decode == 'gpu':
        raise InvalidArgument('decode', f"'gpu' {reason}")
    return 'cpu'


def score_stream(paths: Sequence[Union[str, ImageSource]], metrics: Dict[str, object], batch_size: int,
                 workers: int = 0, references: Optional[Sequence[Union[str, ImageSource]]] = None,
                 indices: Sequence[int] = (), *, decode: str = 'cpu') -> Iterator[List[ImageResult]]:
    """Score ``paths`` with every metric, yielding the results of each chunk in path order as it finishes.

    Decoding runs in ``workers`` DataLoader processes (0: in this process). When every metric declares a fixed
    resize and no references are given, the workers resize too and collate whole batches of ``batch_size``
    (:func:`batched_items`); ``decode`` ('cpu', 'gpu', 'auto'; :func:`decode_mode`) then says where JPEGs are
    decoded. Otherwise items come one by one (:func:`prepared_items`; finished on the metrics' GPU when they
    share one), and a chunk holds at most ``batch_size`` images and, of native-resolution ones, about
    ``MAX_CHUNK_PIXELS`` pixels, so memory stays bounded whatever the image sizes. ``indices`` (default 0, 1,
    ...) number the results. This process keeps freed memory for reuse
    (:func:`~pyiqa_grmp.cpu_memory.keep_freed_memory`) when it decodes (``workers=0``) or a metric runs on the
    CPU; decoding workers always do.
    """
    if not workers or any(metric_device(metric).type == 'cpu' for metric in metrics.values()):
        keep_freed_memory()
    resizes: List[Resize] = []
    views: Dict[str, Optional[int]] = {}
    for name, metric in metrics.items():
        resize = declared_resize(metric)
        if resize is not None and resize not in resizes:
            resizes.append(resize)
        views[name] = None if resize is None else resizes.index(resize)
    keep_native = any(v is None for v in views.values())
    native_needed = keep_native or references is not None or not metrics
    mode = decode_mode(decode, metrics, native_needed)
    if not native_needed:
        for batch in batched_items(paths, resizes, workers, batch_size, indices, shared_gpu(metrics),
                                   gpu_jpegs=mode == 'gpu'):
            yield _score_chunk(batch, metrics, views)
        return
    chunk: List[DecodedItem] = []
    pixels = 0
    items = prepared_items(paths, resizes, keep_native, workers, references, indices, shared_gpu(metrics),
                           in_flight=batch_size)
    for item in items:
        chunk.append(item)
        pixels += item.native[0].numel() if item.native is not None else 0
        if len(chunk) == batch_size or pixels >= MAX_CHUNK_PIXELS:
            yield _score_chunk(chunk, metrics, views)
            chunk, pixels = [], 0
    if chunk:
        yield _score_chunk(chunk, metrics, views)


def progress_bar(total: int, progress: bool, desc: str):
    """A tqdm bar on stderr counting images (hidden without ``progress``)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, unit='img', file=sys.stderr)


def score_paths(paths: Sequence[Union[str, ImageSource]], metrics: Dict[str, object], report: ScoreReport,
                batch_size: int, progress: bool = True, reference_of: Optional[Callable[[int, str], str]] = None,
                desc: str = 'scoring', workers: int = 0) -> None:
    """Score ``paths`` with every metric into ``report`` (scores and failures), in one process; see
    :func:`score_stream`. ``reference_of(index, path)`` names each image's reference for full-reference metrics."""
    references = [reference_of(i, p) for i, p in enumerate(paths)] if reference_of is not None else None
    with progress_bar(len(paths), progress, desc) as bar:
        for results in score_stream(paths, metrics, batch_size, workers, references):
            for result in results:
                if result.scores:
                    report.scores.setdefault(result.path, {}).update(result.scores)
                report.errors.extend(result.errors)
            bar.update(len(results))

"""The scoring pipeline: images decoded in DataLoader workers, the declared fixed resize run ahead, full batches.

Images are decoded in ``workers`` processes of a ``torch.utils.data.DataLoader`` while the main process runs the
metrics. A metric whose preprocessing starts with a fixed resize declares it (the protocol below), and that very
resize runs ahead of the metric (in the workers on a CPU; on the GPU in the main process, the workers passing
uint8 pixels), so images of any size arrive equal-sized and batches are full; other metrics get native-resolution
images and batches of equal-size images. A failing batch is retried image by image, so one bad image only costs
its own score, and every failure is recorded with the image's name.

Fixed-resize protocol: the arch of a pyiqa ``InferenceModel`` (its ``.net``) may have an attribute named
:data:`FIXED_RESIZE_ATTRIBUTE` holding a picklable callable, or None. The callable maps a float32 (N, 3, H, W)
batch in [0, 1] to (N, 3, h, w) with h, w fixed, and must be the first step of the arch's own preprocessing, which
must leave an input of that size unresized, so that scoring a pre-resized image is the same computation as scoring
the original. Only no-reference metrics are resized ahead; the metric's input range check is skipped for those
inputs (bicubic overshoot may leave [0, 1]; the decoded image itself is always in range).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..data.image_io import ImageReadError, unit_float
from .collect import ImageSource, as_source
from .results import Failure, ImageResult, ScoreReport

#: Pixels (per channel) of native-resolution images held before a chunk is scored, whatever the batch size.
MAX_CHUNK_PIXELS = 48_000_000
#: Attribute of a metric's arch declaring its fixed input resize (see the module docstring).
FIXED_RESIZE_ATTRIBUTE = 'fixed_input_resize'
#: At most this many decoding workers by default (a GPU rarely needs more to stay busy).
MAX_DEFAULT_WORKERS = 16

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
    in [0, 1]; ``views`` holds the declared resizes' results (see :func:`finish_item`).
    """

    index: int
    path: str
    error: Optional[str] = None
    native: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    views: List[object] = field(default_factory=list)

    def pin_memory(self) -> 'DecodedItem':
        """This item with its tensors in pinned memory (a DataLoader with ``pin_memory=True`` calls it)."""
        return dataclasses.replace(self, native=_pinned(self.native), reference=_pinned(self.reference),
                                   views=[_pinned(v) if torch.is_tensor(v) else v for v in self.views])


def _pinned(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.pin_memory() if tensor is not None else None


class DecodedImages(torch.utils.data.Dataset):
    """Decoded images (and references), one :class:`DecodedItem` per index; runs in the DataLoader's workers.

    Images are :class:`~pyiqa_grmp.scoring.collect.ImageSource` (a path names a file). With ``finish_in_worker``
    the worker also runs :func:`finish_item`; without it the item keeps the images as decoded and ``views``
    empty, for the main process to finish.
    """

    def __init__(self, paths: Sequence[Union[str, ImageSource]],
                 references: Optional[Sequence[Union[str, ImageSource]]] = None,
                 resizes: Sequence[Resize] = (), keep_native: bool = True,
                 first_index: Sequence[int] = (), finish_in_worker: bool = True) -> None:
        self.sources = [as_source(p) for p in paths]
        self.references = [as_source(r) for r in references] if references is not None else None
        self.resizes = list(resizes)
        self.keep_native = keep_native
        self.indices = list(first_index) or list(range(len(self.sources)))
        self.finish_in_worker = finish_in_worker

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> DecodedItem:
        source = self.sources[position]
        item = DecodedItem(self.indices[position], source.key)
        try:
            shared = torch.utils.data.get_worker_info() is not None  # passed to the main process: no extra copy
            item.native = source.decode(shared)
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
    image = unit_float(_moved(item.native, device))
    if item.reference is not None:
        item.reference = unit_float(_moved(item.reference, device))
    views: List[object] = []
    for resize in resizes:
        try:
            views.append(resize(image.unsqueeze(0))[0])
        except Exception as error:
            views.append(f'{type(error).__name__}: {error}')
    item.views = views
    item.native = image if keep_native else None


def _moved(tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return tensor if device is None else tensor.to(device, non_blocking=True)


def _as_is(item: DecodedItem) -> DecodedItem:
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


def _score_group(name: str, metric, items: List[DecodedItem], view: Optional[int],
                 results: Dict[int, ImageResult]) -> None:
    """Score ``items`` together (their tensors have equal sizes), then one by one if the batch fails."""
    def run(batch: List[DecodedItem]) -> List[float]:
        if view is not None:
            with _input_range_unchecked(metric):
                return _as_scores(metric(torch.stack([i.views[view] for i in batch])), len(batch))
        target = torch.stack([i.native for i in batch])
        if metric.metric_mode == 'FR':
            return _as_scores(metric(target, torch.stack([i.reference for i in batch])), len(batch))
        return _as_scores(metric(target), len(batch))

    try:
        scored = [(items, run(items))]
    except Exception:
        scored = []
        for item in items:
            try:
                scored.append(([item], run([item])))
            except Exception as error:
                results[item.index].errors.append(Failure(name, item.path, f'{type(error).__name__}: {error}'))
    for batch, values in scored:
        for item, value in zip(batch, values):
            results[item.index].scores[name] = value


def _score_chunk(items: List[DecodedItem], metrics: Dict[str, object],
                 views: Dict[str, Optional[int]]) -> List[ImageResult]:
    """Every metric on every readable image of ``items``: resized views all together, native images by size."""
    results = OrderedDict((i.index, ImageResult(i.index, i.path)) for i in items)
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
            batches = [[i for i in readable if torch.is_tensor(i.views[view])]]
            for item in readable:
                if not torch.is_tensor(item.views[view]):
                    results[item.index].errors.append(Failure(name, item.path,
                                                              f'resize failed: {item.views[view]}'))
        for batch in batches:
            if batch:
                _score_group(name, metric, batch, view, results)
    return list(results.values())


def score_stream(paths: Sequence[Union[str, ImageSource]], metrics: Dict[str, object], batch_size: int,
                 workers: int = 0, references: Optional[Sequence[Union[str, ImageSource]]] = None,
                 indices: Sequence[int] = ()) -> Iterator[List[ImageResult]]:
    """Score ``paths`` with every metric, yielding the results of each chunk in path order as it finishes.

    Decoding runs in ``workers`` DataLoader processes (0: in this process); the float conversion and the declared
    resizes run there too, or, when the metrics share a GPU, on it in this process (:func:`prepared_items`). A
    chunk holds at most ``batch_size`` images and, of native-resolution ones, about ``MAX_CHUNK_PIXELS`` pixels,
    so memory stays bounded whatever the image sizes. ``indices`` (default 0, 1, ...) number the results.
    """
    resizes: List[Resize] = []
    views: Dict[str, Optional[int]] = {}
    for name, metric in metrics.items():
        resize = declared_resize(metric)
        if resize is not None and resize not in resizes:
            resizes.append(resize)
        views[name] = None if resize is None else resizes.index(resize)
    keep_native = any(v is None for v in views.values())
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

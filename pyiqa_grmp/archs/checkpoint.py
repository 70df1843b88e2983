"""Reading GRMP-IQA checkpoints: this package's own and the official ``CustomCLIP``, state dict or pickled whole.

Both are converted to the key layout of :class:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA`
(``clip.*``, ``visual_prompts.*``, ``prompt_learner.*``) with every tensor accounted for: a key that cannot be
placed is an error, never silently dropped.

Every read of ours (these checkpoints, and the training states of :mod:`pyiqa_grmp.checkpointing`) goes through
:func:`load_checked` or :func:`check_tensors`: the archive is checked before torch reads it, and every tensor
before anything converts or copies it, so a hostile file costs little more than its own size.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from .pickled_module import UnsafePickleError, bounded_repr, check_torch_archive, read_pickled_module

#: Keys under which checkpoints commonly nest their state dict, in order of preference.
NESTING_KEYS = ('params', 'params_ema', 'state_dict', 'model', 'net', 'module')

OFFICIAL_PROMPT_BUFFERS = ('prompt_learner2.token_prefix', 'prompt_learner2.token_suffix')


#: Bounds of the walk through a loaded file's nested containers: nesting depth, and items visited.
MAX_CONTAINER_DEPTH = 32
MAX_CONTAINER_ITEMS = 200_000


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model; the message names the missing and unexpected keys."""


class BaseWeightsError(CheckpointMismatchError, ValueError):
    """A compact checkpoint's base weights are missing or are not the ones it was trained on; the message names
    the expected base (and the one found). A ValueError too: bad input, which the CLI reports in one line."""


#: ``format`` of the ``applies_to`` entry of a compact checkpoint (see :func:`tensor_digest`).
COMPACT_FORMAT = 'pyiqa_grmp.compact/1'


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """``sha256:HEX`` over the tensors sorted by name: each name, dtype, shape and raw bytes.

    What a compact checkpoint records of the frozen tensors it applies to: it identifies them whatever file or
    tag they came from (a random initialisation included) and whatever format held them.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        header = f'{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0'.encode('utf-8')
        digest.update(len(header).to_bytes(8, 'little'))
        digest.update(header)
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f'sha256:{digest.hexdigest()}'


class UnsafeCheckpointError(CheckpointMismatchError):
    """A file refused before its contents are used (a tensor claiming more than its storage, a forbidden
    construct); nothing in it was executed or expanded. The message names the file and, where one is to blame,
    the key."""


def _layout_problem(tensor: torch.Tensor) -> Optional[str]:
    """Why ``tensor`` may address more than its storage holds, or None when it is a dense-or-sparser CPU view.

    Sorted by stride, each dimension (of size > 1) must step at least over the extent of those with smaller
    strides, so no element is addressed twice (no zero or overlapping strides), and the last element must lie
    inside the storage; then the tensor never holds more elements than its storage.
    """
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f'is a {type(tensor).__name__}, not a plain tensor'
    if tensor.layout != torch.strided or tensor.device.type != 'cpu' or tensor.is_quantized:
        return f'is a {tensor.layout} {tensor.dtype} tensor on {tensor.device}, not a dense CPU tensor'
    if tensor.numel() == 0:
        return None
    shape, stride = tuple(tensor.shape), tensor.stride()
    extent = 1
    for step, size in sorted((st, sz) for sz, st in zip(shape, stride) if sz > 1):
        if step < extent:
            return f'has size {shape} and stride {stride}, which address elements more than once'
        extent = step * size
    last = tensor.storage_offset() + sum((sz - 1) * st for sz, st in zip(shape, stride))
    capacity = tensor.untyped_storage().nbytes() // tensor.element_size()
    if last >= capacity:
        return f'with offset {tensor.storage_offset()}, size {shape} and stride {stride} reaches past its storage ' \
               f'of {capacity} elements'
    return None


def check_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], path: str, what: str = 'checkpoint') -> None:
    """Refuse, before any conversion or copy, tensors that claim more than the file stores.

    Each tensor must pass :func:`_layout_problem`, and together they may claim no more bytes than their distinct
    storages hold (many keys viewing one storage would multiply the work of a conversion). Raises
    :class:`UnsafeCheckpointError` naming the file and the key.
    """
    claimed, storages = 0, {}
    for key, tensor in tensors:
        problem = _layout_problem(tensor)
        if problem:
            raise UnsafeCheckpointError(f'could not read {what} {path}: tensor {key} {problem}; refused before '
                                        'anything converts it')
        claimed += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    if claimed > sum(storages.values()):
        raise UnsafeCheckpointError(f'could not read {what} {path}: its tensors claim {claimed} bytes, more than the '
                                    f'{sum(storages.values())} bytes their storages hold (several keys view the '
                                    'same storage)')


def _nested_tensors(root: Any, path: str, what: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """The tensors in ``root``'s dicts, lists, tuples and sets, under dotted keys.

    The walk is bounded by :data:`MAX_CONTAINER_DEPTH` and by :data:`MAX_CONTAINER_ITEMS` items taken in (a
    shared container counts each time it is reached, so neither loops nor shared structures cost more).
    """
    pending: List[Tuple[Any, str, int]] = [(root, '', 0)]
    taken = 1
    while pending:
        value, key, depth = pending.pop()
        if torch.is_tensor(value):
            yield key or '<root>', value
            continue
        if isinstance(value, Mapping):
            items = [(f'{key}.{name if type(name) is str else bounded_repr(name)}', item)
                     for name, item in value.items()]
        elif type(value) in (list, tuple, set, frozenset):
            items = [(f'{key}.{index}', item) for index, item in enumerate(value)]
        else:
            continue
        taken += len(items)
        if depth >= MAX_CONTAINER_DEPTH or taken > MAX_CONTAINER_ITEMS:
            raise UnsafeCheckpointError(f'could not read {what} {path}: its containers nest deeper than '
                                        f'{MAX_CONTAINER_DEPTH} levels or hold more than {MAX_CONTAINER_ITEMS} items '
                                        f'(at {key or "the root"})')
        pending.extend((item, name.lstrip('.'), depth + 1) for name, item in items)


def load_checked(path: str, what: str = 'checkpoint', handle: Optional[IO[bytes]] = None) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (or of ``handle``, its contents), checked before and after.

    Before: :func:`~pyiqa_grmp.archs.pickled_module.check_torch_archive` (torch's zip layout, stored entries, a
    scan of the pickle). After, before anything uses them: :func:`check_tensors` over every tensor. Refusals are
    :class:`UnsafeCheckpointError`; torch's own errors (``pickle.UnpicklingError`` for a global outside its
    allow-list) pass through for the caller to word.
    """
    try:
        if handle is None:
            with open(path, 'rb') as file:
                check_torch_archive(file)
        else:
            check_torch_archive(handle)
    except UnsafePickleError as error:
        raise UnsafeCheckpointError(f'could not read {what} {path}: {error}; nothing in it was used') from error
    loaded = torch.load(path if handle is None else handle, map_location='cpu', weights_only=True)
    check_tensors(_nested_tensors(loaded, path, what), path, what)
    return loaded


def _describe(keys: Iterable[str], limit: int = 25) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return f'{shown}, ... ({len(keys)} in all)' if len(keys) > limit else shown


def mismatch_error(path: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                   shapes: Iterable[str] = (), hint: str = '') -> CheckpointMismatchError:
    """Build the one error used for every checkpoint/model disagreement."""
    parts = [f'checkpoint {path} does not match the GRMP-IQA model:']
    missing, unexpected, shapes = list(missing), list(unexpected), list(shapes)
    if missing:
        parts.append(f'  missing keys ({len(missing)}): {_describe(missing)}')
    if unexpected:
        parts.append(f'  unexpected keys ({len(unexpected)}): {_describe(unexpected)}')
    if shapes:
        parts.append(f'  shape mismatches ({len(shapes)}): {_describe(shapes)}')
    if hint:
        parts.append(f'  {hint}')
    return CheckpointMismatchError('\n'.join(parts))


@dataclass
class GRMPCheckpoint:
    """A checkpoint converted to our key layout.

    ``prompt_buffers`` holds the official ``token_prefix``/``token_suffix`` buffers (derived from the frozen
    token embedding); they are checked against the model after loading rather than stored in it.
    """

    path: str
    source: str  # 'official' or 'pyiqa_grmp'
    state_dict: Dict[str, torch.Tensor]
    prompt_buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    #: How the file held the tensors: 'state dict', or 'pickled module CLASS' (read without its code).
    container: str = 'state dict'
    #: The network options the file says it is for (``'network'`` beside ``'params'``); None when it says none.
    network: Optional[Dict[str, Any]] = None
    #: What the file says of the weights it started from (``'base'`` beside ``'params'``), or None.
    base: Optional[Dict[str, Any]] = None
    #: For a compact checkpoint (``state_dict`` holds only the tensors training changed): the base weights it
    #: applies to (``'applies_to'`` beside ``'params'``: format, digest of the frozen tensors, where they come
    #: from); None for a checkpoint of the whole network.
    applies_to: Optional[Dict[str, Any]] = None


def _unwrap(obj: object, path: str) -> Dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        nested = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointMismatchError(
            f'checkpoint {path} holds no state dict (found {type(obj).__name__}'
            f'{" with keys " + _describe(map(bounded_repr, obj.keys())) if isinstance(obj, Mapping) else ""}); '
            f'expected tensors, optionally nested under one of {NESTING_KEYS}')
    not_strings = [bounded_repr(k) for k in obj if type(k) is not str]
    if not_strings:
        raise CheckpointMismatchError(f'checkpoint {path} has state dict keys that are not strings: '
                                      f'{_describe(not_strings)}')
    not_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointMismatchError(f'checkpoint {path} mixes tensors with other entries: {_describe(not_tensors)}')
    return dict(obj)


def _place(target: Dict[str, torch.Tensor], sources: Dict[str, str], key: str, source: str, value: torch.Tensor,
           path: str) -> None:
    """``target[key] = value``, refusing a second source key for the same model key (neither may win silently)."""
    if key in target:
        raise mismatch_error(path, unexpected=[sources[key], source],
                             hint=f'both of these keys map to the model key {key}; keep one of them')
    target[key], sources[key] = value, source


def _strip_module_prefix(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """Remove the leading ``module.`` that DataParallel / DDP add (possibly more than once)."""
    stripped: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    for key, value in state.items():
        name = key
        while name.startswith('module.'):
            name = name[len('module.'):]
        _place(stripped, sources, name, key, value, path)
    return stripped


def _check_floating(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Every parameter and buffer of the model is floating point; an int or bool tensor would be cast silently."""
    wrong = [f'{key} ({value.dtype})' for key, value in state.items() if not value.dtype.is_floating_point]
    if wrong:
        raise mismatch_error(path, shapes=wrong, hint='these tensors are not floating point, unlike every '
                                                      'parameter of the GRMP-IQA model')


def _is_official(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(('prompt_learner2.', 'image_encoder.', 'text_encoder.')) for k in state)


def convert_official_state_dict(state: Mapping[str, torch.Tensor], path: str = '<state dict>',
                                container: str = 'state dict') -> GRMPCheckpoint:
    """Map an official ``CustomCLIP`` state dict (``module.`` already removed) to our layout.

    The four rules: ``image_encoder.*`` -> ``clip.visual.*`` (its prompt tensors -> ``visual_prompts.*``, the
    layer-0 and deep prompt sets stacked into one tensor), ``text_encoder.*`` -> ``clip.*``,
    ``prompt_learner2.ctx`` -> ``prompt_learner.ctx``, ``logit_scale`` -> ``clip.logit_scale``.
    """
    converted: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    buffers: Dict[str, torch.Tensor] = {}
    unplaced: List[str] = []
    shallow = state.get('image_encoder.prompt_embeddings')
    deep = state.get('image_encoder.deep_prompt_embeddings')
    if shallow is not None:
        _place(converted, sources, 'visual_prompts.embeddings', 'image_encoder.prompt_embeddings',
               shallow if deep is None else torch.cat([shallow, deep], dim=0), path)
    elif deep is not None:
        unplaced.append('image_encoder.deep_prompt_embeddings (without image_encoder.prompt_embeddings)')
    for key, value in state.items():
        if key in ('image_encoder.prompt_embeddings', 'image_encoder.deep_prompt_embeddings'):
            continue
        if key in OFFICIAL_PROMPT_BUFFERS:
            buffers[key] = value
            continue
        if key == 'prompt_learner2.ctx':
            target = 'prompt_learner.ctx'
        elif key == 'logit_scale':
            target = 'clip.logit_scale'
        elif key.startswith('image_encoder.prompt_proj.'):
            target = 'visual_prompts.proj.' + key[len('image_encoder.prompt_proj.'):]
        elif key.startswith('image_encoder.prompt_norm.'):
            target = 'visual_prompts.norm.' + key[len('image_encoder.prompt_norm.'):]
        elif key.startswith('image_encoder.'):
            target = 'clip.visual.' + key[len('image_encoder.'):]
        elif key.startswith('text_encoder.'):
            target = 'clip.' + key[len('text_encoder.'):]
        else:
            unplaced.append(key)
            continue
        _place(converted, sources, target, key, value, path)
    if unplaced:
        raise mismatch_error(path, unexpected=unplaced,
                             hint='these keys of an official GRMP-IQA checkpoint have no place in the model')
    return GRMPCheckpoint(path=path, source='official', state_dict=converted, prompt_buffers=buffers,
                          container=container)


def _half_to_float(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fp16/bf16 tensors (OpenAI CLIP weights, an fp16 official model) as fp32; exact, like a strict load."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}


def _read_safely(path: str) -> Tuple[object, str]:
    """The checkpoint's contents and what they were: ``weights_only`` first, a pickled module second.

    Both go through the archive check and :func:`check_tensors`; any failure is a :class:`CheckpointMismatchError`
    naming the file.
    """
    try:
        return load_checked(path, 'GRMP-IQA checkpoint'), 'state dict'
    except CheckpointMismatchError:
        raise
    except pickle.UnpicklingError:  # e.g. a whole pickled module: read it without its code
        try:
            tensors, class_name = read_pickled_module(path, NESTING_KEYS, archive_checked=True)
        except (UnsafePickleError, ValueError) as error:
            raise UnsafeCheckpointError(
                f'could not read GRMP-IQA checkpoint {path}: it is no plain state dict (torch.load with '
                f'weights_only=True refused it), and reading it as a pickled module without its code failed: '
                f'{error}. Nothing in the file was executed.') from error
        except Exception as error:
            raise CheckpointMismatchError(
                f'could not read GRMP-IQA checkpoint {path} as a pickled module: {type(error).__name__}: '
                f'{error}') from error
        check_tensors(tensors.items(), path, 'GRMP-IQA checkpoint')
        return tensors, f'pickled module {class_name}'
    except Exception as error:
        raise CheckpointMismatchError(
            f'could not read GRMP-IQA checkpoint {path}: {type(error).__name__}: {error}') from error


def read_grmp_checkpoint(path: str) -> GRMPCheckpoint:
    """Load a checkpoint safely and convert it to our key layout.

    A state dict (bare or nested) is read with ``weights_only=True``. A whole pickled module
    (``torch.save(model)``, e.g. the official ``CustomCLIP``), which that refuses, is read by the restricted
    unpickler of :mod:`~pyiqa_grmp.archs.pickled_module`: tensors only, no code imported or executed. Either way
    every tensor is checked against its storage before it is converted, and two keys for one model key, non-string
    keys and non-floating tensors are errors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'GRMP-IQA checkpoint not found: {path}')
    raw, container = _read_safely(path)
    state = _strip_module_prefix(_unwrap(raw, path), path)
    _check_floating(state, path)
    if _is_official(state):
        return convert_official_state_dict(_half_to_float(state), path, container)
    described = {key: raw.get(key) if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping) else None
                 for key in ('network', 'base', 'applies_to')}
    return GRMPCheckpoint(path=path, source='pyiqa_grmp', state_dict=state, container=container, **described)

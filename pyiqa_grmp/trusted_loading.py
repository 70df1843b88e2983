"""Files and option values handed to pyiqa, used without running code that they carry.

pyiqa's loaders unpickle what they are given: ``load_pretrained_network`` and several archs call
``torch.load(..., weights_only=False)``, CLIP backbones go through ``torch.jit.load``, and ``BaseIQADataset``
``pickle.load``-s a dataset's ``split_file``. Inside :func:`trusted_loading` (used wherever this package creates
pyiqa metrics, networks or datasets):

- every ``torch.load`` reads with ``weights_only=True`` (tensors, containers, numbers, strings, plus the numpy
  array and scalar types in :func:`numpy_plain_data`); a file that needs more is refused with
  :class:`RefusedFileError` before anything in it runs. Calls that pass our restricted pickle module
  (:mod:`pyiqa_grmp.archs.pickled_module`) keep it, and a caller's own ``weights_only=True`` failure stays a
  ``pickle.UnpicklingError`` (such callers handle it themselves);
- ``torch.jit.load`` (TorchScript is code) loads only files under torch hub's directory and ``~/.cache/clip``,
  where pyiqa downloads its published weights; any other TorchScript file is refused, any other file raises the
  ``RuntimeError`` that makes pyiqa's CLIP loader read it as a state dict instead;
- topiq's ``semantic_model_name``, which pyiqa passes to ``eval``, must be one of its Swin model names;
- a ``split_file`` is read by :func:`read_split_file`: at most :data:`SPLIT_FILE_MAX_BYTES`, a pickle of plain
  data only (no global is ever imported), shaped ``{split_index: {phase: [row indices]}}`` with indices in range.

The patches are process-wide while a guard is active (guards nest) and removed when the outermost one exits;
nothing is patched at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickle
import threading
import types
import zipfile
from typing import Any, Callable, Iterator, List, Mapping, Optional

SPLIT_FILE_MAX_BYTES = 64 * 1024 * 1024
SPLIT_FILE_OPTION = 'split_file'
_PHASES = ('train', 'val', 'test')

CONVERT_HINT = ('If you trust the file, convert it yourself: in a trusted environment load it with '
                "torch.load(path, weights_only=False) and re-save the tensors alone, e.g. "
                "torch.save({'params': model.state_dict()}, new_path).")

_lock = threading.RLock()
_depth = 0
_restore: List[Callable[[], None]] = []
_named_options: List[Mapping[str, object]] = []
_split_context: contextvars.ContextVar = contextvars.ContextVar('pyiqa_grmp_split_context', default=None)


class RefusedInputError(ValueError):
    """A value given to pyiqa through an option was refused: using it would run code it carries."""

    def __init__(self, value: str, option: str, reason: str):
        self.value, self.option, self.reason = value, option, reason
        super().__init__(f'refused {value} (option {option}): {reason}')


class RefusedFileError(RefusedInputError):
    """A file given to pyiqa (named with the option it came through) was refused: reading it would run code,
    or it is not the data that option takes."""

    @property
    def path(self) -> str:
        return self.value


def numpy_plain_data() -> list:
    """The numpy globals a pickled array or scalar needs (no code beyond building the array)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    classes = getattr(np, 'dtypes', None)  # numpy >= 1.25 pickles dtypes with their classes
    dtypes = [getattr(classes, name) for name in dir(classes) if name.endswith('DType')
              and name not in ('ObjectDType', 'VoidDType', 'StringDType')]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


@contextlib.contextmanager
def trusted_loading(options: Optional[Mapping[str, object]] = None) -> Iterator[None]:
    """Load pyiqa files inside this block without running code from them (see the module docstring).

    ``options`` are the keyword arguments the user gave (e.g. a metric's), used to name the option a refused file
    came through.
    """
    global _depth
    with _lock:
        if _depth == 0:
            try:
                _install()
            except BaseException:
                _uninstall()
                raise
        _depth += 1
        _named_options.append(dict(options or {}))
    try:
        yield
    finally:
        with _lock:
            _named_options.pop()
            _depth -= 1
            if _depth == 0:
                _uninstall()


# ------------------------------------------------------------------------------------------------- patching
def _patch(owner: Any, name: str, value: Any) -> None:
    if name in vars(owner):
        original = vars(owner)[name]
        _restore.append(lambda: setattr(owner, name, original))
    else:  # e.g. a module global that shadows a builtin
        _restore.append(lambda: delattr(owner, name))
    setattr(owner, name, value)


def _uninstall() -> None:
    while _restore:
        _restore.pop()()


def _install() -> None:
    import torch
    from pyiqa.archs import topiq_swin
    from pyiqa.data import base_iqa_dataset

    from .archs.pickled_module import RESTRICTED_PICKLE

    safe = torch.serialization.safe_globals(numpy_plain_data())
    safe.__enter__()
    _restore.append(lambda: safe.__exit__(None, None, None))
    _patch(torch, 'load', _guarded_torch_load(torch.load, RESTRICTED_PICKLE))
    _patch(torch.jit, 'load', _guarded_jit_load(torch.jit.load))
    _patch(base_iqa_dataset, 'pickle', types.SimpleNamespace(load=read_split_file))
    _patch(topiq_swin, 'eval', _swin_by_name(topiq_swin))  # its create_swin evals semantic_model_name
    split_with_file = base_iqa_dataset.BaseIQADataset.get_split_with_file

    def get_split_with_file(dataset, opt):  # gives read_split_file the rows and the split asked for
        token = _split_context.set((len(dataset.paths_mos), opt.get('split_index', 1), dataset.phase))
        try:
            return split_with_file(dataset, opt)
        finally:
            _split_context.reset(token)

    _patch(base_iqa_dataset.BaseIQADataset, 'get_split_with_file', get_split_with_file)


def _file_name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, 'name', '<file object>'))


def _option_of(path: str, default: str = 'pretrained_model_path (or a file the metric loads by default)') -> str:
    """The option the user passed ``path`` through, as far as the active guards know it, else ``default``."""
    real = os.path.realpath(path) if path else path
    for options in reversed(_named_options):
        for key, value in options.items():
            if isinstance(value, (str, os.PathLike)) and os.path.realpath(os.fspath(value)) == real:
                return str(key)
    return default


def _guarded_torch_load(original: Callable, vetted_pickle: Any) -> Callable:
    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        if pickle_module is vetted_pickle:  # our restricted unpickler: imports and runs nothing
            return original(f, map_location, pickle_module, weights_only=weights_only, **kwargs)
        path = _file_name(f)
        if _is_torchscript(f):
            raise RefusedFileError(path, _option_of(path), 'it is a TorchScript archive, which is code. '
                                   + CONVERT_HINT)
        try:
            return original(f, map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as error:
            if weights_only is True:
                raise  # the caller asked for a safe read and handles a refusal itself
            found = ''.join(f' ({line.strip()})' for line in str(error).splitlines()[1:] if 'GLOBAL' in line)
            raise RefusedFileError(path, _option_of(path), 'it holds more than tensors and plain data, so reading '
                                   f'it would run pickled code{found[:300]}. {CONVERT_HINT}') from None
    return load


def _trusted_cache_dirs() -> List[str]:
    import torch

    return [os.path.realpath(torch.hub.get_dir()), os.path.realpath(os.path.expanduser('~/.cache/clip'))]


def _is_torchscript(f: Any) -> bool:
    """Whether ``f`` (a path or a seekable binary file, left where it was) is a TorchScript archive."""
    from .archs.pickled_module import names_torchscript

    position = f.tell() if hasattr(f, 'tell') else None
    try:
        if not zipfile.is_zipfile(f):
            return False
        with zipfile.ZipFile(f) as archive:
            return names_torchscript(archive.namelist())
    finally:
        if position is not None:
            f.seek(position)


def _guarded_jit_load(original: Callable) -> Callable:
    def load(f, *args, **kwargs):
        path = _file_name(f)
        real = os.path.realpath(path)
        if any(real.startswith(folder + os.sep) for folder in _trusted_cache_dirs()):
            return original(f, *args, **kwargs)
        if _is_torchscript(f):
            raise RefusedFileError(path, _option_of(path, 'backbone'),
                                   'it is a TorchScript archive, which is code; only the published archives that '
                                   "pyiqa downloads into torch hub's folder are loaded. Pass a state dict instead "
                                   '(in a trusted environment: torch.save(torch.jit.load(path).state_dict(), new))')
        raise RuntimeError(f'{path} is not a TorchScript archive')  # pyiqa's CLIP loader then reads a state dict
    return load


def _swin_by_name(module: types.ModuleType) -> Callable[[str], Callable]:
    def swin_by_name(name: str) -> Callable:
        """What ``eval(name)`` gives for a Swin model name of ``module``, without evaluating anything."""
        if isinstance(name, str) and name in module.default_cfgs and callable(getattr(module, name, None)):
            return getattr(module, name)
        raise RefusedInputError(repr(name), 'semantic_model_name', 'pyiqa evaluates it as Python code; only '
                                f'the Swin model names {sorted(module.default_cfgs)} are allowed')
    return swin_by_name


# ----------------------------------------------------------------------------------------------- split files
class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes make by themselves (dicts, lists, tuples, numbers, strings, None)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f'it names the global {module}.{name}; a split file holds only dicts, '
                                     'lists and integers')

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('it holds persistent references; a split file holds only dicts, lists and '
                                     'integers')


def read_split_file(f: Any) -> dict:
    """A pyiqa split file (``{split_index: {'train'|'val'|'test': [row indices]}}``) read without running code.

    ``f`` is a path or a binary file. Raises :class:`RefusedFileError` (option ``split_file``) for files over
    :data:`SPLIT_FILE_MAX_BYTES`, pickles that name any global, and content of another shape; inside a dataset
    build the split asked for must exist and its indices must be rows of the meta-info file.
    """
    path = _file_name(f)
    with (open(f, 'rb') if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f)) as handle:
        data = handle.read(SPLIT_FILE_MAX_BYTES + 1)
    if len(data) > SPLIT_FILE_MAX_BYTES:
        raise RefusedFileError(path, SPLIT_FILE_OPTION, f'it is larger than {SPLIT_FILE_MAX_BYTES >> 20} MiB, the '
                                                        'limit for split files')
    try:
        splits = _PlainDataUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # any malformed stream: truncated, bad opcodes, refused globals
        raise RefusedFileError(path, SPLIT_FILE_OPTION, f'not a readable split pickle: {error}') from None
    _check_splits(splits, path)
    return splits


def _check_splits(splits: Any, path: str) -> None:
    context = _split_context.get()
    rows = context[0] if context else None

    def refuse(reason: str):
        raise RefusedFileError(path, SPLIT_FILE_OPTION, reason + "; expected {split_index: {'train': [row "
                                                                 "indices], 'val': [...], 'test': [...]}}")

    if not isinstance(splits, dict) or not splits:
        refuse(f'it holds a {type(splits).__name__}, not a non-empty dict')
    for key, split in splits.items():
        if not isinstance(split, dict) or not split:
            refuse(f'split {key!r} is a {type(split).__name__}, not a non-empty dict')
        for phase, indices in split.items():
            if phase not in _PHASES:
                refuse(f'split {key!r} has phase {phase!r}')
            if not isinstance(indices, (list, tuple)):
                refuse(f'split {key!r} phase {phase!r} is a {type(indices).__name__}, not a list')
            bad = [i for i in indices if type(i) is not int or i < 0 or (rows is not None and i >= rows)][:1]
            if bad:
                within = f' of the {rows} rows of the meta-info file' if rows is not None else ''
                refuse(f'split {key!r} phase {phase!r} holds {bad[0]!r}, not a row index{within}')
    if context:
        _, split_index, phase = context
        if split_index not in splits or phase not in splits[split_index]:
            refuse(f'it has no split_index {split_index!r} with phase {phase!r} (split indices: {list(splits)})')

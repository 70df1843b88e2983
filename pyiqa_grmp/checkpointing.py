"""Files that survive a kill, and training states that resume the same run.

* :func:`atomic_write` (and :func:`write_atomically`, for bytes or text: the one writer of whole files) writes to
  a temporary file in the target's folder, flushes, fsyncs and renames it over the target (then fsyncs the
  folder), so a reader finds either the old file or the complete new one. Temporary
  names start with ``.`` and end with ``.tmp``, so they are never taken for ``*.state`` or ``*.pth`` files.
  The file gets the permissions ``open(path, 'w')`` gives: those of the regular file it replaces, else 0666
  minus the umask (or the folder's default ACL); a symbolic link at the path is replaced, never written through.
* :func:`capture_rng` / :func:`restore_rng` hold every generator a step draws from (python, numpy, torch CPU and
  CUDA) as tensors and lists, so states stay readable with ``torch.load(weights_only=True)``.
* :func:`find_resume_state` picks the newest state that loads and whose weights exist, naming each one skipped.
* :func:`resume_fingerprint` / :func:`check_resume_fingerprint`: what a state depends on (network, training data
  and its split, batch, seed, world size); resuming under a config that changed it fails and names the option.
"""
from __future__ import annotations

import io
import os
import random
import secrets
import stat
import warnings
from typing import Any, Callable, Dict, IO, List, Optional, Tuple, Union

import numpy as np
import torch

from .archs.checkpoint import load_checked
from .data.image_io import escape_undecodable

#: Options of ``datasets.train`` that change how data is loaded but not which batches a step sees.
LOADER_ONLY_OPTIONS = frozenset({'num_worker_per_gpu', 'pin_memory', 'persistent_workers', 'prefetch_mode',
                                 'num_prefetch_queue', 'cache_images', 'name', 'phase'})
STATE_FORMAT = 1


class ResumeError(ValueError):
    """A training state cannot continue this run (a changed option, or missing weights)."""


def _fsync_directory(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename itself is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    The permissions are those of the regular file replaced, else those of a new file (see the module docstring);
    a symbolic link at ``path`` is replaced by the file, and its target is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        existing = os.lstat(path)
        mode = stat.S_IMODE(existing.st_mode) & 0o777 if stat.S_ISREG(existing.st_mode) else None
    except FileNotFoundError:
        mode = None
    temporary = os.path.join(folder, f'.{os.path.basename(path)}.{secrets.token_hex(8)}.tmp')
    # created as open(temporary, 'w') would (the umask applies), so that the bits never exceed the final ones
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o666 if mode is None else mode)
    try:
        with os.fdopen(descriptor, 'wb') as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(folder)


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete the temporary files that writes killed part-way left in ``folder``; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = [entry.name for entry in os.scandir(folder)
             if entry.name.startswith('.') and entry.name.endswith('.tmp') and not entry.is_dir(follow_symlinks=False)]
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return stale


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, whenever the process dies."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def write_atomically(path: str, data: Union[bytes, str]) -> None:
    """Write ``data`` with :func:`atomic_write`: a reader sees the old file or the complete new one, never a part.
    Text is written as UTF-8, the bytes of file names that are not UTF-8 as ``\\xhh``."""
    payload = escape_undecodable(data).encode('utf-8') if isinstance(data, str) else data
    atomic_write(path, lambda handle: handle.write(payload))


# ---------------------------------------------------------------------------------------------- generators
def capture_rng() -> Dict[str, Any]:
    """The state of the python, numpy and torch (CPU and every CUDA device) generators, as tensors/lists."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        'python': {'version': version, 'state': torch.tensor(python_state, dtype=torch.int64), 'gauss': gauss},
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'position': int(position),
                  'has_gauss': int(has_gauss), 'cached': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    python = state['python']
    random.setstate((python['version'], tuple(int(v) for v in python['state'].tolist()), python['gauss']))
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32),
                         numpy_state['position'], numpy_state['has_gauss'], numpy_state['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        if len(state['cuda']) != torch.cuda.device_count():
            warnings.warn(f'the state holds {len(state["cuda"])} CUDA generators, this machine has '
                          f'{torch.cuda.device_count()} devices; CUDA generators are not restored')
        else:
            torch.cuda.set_rng_state_all(state['cuda'])


# ------------------------------------------------------------------------------------------ picking a state
def _iteration_of(filename: str) -> Optional[int]:
    stem = filename[:-len('.state')]
    return int(stem) if filename.endswith('.state') and stem.isdigit() else None


def _read_state(path: str) -> Tuple[Optional[dict], str]:
    """(state, '') or (None, why it cannot be used)."""
    try:
        with open(path, 'rb') as handle:
            state = load_checked(path, 'training state', io.BytesIO(handle.read()))
    except Exception as error:  # a cut-short or foreign file: torch raises several kinds
        return None, f'cannot be read (cut short?): {type(error).__name__}: {error}'.splitlines()[0]
    if not isinstance(state, dict) or 'iter' not in state or 'epoch' not in state:
        return None, 'is not a training state'
    return state, ''


def find_resume_state(states_dir: str, weights_path: Callable[[int], str]) -> Tuple[Optional[str], Optional[dict]]:
    """The newest ``<iter>.state`` in ``states_dir`` that loads and whose weights ``weights_path(iter)`` exist.

    Each newer state that is skipped is named in a warning with the reason. Returns ``(None, None)`` when none is
    usable.
    """
    if not os.path.isdir(states_dir):
        return None, None
    candidates: List[Tuple[int, str]] = sorted(
        ((it, name) for name in os.listdir(states_dir) if (it := _iteration_of(name)) is not None), reverse=True)
    for iteration, name in candidates:
        path = os.path.join(states_dir, name)
        state, reason = _read_state(path)
        if state is None:
            warnings.warn(f'skipping training state {name}: {reason}')
            continue
        if int(state['iter']) != iteration:
            warnings.warn(f'skipping training state {name}: it holds iteration {state["iter"]}')
            continue
        if not os.path.isfile(weights_path(iteration)):
            warnings.warn(f'skipping training state {name}: its weights {weights_path(iteration)} are missing')
            continue
        return path, state
    return None, None


def load_state(path: str) -> dict:
    """A training state named explicitly (``path.resume_state``); any problem is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'resume state {path} not found')
    state, reason = _read_state(path)
    if state is None:
        raise ResumeError(f'resume state {path} {reason}')
    return state


# ---------------------------------------------------------------------------------------------- fingerprint
def _flatten(value: Any, prefix: str, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f'{prefix}.{key}', out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def resume_fingerprint(opt: dict) -> Dict[str, Any]:
    """The options a training state depends on, as ``{dotted name: value}``."""
    out: Dict[str, Any] = {'model_type': opt.get('model_type'), 'manual_seed': opt.get('manual_seed'),
                           'world_size': opt.get('world_size', 1)}
    _flatten(opt.get('network') or {}, 'network', out)
    train_set = {k: v for k, v in (opt.get('datasets') or {}).get('train', {}).items() if k not in LOADER_ONLY_OPTIONS}
    _flatten(train_set, 'datasets.train', out)
    return out


def check_resume_fingerprint(saved: Optional[Dict[str, Any]], current: Dict[str, Any], state_path: str) -> None:
    """Raise :class:`ResumeError` naming every option that differs between a state's run and this config."""
    if saved is None:
        return
    changed = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    if changed:
        details = '; '.join(f'{name}: {saved.get(name)!r} in the state, {current.get(name)!r} now' for name in changed)
        raise ResumeError(f'cannot resume from {state_path}: the config changed what the run depends on ({details}). '
                          'Restore these options, or start a new run (another name, or without auto_resume).')

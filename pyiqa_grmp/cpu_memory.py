"""How the C allocator treats the large, short-lived tensors of a run on the CPU (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (dynamic, at most 32 MB
by default) with a fresh ``mmap`` and unmaps it on ``free``, so each activation of that size is page-faulted in
again at every step: a ViT-B/16 layer's tensors for a batch of 50 are 20-90 MB. Measured on the 2-core CPU
(AVX-512 BF16), the parts of one bf16 fine-tuning step of ``adapt --preset cpu`` at ViT-B/16 with 50 shots
(forward, teacher, both gradients) took 21.6 s with glibc's defaults and 13.9 s with freed blocks kept for reuse
(:func:`keep_freed_memory`), which is what jemalloc and tcmalloc do (PyTorch's CPU performance guide has them
preloaded for this reason). Decoding is hit the same way: a 6 MP photo's buffers are 18 MB each, and two
DataLoader workers decode 1.2-1.3x as many mixed 0.3-6 MP JPEGs per second with freed memory kept
(``benchmarks/decode_workers.py``). The price: the process keeps its peak heap until it exits, which a training
run reaches anyway. A user's own ``MALLOC_*`` settings, ``GLIBC_TUNABLES`` or a preloaded allocator are left as
they are.
"""
from __future__ import annotations

import ctypes
import os
import platform

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap; freed heap memory is kept up to this much (C ``int`` ceilings).
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
_USER_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')

_kept = False


def user_allocator_settings() -> bool:
    """Whether the environment already chose how malloc behaves (its variables, tunables or a preloaded one)."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return True
    if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
        return True
    preload = os.environ.get('LD_PRELOAD', '')
    return 'jemalloc' in preload or 'tcmalloc' in preload or 'mimalloc' in preload


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed large blocks in this process for reuse (see the module docstring).

    Returns whether the setting is in effect: False off Linux/glibc, where the environment chose its own
    settings (:func:`user_allocator_settings`), or when ``mallopt`` refuses. Calling it again does nothing more.
    """
    global _kept
    if _kept:
        return True
    if platform.system() != 'Linux' or user_allocator_settings():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept

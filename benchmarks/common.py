"""Timing and peak-memory helpers shared by the benchmarks (run them as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as handle:
            handle.write('5')
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as handle:
        for line in handle:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def measure(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Seconds and peak memory (MiB above what was resident before the call) of one call."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        can_reset = _reset_peak_rss()
        base = _rss_kib('VmRSS')
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_kib('VmHWM') - base) / 1024 if can_reset else float('nan')
    return {'seconds': time.perf_counter() - start, 'peak_mib': peak}

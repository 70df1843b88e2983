"""Timing and peak-memory helpers shared by the benchmarks (run them as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import argparse
import os
import statistics
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


def backbone_spec(text: str):
    """``--backbone``: an open_clip model name, or a config dict in YAML/JSON (e.g. a tiny ViT for dry runs)."""
    import yaml

    return yaml.safe_load(text) if text.lstrip().startswith('{') else text


def benchmark_parser(description: str, runs: int, warmup: int = 1) -> argparse.ArgumentParser:
    """The options every benchmark takes: backbone, runs, warm-up, threads, device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--backbone', type=backbone_spec, default='ViT-B-16-quickgelu',
                        help='open_clip model name or a config dict for open_clip.model.CLIP, as YAML')
    parser.add_argument('--runs', type=int, default=runs)
    parser.add_argument('--warmup', type=int, default=warmup)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser


def prepare(args) -> torch.device:
    """Fix threads and seed; return the device."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def run_side_by_side(candidates: Dict[str, Callable[[], object]], args, device: torch.device,
                     details: str) -> Dict[str, Dict[str, float]]:
    """Warm up, run the candidates interleaved ``args.runs`` times, print one line each; return median seconds
    and peak memory per candidate."""
    for _ in range(args.warmup):
        for fn in candidates.values():
            fn()
    runs = {name: [] for name in candidates}
    for _ in range(args.runs):
        for name, fn in candidates.items():
            runs[name].append(measure(fn, device))
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else os.uname().machine
    backbone = args.backbone if isinstance(args.backbone, str) else 'config dict'
    print(f'device={device} ({where}) backbone={backbone} threads={args.threads} runs={args.runs} {details} '
          f'torch={torch.__version__}')
    summary = {}
    for name, results in runs.items():
        summary[name] = {'seconds': statistics.median(r['seconds'] for r in results),
                         'peak_mib': max(r['peak_mib'] for r in results)}
        print(f'{name:<34} median {summary[name]["seconds"]:8.3f} s  peak +{summary[name]["peak_mib"]:8.1f} MiB')
    return summary

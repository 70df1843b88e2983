"""Scoring precision of GRMP-IQA (``precision: fp32 | bf16 | fp16``) and how ``score`` / ``compare`` pass it to
metrics.

fp32 is exact. bf16 and fp16 run the image and text towers under ``torch.autocast`` (CUDA: both; CPU: bf16
only, since fp16 matrix products on CPU are slow and not what the official fp16 GPU test measured); the
cached prompt keys/values and text features are kept in that dtype, and the score itself (cosine logits,
softmax) is computed in fp32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Sequence

import torch

#: Precision name -> autocast dtype (None: no autocast).
PRECISION_DTYPES: Dict[str, Optional[torch.dtype]] = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)


def check_precision(precision: object) -> str:
    """Return ``precision`` if it is a known name, else raise ValueError naming the option and the choices."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    return str(precision)


def check_precision_device(precision: str, device_type: str) -> None:
    """Refuse combinations that cannot run: fp16 off CUDA, bf16 off CUDA and CPU."""
    if precision == 'fp32' or device_type == 'cuda' or (precision == 'bf16' and device_type == 'cpu'):
        return
    raise ValueError(f'precision {precision!r} does not run on {device_type}: fp16 needs CUDA, bf16 needs CUDA or '
                     "CPU; use precision 'fp32' (or 'bf16' on CPU)")


def autocast(precision: str, device_type: str) -> ContextManager:
    """The autocast context of ``precision`` on ``device_type`` (a no-op for fp32)."""
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    check_precision_device(precision, device_type)
    return torch.autocast(device_type, dtype=dtype)


def with_precision(options: Mapping[str, Mapping[str, object]], grmp_names: Sequence[str],
                   precision: Optional[str]) -> Dict[str, Dict[str, object]]:
    """Metric options with ``precision`` added for each of ``grmp_names`` (the GRMP-IQA metrics).

    An explicit ``NAME:precision=...`` metric option wins. Other metrics keep their own precision: pyiqa's
    metrics have no common precision option, and casting them could change their scores silently.
    """
    merged = {name: dict(values) for name, values in options.items()}
    if precision is None:
        return merged
    check_precision(precision)
    for name in grmp_names:
        merged.setdefault(name, {}).setdefault('precision', precision)
    return merged


def grmp_metric_names(metric_names: Sequence[str], pyiqa_name: Callable[[str], str] = lambda name: name
                      ) -> List[str]:
    """The names among ``metric_names`` whose pyiqa metric is built on the GRMPIQA arch."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    def arch_of(name: str) -> object:
        return (DEFAULT_CONFIGS.get(pyiqa_name(name)) or {}).get('metric_opts', {}).get('type')

    return [name for name in metric_names if arch_of(name) == 'GRMPIQA']


def add_precision_option(metric_names: Sequence[str], options: Mapping[str, Mapping[str, object]],
                         precision: Optional[str], device: Optional[str],
                         pyiqa_name: Callable[[str], str] = lambda name: name) -> Dict[str, Dict[str, object]]:
    """What ``precision`` of ``score`` / ``compare`` does: the option for every GRMP-IQA metric among
    ``metric_names``; the others keep their own precision.

    Raises ValueError when the precision cannot run on the device (``device`` None: CUDA when available, as
    pyiqa chooses).
    """
    if precision is None:
        return {name: dict(values) for name, values in options.items()}
    check_precision(precision)
    check_precision_device(precision, device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return with_precision(options, grmp_metric_names(metric_names, pyiqa_name), precision)


#: CPU flags (Linux ``/proc/cpuinfo``) of native bf16 matrix instructions; without them bf16 runs emulated, slower
#: than fp32.
CPU_BF16_FLAGS = ('amx_bf16', 'avx512_bf16')


def cpu_bf16_flag(cpuinfo: str = '/proc/cpuinfo') -> Optional[str]:
    """The first of :data:`CPU_BF16_FLAGS` this CPU reports, or None (also where ``cpuinfo`` cannot be read: other
    systems are not detected, so they train in fp32 unless bf16 is asked for)."""
    try:
        with open(cpuinfo) as stream:
            flags = next((set(line.split(':', 1)[1].split()) for line in stream if line.startswith('flags')), set())
    except OSError:
        return None
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)

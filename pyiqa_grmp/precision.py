"""Scoring precision of GRMP-IQA (``precision: fp32 | bf16 | fp16``) and how ``score`` / ``compare`` pass it to
metrics.

fp32 is exact. bf16 and fp16 run the image and text towers under ``torch.autocast`` (CUDA: both; CPU: bf16
only, since fp16 matrix products on CPU are slow and not what the official fp16 GPU test measured); the
cached prompt keys/values and text features are kept in that dtype, and the score itself (cosine logits,
softmax) is computed in fp32.

bf16 runs on any CPU, but is faster than fp32 only on CPUs with bf16 matrix instructions (:func:`cpu_has_bf16`:
x86 AVX-512 BF16 or AMX, e.g. Intel Xeon from Cooper Lake / Sapphire Rapids on and AMD Zen 4 on; Arm BF16, e.g.
AWS Graviton 3); elsewhere it emulates them and is slower. :func:`fast_precision` picks what ``fast=True`` uses.
"""
from __future__ import annotations

import contextlib
import platform
import warnings
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

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
    pyiqa chooses); warns when bf16 would run emulated, slower than fp32 (a CPU without :func:`cpu_has_bf16`).
    """
    if precision is None:
        return {name: dict(values) for name, values in options.items()}
    check_precision(precision)
    device_type = torch.device(device).type if device else ('cuda' if torch.cuda.is_available() else 'cpu')
    check_precision_device(precision, device_type)
    if precision == 'bf16' and device_type == 'cpu' and not cpu_has_bf16():
        warnings.warn('precision bf16 on this CPU: it has no bf16 matrix instructions (AVX-512 BF16, AMX or Arm '
                      'BF16), so bf16 runs emulated and slower than fp32', stacklevel=3)
    return with_precision(options, grmp_metric_names(metric_names, pyiqa_name), precision)


#: CPU flags (``/proc/cpuinfo``) of native bf16 matrix instructions: AMX and AVX-512 BF16 (x86), BF16 (Arm).
#: Without them bf16 runs emulated, slower than fp32.
CPU_BF16_FLAGS = ('amx_bf16', 'avx512_bf16', 'bf16')


def cpu_bf16_flag(cpuinfo: str = '/proc/cpuinfo') -> Optional[str]:
    """The first of :data:`CPU_BF16_FLAGS` this CPU has, or None: on x86 as torch probes it (AMX tiles, AVX-512
    BF16) where this torch can, else from the ``flags`` (x86) or ``Features`` (Arm) line of ``cpuinfo`` (None
    where it cannot be read: other systems are not detected, and keep fp32 unless bf16 is asked for)."""
    probes = {flag: getattr(torch.cpu, name, None) for flag, name in (('amx_bf16', '_is_amx_tile_supported'),
                                                                       ('avx512_bf16', '_is_avx512_bf16_supported'))}
    if platform.machine().lower() in ('x86_64', 'amd64') and all(probe is not None for probe in probes.values()):
        return next((flag for flag, probe in probes.items() if probe()), None)
    try:
        with open(cpuinfo) as handle:
            flags = {flag for line in handle if line.lower().startswith(('flags', 'features'))
                     for flag in line.split(':', 1)[-1].split()}
    except OSError:
        return None
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def cpu_has_bf16(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """Whether this CPU has bf16 matrix instructions (:func:`cpu_bf16_flag`), where bf16 beats fp32."""
    return cpu_bf16_flag(cpuinfo) is not None


def fast_precision(device_type: str) -> Tuple[str, Optional[str]]:
    """The precision of ``fast=True`` on ``device_type`` and, when it stays fp32, why (for a note to the user):
    bf16 on CUDA devices that support it and on CPUs with bf16 instructions, fp32 elsewhere."""
    if device_type == 'cuda':
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return 'bf16', None
        return 'fp32', 'this GPU does not support bf16: fast scoring keeps fp32'
    if device_type == 'cpu' and cpu_has_bf16():
        return 'bf16', None
    return 'fp32', (f'this {device_type} has no bf16 matrix instructions (AVX-512 BF16, AMX or Arm BF16), where bf16 '
                    'would be slower than fp32: fast scoring keeps fp32')

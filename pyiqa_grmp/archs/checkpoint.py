"""Reading GRMP-IQA checkpoints: this package's own and the official ``CustomCLIP``, state dict or pickled whole.

Both are converted to the key layout of :class:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA`
(``clip.*``, ``visual_prompts.*``, ``prompt_learner.*``) with every tensor accounted for: a key that cannot be
placed is an error, never silently dropped.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Tuple

import torch

from .pickled_module import UnsafePickleError, read_pickled_module

#: Keys under which checkpoints commonly nest their state dict, in order of preference.
NESTING_KEYS = ('params', 'params_ema', 'state_dict', 'model', 'net', 'module')

OFFICIAL_PROMPT_BUFFERS = ('prompt_learner2.token_prefix', 'prompt_learner2.token_suffix')


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model; the message names the missing and unexpected keys."""


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


def _unwrap(obj: object, path: str) -> Dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        nested = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointMismatchError(
            f'checkpoint {path} holds no state dict (found {type(obj).__name__}'
            f'{" with keys " + _describe(map(str, obj.keys())) if isinstance(obj, Mapping) else ""}); '
            f'expected tensors, optionally nested under one of {NESTING_KEYS}')
    not_tensors = [str(k) for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointMismatchError(f'checkpoint {path} mixes tensors with other entries: {_describe(not_tensors)}')
    return dict(obj)


def _strip_module_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the leading ``module.`` that DataParallel / DDP add (possibly more than once)."""
    stripped = {}
    for key, value in state.items():
        while key.startswith('module.'):
            key = key[len('module.'):]
        stripped[key] = value
    return stripped


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
    buffers: Dict[str, torch.Tensor] = {}
    unplaced: List[str] = []
    shallow = state.get('image_encoder.prompt_embeddings')
    deep = state.get('image_encoder.deep_prompt_embeddings')
    if shallow is not None:
        converted['visual_prompts.embeddings'] = shallow if deep is None else torch.cat([shallow, deep], dim=0)
    elif deep is not None:
        unplaced.append('image_encoder.deep_prompt_embeddings (without image_encoder.prompt_embeddings)')
    for key, value in state.items():
        if key in ('image_encoder.prompt_embeddings', 'image_encoder.deep_prompt_embeddings'):
            continue
        if key in OFFICIAL_PROMPT_BUFFERS:
            buffers[key] = value
        elif key == 'prompt_learner2.ctx':
            converted['prompt_learner.ctx'] = value
        elif key == 'logit_scale':
            converted['clip.logit_scale'] = value
        elif key.startswith('image_encoder.prompt_proj.'):
            converted['visual_prompts.proj.' + key[len('image_encoder.prompt_proj.'):]] = value
        elif key.startswith('image_encoder.prompt_norm.'):
            converted['visual_prompts.norm.' + key[len('image_encoder.prompt_norm.'):]] = value
        elif key.startswith('image_encoder.'):
            converted['clip.visual.' + key[len('image_encoder.'):]] = value
        elif key.startswith('text_encoder.'):
            converted['clip.' + key[len('text_encoder.'):]] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise mismatch_error(path, unexpected=unplaced,
                             hint='these keys of an official GRMP-IQA checkpoint have no place in the model')
    return GRMPCheckpoint(path=path, source='official', state_dict=converted, prompt_buffers=buffers,
                          container=container)


def _half_to_float(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fp16/bf16 tensors (OpenAI CLIP weights, an fp16 official model) as fp32; exact, like a strict load."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}


def _read_safely(path: str) -> Tuple[object, str]:
    """The checkpoint's contents and what they were: ``weights_only`` first, a pickled module second."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True), 'state dict'
    except pickle.UnpicklingError:  # e.g. a whole pickled module: read it without its code
        try:
            tensors, class_name = read_pickled_module(path, NESTING_KEYS)
        except (UnsafePickleError, ValueError) as error:
            raise CheckpointMismatchError(
                f'could not read GRMP-IQA checkpoint {path}: it is no plain state dict (torch.load with '
                f'weights_only=True refused it), and reading it as a pickled module without its code failed: '
                f'{error}. Nothing in the file was executed.') from error
        except Exception as error:
            raise CheckpointMismatchError(
                f'could not read GRMP-IQA checkpoint {path} as a pickled module: {type(error).__name__}: '
                f'{error}') from error
        return tensors, f'pickled module {class_name}'
    except Exception as error:
        raise CheckpointMismatchError(
            f'could not read GRMP-IQA checkpoint {path}: {type(error).__name__}: {error}') from error


def read_grmp_checkpoint(path: str) -> GRMPCheckpoint:
    """Load a checkpoint safely and convert it to our key layout.

    A state dict (bare or nested) is read with ``weights_only=True``. A whole pickled module
    (``torch.save(model)``, e.g. the official ``CustomCLIP``), which that refuses, is read by the restricted
    unpickler of :mod:`~pyiqa_grmp.archs.pickled_module`: tensors only, no code imported or executed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'GRMP-IQA checkpoint not found: {path}')
    raw, container = _read_safely(path)
    state = _strip_module_prefix(_unwrap(raw, path))
    if _is_official(state):
        return convert_official_state_dict(_half_to_float(state), path, container)
    return GRMPCheckpoint(path=path, source='pyiqa_grmp', state_dict=state, container=container)

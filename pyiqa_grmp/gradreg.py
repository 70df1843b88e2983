"""Quality-aware gradient regularization of GRMP-IQA, as a pure function over per-parameter gradients."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

MODES = ('official', 'prograd', 'none')


def regularize_gradients(task_grads: Sequence[Optional[torch.Tensor]],
                         semantic_grads: Sequence[Optional[torch.Tensor]],
                         lam: float = 5.0, mode: str = 'official') -> List[Optional[torch.Tensor]]:
    """Combine the quality-task gradient g_d with the semantic (scene) gradient g_g, tensor by tensor.

    - ``'official'`` (what the official code does): where <g_d, g_g> > 0, return
      g_d - lam * <g_d, g_g> / ||g_g||^2 * g_g, else g_d. With lam = 1 that removes the component of g_d along
      g_g; the default lam = 5 over-projects (the component becomes -4 times its size).
    - ``'prograd'`` (ProGrad): the same projection, applied only where <g_d, g_g> < 0 (conflict).
    - ``'none'``: g_d unchanged.

    The semantic gradient only gives a direction; it is never added to the update. ``None`` means a zero
    gradient; a zero or missing g_g leaves g_d unchanged. Returns one entry per parameter (None where g_d is None).
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if len(task_grads) != len(semantic_grads):
        raise ValueError(f'got {len(task_grads)} task gradients but {len(semantic_grads)} semantic gradients')
    result: List[Optional[torch.Tensor]] = []
    for index, (g_d, g_g) in enumerate(zip(task_grads, semantic_grads)):
        if g_d is None or g_g is None or mode == 'none':
            result.append(g_d)
            continue
        if g_d.shape != g_g.shape:
            raise ValueError(f'gradient {index}: task shape {tuple(g_d.shape)} != semantic {tuple(g_g.shape)}')
        dot = torch.sum(g_d.double() * g_g.double())
        norm_sq = torch.sum(g_g.double() * g_g.double())
        conflict_sign = 1 if mode == 'official' else -1
        if norm_sq == 0 or not bool(dot * conflict_sign > 0):
            result.append(g_d)
            continue
        result.append(g_d - (lam * dot / norm_sq).to(g_d.dtype) * g_g)
    return result

"""The two small prompt modules of GRMP-IQA, kept apart from the CLIP backbone (CoOp / VPT style)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn


class DeepVisualPrompts(nn.Module):
    """VPT-Deep prompts: ``num_tokens`` learned tokens for each of ``depth`` vision blocks.

    Each block's tokens pass through one shared linear projection (width -> width) and, in training mode,
    dropout with a fresh mask per sample. ``norm`` is the extra LayerNorm (eps 1e-6) that the official model
    applies after the last block, before CLIP's ``ln_post``.
    """

    def __init__(self, depth: int, num_tokens: int, width: int, patch_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f'num_visual_prompts must be >= 1, got {num_tokens}')
        self.embeddings = nn.Parameter(torch.empty(depth, num_tokens, width))
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        # Initialisation of the official code: uniform in +-sqrt(6 / (3 * patch^2 + width)), Kaiming (fan_out)
        # for the projection weight.
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
        nn.init.uniform_(self.embeddings, -bound, bound)
        nn.init.kaiming_normal_(self.proj.weight, mode='fan_out')

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[1]

    def tokens(self, layer: int, batch_size: Optional[int] = None) -> torch.Tensor:
        """Projected prompt tokens of one block: (P, D), or (B, P, D) with per-sample dropout when training."""
        projected = self.proj(self.embeddings[layer])
        if self.training and batch_size is not None:
            projected = projected.expand(batch_size, -1, -1)
        return self.dropout(projected)


class TextPromptLearner(nn.Module):
    """CoOp soft prompt: ``n_ctx`` context vectors shared by all classes, class name at the end.

    The prompt of class c reads ``[SOS] ctx_1 .. ctx_n <class name>. [EOS]``. Token embeddings of the fixed
    words are looked up from the backbone at every call, so nothing derived from the backbone is stored.
    """

    def __init__(self, class_names: Sequence[str], n_ctx: int, width: int,
                 tokenizer: Callable[[Sequence[str]], torch.Tensor]) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f'n_ctx must be >= 1, got {n_ctx}')
        if len(class_names) < 2:
            raise ValueError(f'class_names needs at least two classes, got {list(class_names)}')
        self.class_names = tuple(class_names)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(torch.empty(n_ctx, width))
        nn.init.normal_(self.ctx, std=0.02)
        placeholder = ' '.join(['X'] * n_ctx)
        token_ids = tokenizer([f'{placeholder} {name}.' for name in self.class_names])
        self.register_buffer('token_ids', token_ids, persistent=False)

    def forward(self, token_embedding: nn.Embedding) -> torch.Tensor:
        """Prompt embeddings (C, L, D) with the context vectors in place of the placeholders."""
        fixed = token_embedding(self.token_ids)
        ctx = self.ctx.to(fixed.dtype).unsqueeze(0).expand(len(self.class_names), -1, -1)
        return torch.cat([fixed[:, :1], ctx, fixed[:, 1 + self.n_ctx:]], dim=1)

"""An independent re-statement of the official GRMP-IQA model, for parity tests only.

Written from the description of the official code (LXDxmu/GRMP-IQA, ``CLIP/model.py`` VPTVisionTransformer and
``finetune.py`` CustomCLIP): sequence-first (L, N, D) OpenAI-style blocks, the official module names (so its
state dict has the official key layout), prompts inserted after CLS and replaced before every block, the extra
``prompt_norm`` before ``ln_post``, the normalised CLS as image feature, and CoOp prompts built from the stored
``token_prefix``/``token_suffix`` buffers. It deliberately shares no code with ``pyiqa_grmp``.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OfficialBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([('c_fc', nn.Linear(width, 4 * width)), ('gelu', QuickGELU()),
                                              ('c_proj', nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute, as in OpenAI CLIP

    def forward(self, x):  # x: (L, N, D)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OfficialTransformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[OfficialBlock(width, heads, attn_mask) for _ in range(layers)])


class OfficialVPTVisual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, out_dim, num_prompts):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OfficialTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))
        self.num_prompts = num_prompts
        bound = (6.0 / (3 * patch * patch + width)) ** 0.5
        self.prompt_embeddings = nn.Parameter(torch.empty(1, num_prompts, width).uniform_(-bound, bound))
        self.deep_prompt_embeddings = nn.Parameter(torch.empty(layers - 1, num_prompts, width).uniform_(-bound, bound))
        self.prompt_proj = nn.Linear(width, width)
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self.prompt_dropout = nn.Dropout(0.1)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        p = self.prompt_dropout(self.prompt_proj(self.prompt_embeddings).expand(n, -1, -1))
        x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1).permute(1, 0, 2)  # (L, N, D)
        for i, block in enumerate(self.transformer.resblocks):
            if i > 0:
                p = self.prompt_dropout(self.prompt_proj(self.deep_prompt_embeddings[i - 1]).expand(n, -1, -1))
                x = torch.cat([x[:1], p.permute(1, 0, 2), x[1 + self.num_prompts:]], dim=0)
            x = block(x)
        x = self.prompt_norm(x.permute(1, 0, 2))
        x = self.ln_post(x) @ self.proj
        return F.normalize(x[:, 0], dim=-1)


class OfficialTextEncoder(nn.Module):
    def __init__(self, vocab, context, width, layers, heads, out_dim):
        super().__init__()
        mask = torch.full((context, context), float('-inf')).triu(1)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.transformer = OfficialTransformer(width, layers, heads, attn_mask=mask)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, out_dim))

    def forward(self, prompts, token_ids):
        x = (prompts + self.positional_embedding).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), token_ids.argmax(-1)] @ self.text_projection


class OfficialPromptLearner(nn.Module):
    def __init__(self, n_ctx, width, token_ids, token_embedding):
        super().__init__()
        self.ctx = nn.Parameter(0.02 * torch.randn(n_ctx, width))
        with torch.no_grad():
            embedded = token_embedding(token_ids)
        self.register_buffer('token_prefix', embedded[:, :1].clone())
        self.register_buffer('token_suffix', embedded[:, 1 + n_ctx:].clone())
        self.token_ids = token_ids

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class OfficialCustomCLIP(nn.Module):
    """Official key layout: prompt_learner2.*, image_encoder.*, text_encoder.*, logit_scale."""

    def __init__(self, cfg, num_prompts, n_ctx, token_ids):
        super().__init__()
        v, t = cfg['vision_cfg'], cfg['text_cfg']
        self.image_encoder = OfficialVPTVisual(v['image_size'], v['patch_size'], v['width'], v['layers'],
                                               v['width'] // v['head_width'], cfg['embed_dim'], num_prompts)
        self.text_encoder = OfficialTextEncoder(t['vocab_size'], t['context_length'], t['width'], t['layers'],
                                                t['heads'], cfg['embed_dim'])
        self.prompt_learner2 = OfficialPromptLearner(n_ctx, t['width'], token_ids, self.text_encoder.token_embedding)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def image_features(self, image_224):
        return self.image_encoder(image_224)

    def forward(self, image_224):
        img = self.image_features(image_224)
        txt = F.normalize(self.text_encoder(self.prompt_learner2(), self.prompt_learner2.token_ids), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits.softmax(-1)[:, 0]


def perturb_1d_parameters(model, seed=0):
    """Make LayerNorms and biases non-trivial so that swapped or dropped ones change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
                p.add_(0.05 * torch.randn(p.shape, generator=generator))

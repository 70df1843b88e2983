"""GRMP-IQA architecture: open_clip CLIP + deep visual prompts + CoOp text prompts, scored as P("high quality").

Data flow: image (N, C, H, W) in [0, 1] -> :meth:`GRMPIQA.preprocess` (grey to RGB, bicubic resize, centre
crop, ImageNet normalisation) -> :meth:`GRMPIQA.encode_image` (prompted ViT, L2-normalised CLS) -> cosine
with the text features of the class prompts -> softmax -> score (N, 1).

Speed: the outputs at the prompt positions are never read (the next block overwrites them, and after the last
block only CLS is used), so prompts act only as extra keys and values. Those are image-independent in eval mode
and are computed once, like the text features, and the last block runs the CLS query alone.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import SquareResize, center_crop, random_crop_and_flip
from ..precision import PRECISION_DTYPES, autocast, check_precision
from ..pretrained import DEFAULT_BACKBONE, DEFAULT_VARIANT, get_variant, resolve_weights
from .checkpoint import (OFFICIAL_PROMPT_BUFFERS, BaseWeightsError, CheckpointMismatchError, GRMPCheckpoint,
                         UnsafeCheckpointError, mismatch_error, read_grmp_checkpoint, tensor_digest)
from .pickled_module import TorchScriptArchiveError
from ..model_folder import merge_network_options, read_model, read_safetensors
from .prompts import DeepVisualPrompts, TextPromptLearner

QUALITY_CLASS_NAMES = ('high quality', 'low quality')
#: The nine fixed scene prompts of the fine-tuning stage ("a photo of a {scene}"; the underscore is kept).
SCENE_NAMES = ('animal', 'cityscape', 'human', 'indoor', 'landscape', 'night', 'plant', 'still_life', 'others')

BackboneSpec = Union[str, Mapping]
#: Prefixes of the prompt tensors: what meta-training trains, and what a network built without GRMP weights
#: initialises at random.
PROMPT_PREFIXES = ('prompt_learner.', 'visual_prompts.')
#: At most this many bytes of input batches and their front tokens are kept (GRMPIQA.remember_frozen_front).
FRONT_CACHE_BYTES = 1 << 30
#: How deep the bases of compact checkpoints may refer to further compact checkpoints (a cycle stops here).
MAX_BASE_DEPTH = 8
_base_depth = [0]


def build_clip(backbone: BackboneSpec, pretrained: Optional[str], placeholder: bool = False) -> nn.Module:
    """Build an open_clip ``CLIP`` from a model name or a config dict, with weights from a tag, a file or none.

    ``placeholder``: the caller loads weights over it, so open_clip's "initialized randomly" warning, which
    would tell the user the opposite of what happens, is not shown.

    A dict is passed to ``open_clip.model.CLIP`` (``embed_dim``, ``vision_cfg``, ``text_cfg``; ``quick_gelu``
    defaults to True as for OpenAI weights); with a dict, ``pretrained`` can only be a local file. A local file
    is either open_clip/CLIP weights or a GRMP-IQA checkpoint, whose backbone (``clip.*``) is taken and whose
    prompts are left out, so that new prompts can be learned on the backbone of an earlier run.
    """
    import open_clip

    grmp_backbone = _grmp_backbone_state(pretrained)
    if grmp_backbone is not None:
        model = build_clip(backbone, None, placeholder=True)
        _load_strictly(model, grmp_backbone, pretrained)
        return model
    if isinstance(backbone, str):
        with _random_init_unannounced() if placeholder and pretrained is None else contextlib.nullcontext():
            return open_clip.create_model(backbone, pretrained=pretrained)
    if not isinstance(backbone, Mapping):
        raise TypeError(f'backbone must be an open_clip model name or a config dict, got {type(backbone).__name__}')
    config = dict(backbone)
    config.setdefault('quick_gelu', True)
    try:
        model = open_clip.model.CLIP(**config)
    except TypeError as error:
        raise ValueError(f'invalid backbone config {config}: {error}') from error
    if pretrained is not None:
        if not isinstance(pretrained, str) or not os.path.isfile(pretrained):
            raise ValueError(f'with a backbone config dict, backbone_pretrained must be a local file or None, '
                             f'got {pretrained!r}')
        open_clip.load_checkpoint(model, pretrained, weights_only=True)
    return model


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return 'initialized randomly' not in record.getMessage()


@contextlib.contextmanager
def _random_init_unannounced():
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger)."""
    quiet = _RandomInitFilter()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _grmp_backbone_state(path: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    """The ``clip.*`` tensors (prefix removed) when ``path`` is a GRMP-IQA checkpoint file, else None."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        checkpoint = read_grmp_checkpoint(path)
        state = checkpoint.state_dict
    except UnsafeCheckpointError as error:  # a hostile file is refused here, never handed on to open_clip
        if isinstance(error.__cause__, TorchScriptArchiveError):  # OpenAI's own CLIP weights: open_clip's job
            return None
        raise
    except CheckpointMismatchError:  # not a GRMP-IQA state dict: open_clip's job
        return None
    if checkpoint.applies_to is not None:  # compact: its tensors onto the base it names
        state = {**base_tensors(read_model(path)), **state}
    prefix = 'clip.'
    backbone = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return backbone or None


def _load_strictly(clip: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load the backbone of a GRMP-IQA checkpoint, naming every missing, unexpected or reshaped key."""
    expected = clip.state_dict()
    missing = [f'clip.{k}' for k in expected if k not in state]
    unexpected = [f'clip.{k}' for k in state if k not in expected]
    shapes = [f'clip.{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise mismatch_error(path, missing, unexpected, shapes,
                             hint='backbone_pretrained takes the backbone of this GRMP-IQA checkpoint, which must '
                                  'match the backbone config')
    clip.load_state_dict(state, strict=True)


def _local(path: Any, folders: bool = True) -> Any:
    """An existing local file (or folder) as an absolute path, so that it names the same file from anywhere;
    anything else (an open_clip tag, ``hf://...``, None) as given."""
    if isinstance(path, str) and (os.path.isfile(path) or (folders and os.path.isdir(path))):
        return os.path.abspath(path)
    return path


def describe_base(base: Mapping[str, Any]) -> str:
    """The base weights of a compact checkpoint's ``applies_to`` entry, in words."""
    if 'file' in base:
        return f'the stored base tensors {base["file"]} (beside the checkpoint, or at {base["path"]})'
    if base.get('pretrained'):
        source = base.get('pretrained_model_path') or f'the released weights {base.get("weights")!r}'
        return f'the GRMP-IQA weights {source}'
    return f'the backbone weights {base.get("backbone_pretrained")!r}'


def base_tensors(checkpoint: GRMPCheckpoint) -> Dict[str, torch.Tensor]:
    """The frozen tensors of the base that a compact checkpoint applies to: rebuilt from the weights it names
    (or read from the stored base file) and checked against its digest.

    Raises :class:`BaseWeightsError` naming the expected base when it is missing, and the expected and found
    digests when it differs.
    """
    reference = checkpoint.applies_to
    base, expected = reference['base'], reference['digest']
    where = (f'checkpoint {checkpoint.path} holds only the tensors training changed; they apply to '
             f'{describe_base(base)} (frozen tensors {expected})')
    if _base_depth[0] >= MAX_BASE_DEPTH:
        raise BaseWeightsError(f'{where}, whose base refers to further compact checkpoints more than '
                               f'{MAX_BASE_DEPTH} deep (a cycle?)')
    _base_depth[0] += 1
    try:
        if 'file' in base:
            beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint.path)), base['file'])
            candidates = list(dict.fromkeys([beside, base['path']]))
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is None:
                raise FileNotFoundError(f'{beside} does not exist' if len(candidates) == 1 else
                                        f'neither {beside} nor {base["path"]} exists')
            tensors = read_safetensors(found)
        else:
            tensors = GRMPIQA(**checkpoint.network, **base).state_dict()
    except BaseWeightsError:
        raise
    except OSError as error:  # FileNotFoundError, weights not in a cache while offline, a failed download
        raise BaseWeightsError(f'{where}, which are missing: {type(error).__name__}: {error}'.splitlines()[0] +
                               '. Put them back where they were, or load a full export of the model '
                               '(pyiqa-grmp export --full, made where the base is)') from error
    finally:
        _base_depth[0] -= 1
    frozen = {key: value for key, value in tensors.items() if key not in checkpoint.state_dict}
    found_digest = tensor_digest(frozen)
    if found_digest != expected:
        raise BaseWeightsError(f'{where}, but the base found there differs: its frozen tensors are {found_digest} '
                               f'({len(frozen)} tensors, {reference.get("tensors")} expected). It is not the base '
                               'this checkpoint was trained on')
    return frozen


def vit_features(visual: nn.Module, pixels: torch.Tensor,
                 prompt_keys_values: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 prompt_norm: Optional[nn.Module] = None,
                 front: Optional[Tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """Image features (N, E) of an open_clip ViT tower: the CLS token after the blocks, ``ln_post`` and ``proj``.

    With ``prompt_keys_values`` (one (keys, values) pair per block) the prompts join each block's attention as
    extra keys and values (VPT-Deep) and ``prompt_norm`` normalises the CLS token before ``ln_post``; without
    them these are open_clip's features of the plain tower (within float rounding), computed faster on a CPU than
    its ``nn.MultiheadAttention`` path, and the last block runs for the CLS token alone. ``front``: the tokens
    of ``pixels`` after the first blocks (:func:`vit_tokens`) and how many, to go on from.
    """
    blocks = visual.transformer.resblocks
    tokens, start = front if front is not None else (visual._embeds(pixels), 0)
    cls = vit_tokens(visual, tokens, prompt_keys_values, start, len(blocks))[:, 0]
    if prompt_norm is not None:
        cls = prompt_norm(cls)
    cls = visual.ln_post(cls)
    return cls @ visual.proj if visual.proj is not None else cls


def vit_tokens(visual: nn.Module, tokens: torch.Tensor,
               prompt_keys_values: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]], start: int,
               stop: int) -> torch.Tensor:
    """The tokens after blocks ``start`` to ``stop - 1`` of the tower (the last block keeps the CLS token only)."""
    blocks = visual.transformer.resblocks
    for layer in range(start, stop):
        keys, values = prompt_keys_values[layer] if prompt_keys_values is not None else (None, None)
        tokens = _vit_block(blocks[layer], tokens, keys, values, cls_only=layer == len(blocks) - 1)
    return tokens


def _vit_block(block: nn.Module, x: torch.Tensor, prompt_k: Optional[torch.Tensor] = None,
               prompt_v: Optional[torch.Tensor] = None, cls_only: bool = False,
               attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on batch-first tokens, with the prompts (if any) as extra
    keys/values (exactly VPT-Deep) and an additive ``attn_mask`` (the text tower's causal mask).

    Computed on the block's weights directly: ``nn.MultiheadAttention`` transposes its input to sequence-first,
    and on the CPU the projections of that strided tensor run as a batched product of the weight copied once
    per token position (77 copies of each text projection): measured at ViT-B/16 on 2 cores, a bf16 fine-tuning
    step of 50 shots took 16.0 s that way and 14.8 s this way."""
    attn = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    if cls_only:
        q = F.linear(h[:, :1], attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        k, v = F.linear(h, attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        x = x[:, :1]
    else:
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if prompt_k is not None:
        k = torch.cat([k, prompt_k.expand(batch, -1, -1)], dim=1)
        v = torch.cat([v, prompt_v.expand(batch, -1, -1)], dim=1)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, q.shape[1], width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _standard_block(block: nn.Module) -> bool:
    """Whether ``block`` computes what :func:`_vit_block` does: open_clip's ResidualAttentionBlock, self-attention
    through a biased ``nn.MultiheadAttention``."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, 'attn', None)
    return isinstance(block, ResidualAttentionBlock) and isinstance(attn, nn.MultiheadAttention) and \
        attn.in_proj_weight is not None and attn.in_proj_bias is not None and not hasattr(block, 'ln_1_kv')


def _check_backbone(clip: nn.Module) -> None:
    """Refuse open_clip variants whose computation the prompted and text forwards would not reproduce."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(clip, 'visual', None)
    problems = []
    if not hasattr(clip, 'token_embedding'):
        problems.append('the text tower must be the plain CLIP one (not CustomTextCLIP / HF text)')
    if not isinstance(visual, VisionTransformer):
        problems.append(f'the image tower must be an open_clip VisionTransformer, got {type(visual).__name__}')
    else:
        if visual.attn_pool is not None or visual.pool_type != 'tok' or visual.final_ln_after_pool:
            problems.append('the ViT must pool the CLS token (pool_type "tok", no attentional pool)')
        if not isinstance(visual.patch_dropout, nn.Identity):
            problems.append('patch dropout would drop tokens before the prompts are inserted')
        if not all(_standard_block(block) for block in visual.transformer.resblocks):
            problems.append('every vision block must be a standard ResidualAttentionBlock with biased '
                            'nn.MultiheadAttention')
    text = getattr(clip, 'transformer', None)
    if text is not None and not (getattr(text, 'batch_first', True) and
                                 all(_standard_block(block) for block in text.resblocks)):
        problems.append('every text block must be a standard batch-first ResidualAttentionBlock with biased '
                        'nn.MultiheadAttention')
    if getattr(clip, 'text_pool_type', 'argmax') != 'argmax':
        problems.append('the text tower must pool at the end-of-text token (pool_type "argmax")')
    if problems:
        raise ValueError('unsupported backbone for GRMP-IQA: ' + '; '.join(problems))


def _defaults() -> Dict[str, object]:
    return {name: p.default for name, p in inspect.signature(GRMPIQA.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _another_network(checkpoint: GRMPCheckpoint, total: int, missing: Sequence[str], unexpected: Sequence[str],
                     shapes: Sequence[str]) -> bool:
    """Whether a mismatch is that of a checkpoint of ours written for another network (reshaped tensors, or a
    tenth of the keys off), rather than a broken file; only for files that do not describe their network."""
    return checkpoint.source == 'pyiqa_grmp' and checkpoint.network is None and \
        (bool(shapes) or len(missing) + len(unexpected) > total // 10)


def _tokenizer_for(backbone: BackboneSpec, context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    if isinstance(backbone, str):
        return open_clip.get_tokenizer(backbone)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class GRMPIQA(nn.Module):
    """GRMP-IQA (Li et al., ICCV 2025): no-reference quality as P("high quality") from a prompted CLIP.

    Args:
        backbone: open_clip model name (default OpenAI ViT-B/16 with QuickGELU) or a config dict for
            ``open_clip.model.CLIP`` (small models for tests and experiments).
        backbone_pretrained: base CLIP weights (open_clip tag such as ``'openai'``, a local CLIP file, a GRMP-IQA
            checkpoint whose backbone is taken without its prompts, or None for random init). Used only when the
            GRMP checkpoint being loaded does not carry the backbone, or with ``pretrained=False``.
        num_visual_prompts: learned tokens per vision block (VPT-Deep).
        n_ctx: learned text context vectors shared by the classes (CoOp).
        class_names: the quality classes; the score is the probability of the first.
        scene_names: the scene classes whose logits the fine-tuning stage regularises against.
        prompt_dropout: dropout on the projected visual prompts in training mode.
        resize, crop, mean, std, antialias: preprocessing; None takes the weight variant's values.
        augment: in training mode, crop at random and flip (the official fine-tuning augmentation).
        pretrained: load GRMP weights (``pretrained_model_path`` or the ``weights`` variant); False loads none.
        pretrained_model_path: a model folder, ``hf://OWNER/NAME[@REVISION]`` (the hub cache, offline), a checkpoint
            written by this package (``{'params': ...}``) or an official one. A folder, and a checkpoint that carries
            its ``network`` options, supply the options from ``backbone`` to ``antialias`` (except
            ``prompt_dropout``); one given with another value than its default that contradicts them is an error.
        weights: name of the released variant in :data:`pyiqa_grmp.pretrained.WEIGHT_VARIANTS`.
        precision: ``fp32`` (exact), ``bf16`` or ``fp16``: autocast of the image and text towers (CUDA; bf16 also
            on CPU), cached prompt keys/values and text features in that dtype, the score in fp32.
    """

    def __init__(self,
                 backbone: BackboneSpec = DEFAULT_BACKBONE,
                 backbone_pretrained: Optional[str] = 'openai',
                 num_visual_prompts: int = 100,
                 n_ctx: int = 4,
                 class_names: Sequence[str] = QUALITY_CLASS_NAMES,
                 scene_names: Sequence[str] = SCENE_NAMES,
                 prompt_dropout: float = 0.1,
                 resize: Optional[int] = None,
                 crop: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 antialias: Optional[bool] = None,
                 augment: bool = True,
                 pretrained: bool = True,
                 pretrained_model_path: Optional[str] = None,
                 weights: str = DEFAULT_VARIANT,
                 precision: str = 'fp32') -> None:
        super().__init__()
        self._constants: Dict[str, Tuple[tuple, object]] = {}
        self._front_cache: Optional[List[Tuple[tuple, torch.Tensor, torch.Tensor]]] = None
        self.precision = precision
        checkpoint = None
        if pretrained:
            checkpoint = read_model(pretrained_model_path or resolve_weights(weights))
        if checkpoint is not None and checkpoint.network is not None:
            given = dict(backbone=backbone, num_visual_prompts=num_visual_prompts, n_ctx=n_ctx,
                         class_names=class_names, scene_names=scene_names, resize=resize, crop=crop, mean=mean,
                         std=std, antialias=antialias)
            described = merge_network_options(given, checkpoint.network, _defaults(), checkpoint.path)
            backbone, num_visual_prompts, n_ctx = described['backbone'], described['num_visual_prompts'], \
                described['n_ctx']
            class_names, scene_names = described['class_names'], described['scene_names']
            resize, crop, mean, std = described['resize'], described['crop'], described['mean'], described['std']
            antialias = described['antialias']
        variant = get_variant(weights)
        preprocessing = variant.preprocessing
        self.resize = int(resize if resize is not None else preprocessing.resize)
        self.crop = int(crop if crop is not None else preprocessing.crop)
        self.antialias = bool(preprocessing.antialias if antialias is None else antialias)
        self.augment = augment
        if self.crop > self.resize:
            raise ValueError(f'crop ({self.crop}) must not exceed resize ({self.resize})')
        mean = tuple(mean if mean is not None else preprocessing.mean)
        std = tuple(std if std is not None else preprocessing.std)
        self.register_buffer('pixel_mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('pixel_std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # A GRMP checkpoint normally carries the whole CLIP; base weights are fetched only when it does not.
        self.clip = build_clip(backbone, None if pretrained else backbone_pretrained, placeholder=bool(pretrained))
        _check_backbone(self.clip)
        visual = self.clip.visual
        if visual.image_size[0] != self.crop or visual.image_size[1] != self.crop:
            raise ValueError(f'crop ({self.crop}) must equal the backbone input size {tuple(visual.image_size)}')
        self.visual_prompts = DeepVisualPrompts(
            depth=len(visual.transformer.resblocks), num_tokens=num_visual_prompts,
            width=visual.transformer.width, patch_size=visual.patch_size[0], dropout=prompt_dropout)
        text_width = self.clip.token_embedding.embedding_dim
        tokenizer = _tokenizer_for(backbone, self.clip.context_length)
        self.prompt_learner = TextPromptLearner(class_names, n_ctx, text_width, tokenizer)
        self.scene_names = tuple(scene_names)
        self.register_buffer('scene_token_ids', tokenizer([f'a photo of a {s}' for s in self.scene_names]),
                             persistent=False)
        self._backbone, self._backbone_pretrained = backbone, backbone_pretrained
        if pretrained:
            self._weights_recipe: Dict[str, Any] = {'pretrained': True,
                                                    'pretrained_model_path': _local(pretrained_model_path),
                                                    'backbone_pretrained': _local(backbone_pretrained, False)}
            if pretrained_model_path is None:
                self._weights_recipe['weights'] = weights
            self._random_keys: Set[str] = set()
        else:
            self._weights_recipe = {'pretrained': False, 'backbone_pretrained': _local(backbone_pretrained, False)}
            self._random_keys = {k for k in self.state_dict() if backbone_pretrained is None
                                 or k.startswith(PROMPT_PREFIXES)}
        self._options = {'backbone': backbone, 'num_visual_prompts': int(num_visual_prompts), 'n_ctx': int(n_ctx),
                         'class_names': list(class_names), 'scene_names': list(self.scene_names),
                         'resize': self.resize, 'crop': self.crop, 'mean': [float(v) for v in mean],
                         'std': [float(v) for v in std], 'antialias': self.antialias}
        if checkpoint is not None:
            self._load_checkpoint(checkpoint, placeholder=True)

    def network_options(self) -> Dict[str, object]:
        """The options that rebuild this network (architecture and preprocessing), as plain data: what a
        checkpoint or a model folder carries so that its path alone loads it."""
        return copy.deepcopy(self._options)

    # ------------------------------------------------------------------------------------------------ loading
    def weights_source(self) -> Tuple[Dict[str, Any], Set[str]]:
        """Where this network's weights come from, as options of this class that rebuild them (absolute paths),
        and the names of the tensors initialised at random (which nothing rebuilds)."""
        return copy.deepcopy(self._weights_recipe), set(self._random_keys)

    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint of ours or an official one (converted), strictly, failing loudly on any mismatch.

        A compact checkpoint's tensors are applied onto this network when its other tensors are the base the
        checkpoint names (their digest matches, as on resume), else onto that base, rebuilt.
        """
        self._load_checkpoint(read_model(path))
        self._weights_recipe = {'pretrained': True, 'pretrained_model_path': _local(path),
                                'backbone_pretrained': _local(self._backbone_pretrained, False)}
        self._random_keys = set()

    def _onto_base(self, checkpoint: GRMPCheckpoint, placeholder: bool) -> GRMPCheckpoint:
        """A compact checkpoint completed with its base: this network's frozen tensors when they are that base
        (never for a ``placeholder``, a network built only to receive weights), else :func:`base_tensors`."""
        own = self.state_dict()
        trained = checkpoint.state_dict
        unexpected = [key for key in trained if key not in own]
        if unexpected:
            raise mismatch_error(checkpoint.path, unexpected=unexpected)
        frozen = {key: value for key, value in own.items() if key not in trained}
        if placeholder or tensor_digest(frozen) != checkpoint.applies_to['digest']:
            frozen = base_tensors(checkpoint)
        return dataclasses.replace(checkpoint, state_dict={**frozen, **trained}, applies_to=None)

    def _load_checkpoint(self, checkpoint: GRMPCheckpoint, placeholder: bool = False) -> None:
        """Load strictly; backbone tensors come from base weights only if the checkpoint carries none of them.

        The one tolerated gap is the official pre-training checkpoint, which lacks ``token_embedding.weight``.
        A compact checkpoint is first completed with its base (:meth:`_onto_base`).
        """
        if checkpoint.applies_to is not None:
            checkpoint = self._onto_base(checkpoint, placeholder)
        backbone, backbone_pretrained = self._backbone, self._backbone_pretrained
        expected = self.state_dict()
        state = dict(checkpoint.state_dict)
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        backbone_keys = [k for k in expected if k.startswith('clip.')]
        missing_backbone = [k for k in missing if k.startswith('clip.')]
        fill_from_base = bool(missing_backbone) and (
            len(missing_backbone) == len(backbone_keys) or missing_backbone == ['clip.token_embedding.weight'])
        if fill_from_base and not unexpected and len(missing_backbone) == len(missing):
            if backbone_pretrained is None:
                raise mismatch_error(checkpoint.path, missing=missing,
                                     hint='the checkpoint does not carry these backbone weights; pass '
                                          'backbone_pretrained (an open_clip tag or a local CLIP file)')
            base = build_clip(backbone, backbone_pretrained).state_dict()
            state.update({k: base[k[len('clip.'):]] for k in missing_backbone})
            missing = []
        shapes = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if missing or unexpected or shapes:
            if _another_network(checkpoint, len(expected), missing, unexpected, shapes):
                raise CheckpointMismatchError(
                    f'checkpoint {checkpoint.path} is for another GRMP-IQA network than the one built '
                    f'({len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} reshaped of '
                    f'{len(expected)} tensors, e.g. {(shapes or missing or unexpected)[0]}), and it does not say '
                    'which network it is (written before checkpoints carried their network options): pass the '
                    '`network:` options of its YAML (e.g. backbone, num_visual_prompts, resize, crop) as options '
                    'of the metric (create_metric arguments, or --metric-opt grmp_iqa:KEY=VALUE)')
            raise mismatch_error(checkpoint.path, missing=missing, unexpected=unexpected, shapes=shapes)
        self.load_state_dict(state, strict=True)
        self._check_prompt_buffers(checkpoint)

    def _check_prompt_buffers(self, checkpoint: GRMPCheckpoint) -> None:
        """The official token_prefix/suffix must equal our token embeddings of the same prompts."""
        if not checkpoint.prompt_buffers:
            return
        with torch.no_grad():
            fixed = self.clip.token_embedding(self.prompt_learner.token_ids)
        n_ctx = self.prompt_learner.n_ctx
        recomputed = {OFFICIAL_PROMPT_BUFFERS[0]: fixed[:, :1], OFFICIAL_PROMPT_BUFFERS[1]: fixed[:, 1 + n_ctx:]}
        for key, stored in checkpoint.prompt_buffers.items():
            ours = recomputed[key]
            if stored.shape != ours.shape or not torch.allclose(stored.float(), ours.float(), atol=1e-5):
                raise mismatch_error(checkpoint.path, shapes=[
                    f'{key}: does not equal the token embeddings of the prompts {self.prompt_learner.class_names} '
                    f'(checkpoint {tuple(stored.shape)} vs recomputed {tuple(ours.shape)})'],
                    hint='check class_names and n_ctx against the checkpoint')

    # ------------------------------------------------------------------------------------------- precision
    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16`` (see the class docstring); setting it drops the cached constants."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)
        self._constants.clear()

    def _autocast(self, device: torch.device):
        return autocast(self._precision, device.type)

    def _in_precision(self, value: torch.Tensor) -> torch.Tensor:
        dtype = PRECISION_DTYPES[self._precision]
        return value if dtype is None else value.to(dtype)

    # ---------------------------------------------------------------------------------------- eval constants
    def train(self, mode: bool = True) -> 'GRMPIQA':
        self._constants.clear()
        return super().train(mode)

    def _constant(self, name: str, dependencies: List[nn.Parameter], compute: Callable[[], object]) -> object:
        """Return ``compute()``, reusing the last value in eval mode while its inputs are unchanged.

        The key holds the precision and each dependency's storage, version counter, dtype and device, so an
        optimiser step, ``load_state_dict``, an in-place edit or a device move all invalidate it; ``train()``
        clears it. When
        gradients are wanted for the dependencies (grad mode on and any requires_grad) nothing is cached.
        Values are built under ``no_grad`` outside inference mode, so later autograd use cannot break on them.
        """
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in dependencies)):
            return compute()
        key = self._dependency_key(dependencies)
        hit = self._constants.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self._constants[name] = (key, value)
        return value

    def _dependency_key(self, dependencies: List[nn.Parameter], *extra: object) -> tuple:
        """What a cached value computed from ``dependencies`` depends on: the precision, ``extra``, and each
        dependency's storage, version counter, dtype and device."""
        return (self._precision, *extra, *((p.data_ptr(), p._version, p.dtype, p.device) for p in dependencies))

    def _text_dependencies(self) -> List[nn.Parameter]:
        clip = self.clip
        modules = (clip.token_embedding, clip.transformer, clip.ln_final)
        params = [p for m in modules for p in m.parameters()] + [clip.positional_embedding]
        if isinstance(clip.text_projection, nn.Parameter):
            params.append(clip.text_projection)
        elif clip.text_projection is not None:
            params.extend(clip.text_projection.parameters())
        return params

    # --------------------------------------------------------------------------------------------- text side
    def _encode_text_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """CLIP's text tower on token embeddings (causal mask, EOT pooling), L2-normalised."""
        clip = self.clip
        x = embeddings + clip.positional_embedding.to(embeddings.dtype)
        for block in clip.transformer.resblocks:
            x = _vit_block(block, x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        if isinstance(clip.text_projection, nn.Linear):
            x = clip.text_projection(x)
        elif clip.text_projection is not None:
            x = x @ clip.text_projection
        return F.normalize(x, dim=-1)

    def quality_text_features(self) -> torch.Tensor:
        """Normalised text features (C, E) of the learned quality prompts (in the precision's dtype)."""
        def compute() -> torch.Tensor:
            with self._autocast(self.prompt_learner.token_ids.device):
                embeddings = self.prompt_learner(self.clip.token_embedding)
                return self._in_precision(self._encode_text_embeddings(embeddings, self.prompt_learner.token_ids))

        return self._constant('quality_text', list(self.prompt_learner.parameters()) + self._text_dependencies(),
                              compute)

    def scene_text_features(self) -> torch.Tensor:
        """Normalised text features (S, E) of the fixed scene prompts, through this model's text tower."""
        def compute() -> torch.Tensor:
            with self._autocast(self.scene_token_ids.device):
                return self._in_precision(self._encode_text_embeddings(
                    self.clip.token_embedding(self.scene_token_ids), self.scene_token_ids))

        return self._constant('scene_text', self._text_dependencies(), compute)

    # ------------------------------------------------------------------------------------------- image side
    @property
    def fixed_input_resize(self) -> Optional[SquareResize]:
        """The resize that starts :meth:`preprocess`, for scoring to run ahead of time on float32 RGB images.

        None when the model computes in another dtype (the resize would then not be the same computation).
        An input already at the declared size passes :meth:`preprocess` unresized, so scoring an image resized
        by this value gives the same score as scoring the original.
        """
        if self.pixel_mean.dtype != torch.float32:
            return None
        return SquareResize(self.resize, self.antialias)

    def preprocess(self, x: torch.Tensor, random_crop: bool = False) -> torch.Tensor:
        """(N, 1|3, H, W) in [0, 1], any size -> normalised (N, 3, crop, crop) for the backbone.

        The centre crop is the official test path; ``random_crop`` (training) crops at a random offset and flips
        horizontally with probability 0.5, per sample.
        """
        if not torch.is_tensor(x):
            raise TypeError(f'GRMPIQA expects a torch.Tensor, got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(f'GRMPIQA expects a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[1] not in (1, 3):
            raise ValueError(f'GRMPIQA expects 1 (grey) or 3 (RGB) channels, got shape {tuple(x.shape)}')
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'GRMPIQA got an empty input of shape {tuple(x.shape)}')
        if not torch.isfinite(x).all():
            raise ValueError('GRMPIQA input contains NaN or Inf values')
        x = x.to(self.pixel_mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = SquareResize(self.resize, self.antialias)(x)
        x = random_crop_and_flip(x, self.crop) if random_crop else center_crop(x, self.crop)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel normalisation (ImageNet statistics by default) of a crop in [0, 1]."""
        return (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def _prompt_keys_values(self, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the keys and values that the prompt tokens contribute to attention."""
        def compute() -> List[Tuple[torch.Tensor, torch.Tensor]]:
            keys_values = []
            for layer, block in enumerate(self.clip.visual.transformer.resblocks):
                prompts = block.ln_1(self.visual_prompts.tokens(layer, batch_size))
                width = prompts.shape[-1]
                kv = F.linear(prompts, block.attn.in_proj_weight[width:], block.attn.in_proj_bias[width:])
                keys_values.append(tuple(self._in_precision(kv).chunk(2, dim=-1)))
            return keys_values

        dependencies = list(self.visual_prompts.parameters()) + [
            p for block in self.clip.visual.transformer.resblocks for p in (*block.ln_1.parameters(),
                                                                             block.attn.in_proj_weight,
                                                                             block.attn.in_proj_bias)]
        return self._constant('prompt_kv', dependencies, compute)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image features (N, E) from a preprocessed batch (under the precision's autocast)."""
        with self._autocast(x.device):
            keys_values = self._prompt_keys_values(x.shape[0])
            features = vit_features(self.clip.visual, x, keys_values, self.visual_prompts.norm,
                                    self._remembered_front(x, keys_values))
            return F.normalize(features, dim=-1)

    # ------------------------------------------------------------------------------ the frozen front, remembered
    def remember_frozen_front(self, enabled: bool = True) -> None:
        """Keep, per input batch, the image tokens after the leading vision blocks that nothing trains, and reuse
        them when the same batch comes again in eval mode while those blocks and the prompts are unchanged.

        For validation during fine-tuning: each round scores the same carve-out while only the last blocks
        train, so the front (two thirds of the tower in the paper's setting) runs once. Up to
        :data:`FRONT_CACHE_BYTES` of batches are kept (the first ones seen); ``False`` drops them, and enabling
        it again keeps what it holds.
        """
        if not enabled:
            self._front_cache = None
        elif self._front_cache is None:
            self._front_cache = []

    def _embedding_parameters(self) -> List[nn.Parameter]:
        """The vision tower's parameters before its blocks (patch embedding, class and position embeddings,
        ``ln_pre``)."""
        return [p for name, p in self.clip.visual.named_parameters()
                if not name.startswith(('transformer.', 'ln_post', 'proj'))]

    def _frozen_depth(self) -> int:
        """How many leading vision blocks no parameter of which (nor the embeddings' or the prompts') trains; at
        most all but the last."""
        visual = self.clip.visual
        if any(p.requires_grad for p in [*self._embedding_parameters(), *self.visual_prompts.parameters()]):
            return 0
        depth = 0
        for block in list(visual.transformer.resblocks)[:-1]:
            if any(p.requires_grad for p in block.parameters()):
                break
            depth += 1
        return depth

    def _remembered_front(self, x: torch.Tensor, keys_values) -> Optional[Tuple[torch.Tensor, int]]:
        """The front tokens of ``x`` (see :meth:`remember_frozen_front`), or None where it does not apply."""
        if self._front_cache is None or self.training or torch.is_grad_enabled():
            return None
        depth = self._frozen_depth()
        if depth == 0:
            return None
        visual = self.clip.visual
        dependencies = self._embedding_parameters()
        dependencies += [p for block in list(visual.transformer.resblocks)[:depth] for p in block.parameters()]
        dependencies += list(self.visual_prompts.parameters())
        key = self._dependency_key(dependencies, depth)
        self._front_cache[:] = [entry for entry in self._front_cache if entry[0] == key]
        for _, pixels, tokens in self._front_cache:
            if pixels.shape == x.shape and pixels.dtype == x.dtype and pixels.device == x.device and \
                    torch.equal(pixels, x):
                return tokens, depth
        tokens = vit_tokens(visual, visual._embeds(x), keys_values, 0, depth)
        held = sum(p.numel() * p.element_size() + t.numel() * t.element_size() for _, p, t in self._front_cache)
        if held + x.numel() * x.element_size() + tokens.numel() * tokens.element_size() <= FRONT_CACHE_BYTES:
            self._front_cache.append((key, x.clone(), tokens))
        return tokens, depth

    # ---------------------------------------------------------------------------------------------- scoring
    def forward(self, x: torch.Tensor, return_scene_logits: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Quality score (N, 1) in (0, 1), higher is better; with ``return_scene_logits`` also (N, S) logits.

        In training mode (with ``augment``) the crop is random and flipped, as in the official fine-tuning.
        """
        return self.score_pixels(self.preprocess(x, random_crop=self.training and self.augment),
                                 return_scene_logits)

    def score_pixels(self, pixels: torch.Tensor, return_scene_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` on an already preprocessed batch (so a teacher can see the very same crops).

        The towers run in the model's precision; the logits and the softmax in fp32 at least (autocast off), or
        in the weights' dtype when that is wider (a ``.double()`` model).
        """
        image_features = self.encode_image(pixels)
        quality_text = self.quality_text_features()
        scene_text = self.scene_text_features() if return_scene_logits else None
        dtype = torch.promote_types(self.clip.logit_scale.dtype, torch.float32)
        with torch.autocast(pixels.device.type, enabled=False):
            image_features = image_features.to(dtype)
            scale = self.clip.logit_scale.to(dtype).exp()
            score = (scale * image_features @ quality_text.to(dtype).t()).softmax(dim=-1)[:, :1]
            if not return_scene_logits:
                return score
            return score, scale * image_features @ scene_text.to(dtype).t()

"""One table of GRMP-IQA weight variants: file, source URL, backbone, preprocessing, licence, provenance.

Everything the package knows about a released checkpoint lives here, so the metric configuration, the
download path and the documentation cannot drift apart (the timm / open_clip "pretrained config" idea).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

#: open_clip name of the official backbone: OpenAI CLIP ViT-B/16, which uses QuickGELU (open_clip's plain
#: ``ViT-B-16`` uses GELU and only warns when OpenAI weights are loaded into it).
DEFAULT_BACKBONE = 'ViT-B-16-quickgelu'


@dataclass(frozen=True)
class Preprocessing:
    """How an image in [0, 1] is turned into the backbone's input.

    The official test path stores every image squashed to 244x244 (bicubic, aspect ratio not kept), crops the
    centre 224x224 (offset 10) and normalises with ImageNet statistics (not CLIP's).
    """

    resize: int = 244
    crop: int = 224
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    #: The official data preparation resizes with OpenCV's bicubic, which does not antialias.
    antialias: bool = False


@dataclass(frozen=True)
class WeightVariant:
    """A released GRMP-IQA checkpoint and everything needed to use it faithfully."""

    name: str
    metric_name: str
    file_name: str
    hf_repo: str
    backbone: str
    description: str
    licence: str
    provenance: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def url(self) -> str:
        """Download URL; honours ``HF_ENDPOINT`` (e.g. a mirror) at call time, as pyiqa does."""
        endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
        return f'{endpoint}/{self.hf_repo}/resolve/main/{self.file_name}'


WEIGHT_VARIANTS: Dict[str, WeightVariant] = {
    'livec_50shot': WeightVariant(
        name='livec_50shot',
        metric_name='grmp_iqa',
        file_name='clive_50_prompt_lda_5.0.pt',
        hf_repo='zzhowe/GRMP-IQA',
        backbone=DEFAULT_BACKBONE,
        description='GRMP-IQA fine-tuned on 50 images of LIVE Challenge (lambda = 5), as released by the authors',
        licence='MIT (LXDxmu/GRMP-IQA); the CLIP weights inside are OpenAI CLIP (MIT)',
        provenance=('Released by the authors on the Hugging Face repository zzhowe/GRMP-IQA, named in the README '
                    'of github.com/LXDxmu/GRMP-IQA. Its internal layout could not be inspected offline; the loader '
                    'accepts the official CustomCLIP state dict, bare or nested, with or without "module.", and the '
                    'whole pickled module, read without the official code and without executing anything.'),
    ),
}

DEFAULT_VARIANT = 'livec_50shot'


class WeightsNotFoundError(FileNotFoundError):
    """A released checkpoint is neither in pyiqa's weight cache nor downloadable."""


def get_variant(name: str) -> WeightVariant:
    """Look a weight variant up by name, with the known names in the error."""
    try:
        return WEIGHT_VARIANTS[name]
    except KeyError:
        raise KeyError(f'unknown GRMP-IQA weights {name!r}; known: {sorted(WEIGHT_VARIANTS)}') from None


def weights_cache_dir() -> str:
    """pyiqa's weight cache, ``$TORCH_HOME/hub/pyiqa`` (read at call time so a patched value is honoured)."""
    from pyiqa.utils import download_util

    return download_util.DEFAULT_CACHE_DIR


def resolve_weights(variant_name: str = DEFAULT_VARIANT) -> str:
    """Return a local path to a released checkpoint, downloading it into pyiqa's cache only if it is missing.

    A file already in the cache is returned without touching the network. With ``HF_HUB_OFFLINE=1`` no download
    is attempted. When the file cannot be had, the error says which file, from where, where to put it, and that
    ``pretrained_model_path=`` is the alternative.
    """
    variant = get_variant(variant_name)
    cache_dir = weights_cache_dir()
    cached = os.path.join(cache_dir, variant.file_name)
    if os.path.isfile(cached):
        return cached

    def not_found(reason: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(
            f'GRMP-IQA weights {variant.name!r} need the file {variant.file_name!r}, which is not in the weight '
            f'cache and {reason}.\n  Download it from {variant.url()}\n  and put it at {cached}\n'
            f'  (the cache folder is $TORCH_HOME/hub/pyiqa), or pass pretrained_model_path=/path/to/checkpoint '
            f'to create_metric.')

    if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
        raise not_found('HF_HUB_OFFLINE is set, so it was not downloaded')
    from pyiqa.utils.download_util import load_file_from_url

    try:
        return load_file_from_url(variant.url(), model_dir=cache_dir, file_name=variant.file_name)
    except Exception as error:  # network errors come in many types (URLError, OSError, HTTPError, ...)
        if os.path.exists(cached) and not os.path.getsize(cached):
            os.remove(cached)
        raise not_found(f'could not be downloaded ({type(error).__name__}: {error})') from error

"""The one place that registers pyiqa_grmp's types with pyiqa.

Every function here is idempotent: importing the package twice, reloading it, or pyiqa's entry-point discovery
calling these again never raises. Classes are registered lazily (by import path), so registering imports
neither open_clip nor the model code.
"""
from __future__ import annotations

from typing import Dict

from .pretrained import WEIGHT_VARIANTS

#: pyiqa registry -> {registered name: 'module:attribute'}.
LAZY_TYPES: Dict[str, Dict[str, str]] = {
    'arch': {'GRMPIQA': 'pyiqa_grmp.archs.grmp_arch:GRMPIQA'},
    'loss': {'GRMPQualityLoss': 'pyiqa_grmp.losses.grmp_losses:GRMPQualityLoss',
             'GRMPSceneLoss': 'pyiqa_grmp.losses.grmp_losses:GRMPSceneLoss'},
    'model': {'GRMPFinetuneModel': 'pyiqa_grmp.models.finetune_model:GRMPFinetuneModel',
              'GRMPMetaPromptModel': 'pyiqa_grmp.models.meta_model:GRMPMetaPromptModel'},
    'dataset': {'FewShotNRDataset': 'pyiqa_grmp.data.fewshot_dataset:FewShotNRDataset',
                'DistortionTaskDataset': 'pyiqa_grmp.data.task_dataset:DistortionTaskDataset'},
}


def _register_lazily(registry, name: str, import_path: str) -> None:
    # Look at the maps directly: `name in registry` would trigger entry-point loading, which calls us again.
    if name in registry._obj_map or name in registry._lazy_map:
        return
    registry.register_lazy(name, import_path)


def register_archs() -> None:
    """Register the GRMPIQA arch and the ``grmp_iqa`` metric entries of ``pyiqa.DEFAULT_CONFIGS``."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    _register_group('arch')
    for variant in WEIGHT_VARIANTS.values():
        # setdefault: never overwrite an entry that pyiqa itself may ship one day.
        DEFAULT_CONFIGS.setdefault(variant.metric_name, {
            'metric_opts': {'type': 'GRMPIQA', 'weights': variant.name, 'backbone': variant.backbone},
            'metric_mode': 'NR',
            'lower_better': False,
            'score_range': '0, 1',
        })


def _register_group(group: str) -> None:
    from pyiqa.utils import registry as pyiqa_registry

    target = getattr(pyiqa_registry, f'{group.upper()}_REGISTRY')
    for name, import_path in LAZY_TYPES[group].items():
        _register_lazily(target, name, import_path)


def register_losses() -> None:
    """Register GRMPQualityLoss and GRMPSceneLoss in pyiqa's LOSS_REGISTRY."""
    _register_group('loss')


def register_models() -> None:
    """Register the training models in pyiqa's MODEL_REGISTRY."""
    _register_group('model')


def register_datasets() -> None:
    """Register the datasets in pyiqa's DATASET_REGISTRY."""
    _register_group('dataset')


def register_all() -> None:
    """Register every pyiqa_grmp type with pyiqa."""
    register_archs()
    register_losses()
    register_models()
    register_datasets()

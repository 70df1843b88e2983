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
}


def _register_lazily(registry, name: str, import_path: str) -> None:
    # Look at the maps directly: `name in registry` would trigger entry-point loading, which calls us again.
    if name in registry._obj_map or name in registry._lazy_map:
        return
    registry.register_lazy(name, import_path)


def register_archs() -> None:
    """Register the GRMPIQA arch and the ``grmp_iqa`` metric entries of ``pyiqa.DEFAULT_CONFIGS``."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY

    for name, import_path in LAZY_TYPES['arch'].items():
        _register_lazily(ARCH_REGISTRY, name, import_path)
    for variant in WEIGHT_VARIANTS.values():
        # setdefault: never overwrite an entry that pyiqa itself may ship one day.
        DEFAULT_CONFIGS.setdefault(variant.metric_name, {
            'metric_opts': {'type': 'GRMPIQA', 'weights': variant.name, 'backbone': variant.backbone},
            'metric_mode': 'NR',
            'lower_better': False,
            'score_range': '0, 1',
        })


def register_all() -> None:
    """Register every pyiqa_grmp type with pyiqa."""
    register_archs()

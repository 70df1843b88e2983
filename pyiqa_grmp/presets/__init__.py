"""The paper's settings, shipped as package data (``presets/paper.yml``), read through the safe YAML reader."""
from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any, Dict

PAPER_FILE = 'paper.yml'


@functools.lru_cache(maxsize=1)
def _read() -> Dict[str, Any]:
    from ..options import load_yaml

    with resources.as_file(resources.files(__name__).joinpath(PAPER_FILE)) as path:
        return load_yaml(str(path))


def paper_settings(stage: str = None) -> Dict[str, Any]:
    """A fresh copy of the paper's settings: all of them, or one stage's (``'finetune'`` or ``'meta_pretrain'``)."""
    settings = _read() if stage is None else _read()[stage]
    return copy.deepcopy(settings)

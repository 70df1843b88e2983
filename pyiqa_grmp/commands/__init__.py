"""The ``pyiqa-grmp`` commands: argparse and printing only, one module per command, each over the Python API.

Every module has ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int`` (the exit status).
:mod:`pyiqa_grmp.cli` imports only the module of the command that runs; the table below is all it needs for the
list of commands.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Tuple

#: Command name -> (module in this package, one-line help), in the order ``pyiqa-grmp --help`` lists them.
COMMANDS: Dict[str, Tuple[str, str]] = {
    'score': ('score', 'score images with GRMP-IQA and any pyiqa metric'),
    'list': ('list_metrics', 'list the metric names, grmp_iqa included'),
    'compare': ('compare', 'compare metrics on labelled images'),
    'adapt': ('adapt', 'fine-tune GRMP-IQA on your labelled images, with a report'),
    'train': ('train', 'train from a pyiqa-style YAML (stops cleanly, resumes)'),
    'protocol': ('protocol', "the paper's few-shot protocol over random splits"),
    'make-synthetic': ('make_synthetic', 'write a small labelled dataset (offline)'),
    'demo': ('demo', 'score bundled photos, clean and distorted'),
    'export': ('export', 'write a checkpoint as a model folder to share (safetensors, config.json, model card)'),
    'merge': ('merge', 'read the per-shard parquet files of score --out into one table or CSV'),
}


def summary(name: str) -> str:
    """The one-line help of command ``name``."""
    return COMMANDS[name][1]


def load(name: str) -> ModuleType:
    """The module of command ``name`` (imported now, not before)."""
    return importlib.import_module(f'{__name__}.{COMMANDS[name][0]}')

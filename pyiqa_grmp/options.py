"""Training options as data: YAML read with a safe loader and ``--force_yml`` applied without ``exec``/``eval``.

pyiqa's own parser reads configs with PyYAML's full loader (a ``!!python/object/apply`` tag runs code) and applies
``--force_yml KEY:SUB=VALUE`` through ``exec`` of a string built from the key and ``eval`` of list values. Configs
are downloaded and shared, so here both are plain data: the YAML is read by a safe loader (``!!float``, ``~`` and
key order work as pyiqa's configs expect) and an override is a path of keys and a value parsed as safe YAML.
Everything else of pyiqa's ``parse_options`` (phases, paths, ``--debug``, ``num_gpu: auto``, seeding) is kept.
"""
from __future__ import annotations

import argparse
import os
import random
import re
from typing import Any, Dict, Sequence, Tuple

import torch
import yaml

#: A key of an override path: letters, digits, ``_``, ``-`` and ``.``; never quotes, brackets or spaces.
_KEY = re.compile(r'^[A-Za-z0-9_.\-]+$')


class ConfigError(ValueError):
    """A config file or an override is not plain data, or is malformed; raised before anything runs."""


def _safe_loader() -> type:
    return getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config as plain data; a python tag or any other non-data construct is a :class:`ConfigError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path} not found')
    with open(path, encoding='utf-8') as handle:
        try:
            data = yaml.load(handle, Loader=_safe_loader())
        except yaml.YAMLError as error:
            raise ConfigError(f'config {path} is not plain YAML data (python tags are refused): {error}') from error
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} must be a mapping of options, got {type(data).__name__}')
    return data


def parse_override_value(text: str) -> Any:
    """A ``--force_yml`` value as safe YAML; pyiqa's ``none`` (any case) also means null."""
    text = text.strip()
    if text.lower() == 'none':
        return None
    try:
        return yaml.load(text, Loader=_safe_loader())
    except yaml.YAMLError as error:
        raise ConfigError(f'--force_yml value {text!r} is not plain YAML data: {error}') from error


def apply_override(opt: Dict[str, Any], entry: str) -> None:
    """Apply one ``KEY:SUB=VALUE`` override in place; every key but the last must exist and hold a mapping."""
    keys_text, sep, value_text = entry.partition('=')
    if not sep:
        raise ConfigError(f'--force_yml {entry!r} is not of the form KEY:SUB=VALUE')
    keys = [key.strip() for key in keys_text.split(':')]
    bad = [key for key in keys if not _KEY.match(key)]
    if bad:
        raise ConfigError(f'--force_yml {entry!r}: key {bad[0]!r} is not a plain option name '
                          '(letters, digits, _, - and . only)')
    value = parse_override_value(value_text)
    node = opt
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            where = ':'.join(keys[:depth + 1])
            raise ConfigError(f'--force_yml {entry!r}: option {where} does not exist or is not a mapping')
        node = child
    node[keys[-1]] = value


def build_argument_parser() -> argparse.ArgumentParser:
    """The arguments pyiqa's training scripts take (``-opt``, ``--launcher``, ``--auto_resume``, ...)."""
    parser = argparse.ArgumentParser(prog='pyiqa-grmp train')
    parser.add_argument('-opt', required=True, help='training YAML')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None)
    return parser


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def prepare_options(opt: Dict[str, Any], args: argparse.Namespace, root_path: str, rank: int = 0,
                    world_size: int = 1) -> Dict[str, Any]:
    """pyiqa's option conventions on a parsed config: phases, ``num_gpu: auto``, debug name, paths, seeding."""
    from pyiqa.utils.options import make_paths

    expected = {'name': str, 'datasets': dict, 'path': dict}
    malformed = [key for key, kind in expected.items() if not isinstance(opt.get(key), kind)]
    if malformed:
        raise ConfigError(f'config {args.opt}: missing or malformed option(s) {malformed}')
    opt['dist'] = world_size > 1
    opt['rank'], opt['world_size'] = rank, world_size
    opt['auto_resume'] = bool(args.auto_resume)
    opt['is_train'] = True
    if opt.get('manual_seed') is None:
        opt['manual_seed'] = random.randint(1, 10000)
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt.get('num_gpu', 0) == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()
    opt.setdefault('num_gpu', 0)
    for phase, dataset in opt['datasets'].items():
        if not isinstance(dataset, dict):
            raise ConfigError(f'config {args.opt}: datasets.{phase} must be a mapping')
        dataset['phase'] = phase.split('_')[0]
    for key, value in opt['path'].items():
        if value is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = os.path.expanduser(value)
    make_paths(opt, root_path)
    seed_everything(int(opt['manual_seed']) + rank)
    return opt


def parse_training_argv(argv: Sequence[str]) -> Tuple[Dict[str, Any], argparse.Namespace]:
    """Parse ``argv``, read the YAML it names and apply its overrides: all checked before anything else runs."""
    args = build_argument_parser().parse_args(list(argv))
    opt = load_yaml(args.opt)
    for entry in args.force_yml or []:
        apply_override(opt, entry)
    return opt, args


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def dump_yaml(opt: Dict[str, Any]) -> str:
    """Options as YAML text (plain data only), key order kept."""
    return yaml.safe_dump(_deep_copy(opt), sort_keys=False, default_flow_style=None)

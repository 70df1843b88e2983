"""Training options as data: YAML read with a safe, bounded loader, ``--force_yml`` applied without ``exec``/``eval``,
and every option the loop reads checked before anything is built.

pyiqa's own parser reads configs with PyYAML's full loader (a ``!!python/object/apply`` tag runs code) and applies
``--force_yml KEY:SUB=VALUE`` through ``exec`` of a string built from the key and ``eval`` of list values. Configs
are downloaded and shared, so here both are plain data: the YAML is read by a safe loader (``!!float``, ``~`` and
key order work as pyiqa's configs expect) and an override is a path of keys and a value parsed as safe YAML. A
YAML text is bounded (:data:`MAX_CONFIG_BYTES`, :data:`MAX_CONFIG_NODES`, :data:`MAX_CONFIG_DEPTH`: alias bombs and
recursive aliases are refused before they expand), option names are text, an override names an option that exists
(or one with a default, :data:`OPTIONAL_OPTIONS`), and values have the kinds of :data:`OPTION_KINDS`, the experiment
name being one folder name.
Everything else of pyiqa's ``parse_options`` (phases, paths, ``--debug``, ``num_gpu: auto``, seeding) is kept.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml

#: A key of an override path: letters, digits, ``_``, ``-`` and ``.``; never quotes, brackets or spaces.
_KEY = re.compile(r'^[A-Za-z0-9_.\-]+$')

#: Bounds on what one YAML text may cost (a config file, an ``--override`` file, an override value). Training
#: configs are a few KB of a few hundred values; these leave orders of magnitude of room and refuse a "billion
#: laughs" file (aliases of aliases) in milliseconds, before its expansion exists anywhere.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB of YAML text
MAX_CONFIG_NODES = 100_000  # values of the result, each alias counted as the full copy it stands for
MAX_CONFIG_DEPTH = 64  # nesting of mappings and lists

#: Options that the training loop, pyiqa's parts or the models read with a default, so a config may leave them
#: out: an override may add these to their section; any other key must already exist there. ``datasets.*`` is
#: every dataset; ``train.optim`` also takes the parameters of its ``torch.optim`` optimizer.
OPTIONAL_OPTIONS: Dict[str, frozenset] = {
    '': frozenset({'num_gpu', 'manual_seed', 'val', 'logger', 'dist_params', 'find_unused_parameters'}),
    'train': frozenset({'total_epoch', 'total_iter', 'warmup_iter', 'scheduler', 'amp', 'trainable', 'grad_reg',
                        'lr_plateau', 'meta', 'quality_loss_opt'}),
    'val': frozenset({'save_img', 'pbar', 'key_metric', 'select_by'}),
    'logger': frozenset({'print_freq', 'save_checkpoint_freq', 'save_latest_freq', 'use_tb_logger', 'wandb'}),
    'path': frozenset({'pretrain_network', 'resume_state', 'strict_load', 'param_key_g'}),
    'datasets.*': frozenset({'batch_size_per_gpu', 'num_worker_per_gpu', 'use_shuffle', 'dataset_enlarge_ratio',
                             'prefetch_mode', 'pin_memory', 'persistent_workers', 'num_prefetch_queue'}),
}


class ConfigError(ValueError):
    """A config file or an override is not plain data, is malformed or too large; raised before anything runs."""


def _safe_loader() -> type:
    return getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_events(text: str, source: str) -> None:
    """Refuse text nesting deeper than :data:`MAX_CONFIG_DEPTH` or of more than :data:`MAX_CONFIG_NODES` values,
    from the parser's events, before composing (the C composer recurses per level: thousands of ``[`` would
    overflow its stack)."""
    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=_safe_loader())):
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f'{source} holds more than {MAX_CONFIG_NODES:,} values; a training config holds a few '
                              'hundred')
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f'{source} nests mappings and lists deeper than {MAX_CONFIG_DEPTH} levels '
                                  f'(line {event.start_mark.line + 1})')
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a composed document whose aliases refer to themselves, that nests deeper than
    :data:`MAX_CONFIG_DEPTH` (through aliases) or that expands to more than :data:`MAX_CONFIG_NODES` values.
    Each distinct node is visited once (the expanded size of a shared node is remembered), so checking a bomb
    costs its text, not its expansion."""
    sizes: Dict[int, int] = {}
    on_path = {id(root)}
    frames = [(root, iter(_children(root)), [1])]
    while frames:
        node, children, total = frames[-1]
        child = next(children, None)
        if child is None:
            frames.pop()
            on_path.discard(id(node))
            sizes[id(node)] = total[0]
            if frames:
                frames[-1][2][0] += total[0]
        elif id(child) in on_path:
            raise ConfigError(f'{source}: the alias on line {child.start_mark.line + 1} refers to a value that '
                              'contains it (a recursive alias); write the value out instead')
        elif id(child) in sizes:
            total[0] += sizes[id(child)]
        elif len(frames) >= MAX_CONFIG_DEPTH:
            raise ConfigError(f'{source} nests mappings and lists deeper than {MAX_CONFIG_DEPTH} levels '
                              f'(line {child.start_mark.line + 1})')
        else:
            on_path.add(id(child))
            frames.append((child, iter(_children(child)), [1]))
        if frames and frames[-1][2][0] > MAX_CONFIG_NODES:
            raise ConfigError(f'{source} expands to more than {MAX_CONFIG_NODES:,} values (aliases counted as the '
                              'copies they stand for); a training config holds a few hundred')


def _plain_tree(value: Any, source: str, where: str = '') -> Any:
    """A fresh copy of a loaded value (aliases become independent copies, so changing one option never changes
    another); every mapping key must be text."""
    if isinstance(value, dict):
        copied = {}
        for key, item in value.items():
            if not isinstance(key, str):
                place = f'under {where}' if where else 'at the top level'
                raise ConfigError(f'{source}: option names are text, but {place} there is the key {key!r} '
                                  f'({type(key).__name__}); quote it if it is meant as a name')
            copied[key] = _plain_tree(item, source, f'{where}.{key}' if where else key)
        return copied
    if isinstance(value, list):
        return [_plain_tree(item, source, f'{where}[{index}]') for index, item in enumerate(value)]
    return value


def load_yaml_text(text: str, source: str) -> Any:
    """Plain data from YAML text, within the bounds above; anything else is a :class:`ConfigError` naming
    ``source``. Nothing in the text can run code: the safe loader knows no python tags."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f'{source} is larger than {MAX_CONFIG_BYTES:,} bytes; a training config is a few KB')
    try:
        _check_events(text, source)
    except yaml.YAMLError as error:
        raise ConfigError(f'{source} is not plain YAML data (python tags are refused): {error}') from error
    loader = _safe_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        data = loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f'{source} is not plain YAML data (python tags are refused): {error}') from error
    finally:
        loader.dispose()
    return _plain_tree(data, source)


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config as plain data (see :func:`load_yaml_text`); it must be a mapping of options."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path} not found')
    with open(path, 'rb') as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as error:
        raise ConfigError(f'config {path} is not UTF-8 text: {error}') from None
    data = load_yaml_text(text, f'config {path}')
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} must be a mapping of options, got {type(data).__name__}')
    return data


def parse_override_value(text: str, flag: str = '--force_yml') -> Any:
    """An override value as safe YAML (bounded as a config); pyiqa's ``none`` (any case) also means null."""
    text = text.strip()
    if text.lower() == 'none':
        return None
    return load_yaml_text(text, f'{flag} value {text!r}')


def _check_keys(keys: Sequence[str], entry: str, flag: str) -> None:
    bad = [key for key in keys if not _KEY.match(key)]
    if bad:
        raise ConfigError(f'{flag} {entry!r}: key {bad[0]!r} is not a plain option name '
                          '(letters, digits, _, - and . only)')


def parse_metric_options(specs: Optional[Sequence[str]], flag: str = '--metric-opt') -> Dict[str, Dict[str, Any]]:
    """``NAME:KEY=VALUE`` strings (None: none) -> {NAME: {KEY: VALUE}}: keys are plain option names (as in an
    override) and values safe YAML (numbers, booleans, null, lists, dicts), bounded as a config."""
    options: Dict[str, Dict[str, Any]] = {}
    for spec in specs or ():
        name, sep, assignment = spec.partition(':')
        key, eq, value = assignment.partition('=')
        key = key.strip()
        if not (sep and eq and name and key):
            raise ConfigError(f'{flag} {spec!r} is not of the form NAME:KEY=VALUE')
        _check_keys([key], spec, flag)
        options.setdefault(name, {})[key] = load_yaml_text(value, f'{flag} {spec!r}: value')
    return options


def addable_options(opt: Dict[str, Any], section: Sequence[str]) -> frozenset:
    """Keys an override may add to ``section`` (a path of keys) that are not there yet: :data:`OPTIONAL_OPTIONS`,
    for ``train.optim`` the parameters of the optimizer it names, and for ``network`` those of the arch."""
    names = set(OPTIONAL_OPTIONS.get('.'.join(section), frozenset()))
    if list(section) == ['network']:
        names |= _arch_parameters(str((opt.get('network') or {}).get('type')))
    if len(section) == 2 and section[0] == 'datasets':
        names |= OPTIONAL_OPTIONS['datasets.*']
    if list(section) == ['train', 'optim']:
        optimizer = getattr(torch.optim, str((opt.get('train') or {}).get('optim', {}).get('type')), None)
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            names |= set(inspect.signature(optimizer.__init__).parameters) - {'self', 'params'}
    return frozenset(names)


def _arch_parameters(arch_type: str) -> frozenset:
    """The keyword options of a registered pyiqa arch (every one has a default), or none for an unknown type."""
    from pyiqa.utils.registry import ARCH_REGISTRY

    try:
        arch = ARCH_REGISTRY.get(arch_type)
    except KeyError:
        return frozenset()
    parameters = inspect.signature(arch).parameters.values()
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def apply_override(opt: Dict[str, Any], entry: str, flag: str = '--force_yml') -> None:
    """Apply one ``KEY:SUB=VALUE`` override in place.

    Every key but the last must exist and hold a mapping. The last must exist in that section too, or be an option
    the loop or a model reads with a default (:func:`addable_options`), so that a typo (``train:optim:lrr``) is
    refused, naming the keys the section has, instead of being added and silently ignored.
    """
    keys_text, sep, value_text = entry.partition('=')
    if not sep:
        raise ConfigError(f'{flag} {entry!r} is not of the form KEY:SUB=VALUE')
    keys = [key.strip() for key in keys_text.split(':')]
    _check_keys(keys, entry, flag)
    value = parse_override_value(value_text, flag)
    node = opt
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            where = '.'.join(keys[:depth + 1])
            raise ConfigError(f'{flag} {entry!r}: option {where} does not exist or is not a mapping; '
                              f'{_section_name(keys[:depth])} has: {", ".join(map(str, node)) or "nothing"}')
        node = child
    if keys[-1] not in node and keys[-1] not in addable_options(opt, keys[:-1]):
        addable = sorted(addable_options(opt, keys[:-1]) - set(node))
        raise ConfigError(f'{flag} {entry!r}: {_section_name(keys[:-1])} has no option {keys[-1]!r}; it has: '
                          f'{", ".join(map(str, node)) or "nothing"}'
                          + (f' (and may take: {", ".join(addable)})' if addable else ''))
    node[keys[-1]] = value


def _section_name(keys: Sequence[str]) -> str:
    return 'the config' if not keys else '.'.join(keys)


# ------------------------------------------------------------------------------------------ option values
@dataclass(frozen=True)
class Kind:
    """What an option's value must be: a description for messages and a test."""

    description: str
    accepts: Callable[[Any], bool]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_whole(value: Any) -> bool:
    """An int, or a float without a fraction (pyiqa's configs write counts as ``!!float 5e3``)."""
    return _is_number(value) and (isinstance(value, int) or value.is_integer())


def _whole(minimum: Optional[int] = None) -> Kind:
    bound = '' if minimum is None else f' >= {minimum}'
    return Kind(f'a whole number{bound}', lambda v: _is_whole(v) and (minimum is None or v >= minimum))


def _number(minimum: float, strict: bool = False) -> Kind:
    return Kind(f'a number {">" if strict else ">="} {minimum:g}',
                lambda v: _is_number(v) and (v > minimum if strict else v >= minimum))


def _plain_folder_name(value: Any) -> bool:
    return (isinstance(value, str) and value not in ('', '.', '..') and '/' not in value and '\\' not in value
            and not any(ord(char) < 32 for char in value) and not os.path.isabs(value))


TEXT = Kind('text', lambda v: isinstance(v, str))
TEXTS = Kind('a list of text', lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v))
MAPPING = Kind('a mapping', lambda v: isinstance(v, dict))
FLAG = Kind('true or false', lambda v: isinstance(v, bool))
ANY_NUMBER = Kind('a number', _is_number)
FOLDER_NAME = Kind('one folder name (it names experiments/<name>: not empty, not . or .., no / or \\, no control '
                   'characters)', _plain_folder_name)
GPUS = Kind('a whole number >= 0 or auto', lambda v: v == 'auto' or _whole(0).accepts(v))

#: (option, kind, required) for what the loop, pyiqa's parts and the models read, checked before anything is
#: built; ``*`` is every key of that mapping. An option that is not required may be absent or ``~`` (its default).
#: A child is checked only when its parent is a mapping.
OPTION_KINDS: Tuple[Tuple[str, Kind, bool], ...] = (
    ('name', FOLDER_NAME, True), ('model_type', TEXT, True), ('num_gpu', GPUS, False),
    ('manual_seed', _whole(), False),
    ('network', MAPPING, True), ('network.type', TEXT, True),
    ('path', MAPPING, True), ('path.pretrain_network', TEXT, False), ('path.resume_state', TEXT, False),
    ('datasets', MAPPING, True), ('datasets.train', MAPPING, True), ('datasets.*', MAPPING, True),
    ('datasets.*.name', TEXT, True), ('datasets.*.type', TEXT, True),
    ('datasets.train.batch_size_per_gpu', _whole(1), True), ('datasets.*.batch_size_per_gpu', _whole(1), False),
    ('datasets.*.num_worker_per_gpu', _whole(0), False), ('datasets.*.dataset_enlarge_ratio', _whole(1), False),
    ('datasets.*.use_shuffle', FLAG, False), ('datasets.*.pin_memory', FLAG, False),
    ('datasets.*.num_shots', _whole(1), False), ('datasets.*.split_seed', _whole(), False),
    ('datasets.*.num_val', _whole(0), False), ('datasets.*.train_ratio', _number(0, strict=True), False),
    ('train', MAPPING, True), ('train.optim', MAPPING, True), ('train.optim.type', TEXT, True),
    ('train.optim.lr', _number(0), True), ('train.optim.weight_decay', _number(0), False),
    ('train.optim.momentum', _number(0), False),
    ('train.total_epoch', _whole(0), False), ('train.total_iter', _whole(0), False),
    ('train.warmup_iter', _whole(), False), ('train.amp', TEXT, False),
    ('train.trainable', MAPPING, False), ('train.trainable.last_blocks', _whole(0), False),
    ('train.trainable.names', TEXTS, False),
    ('train.grad_reg', MAPPING, False), ('train.grad_reg.lam', ANY_NUMBER, False),
    ('train.grad_reg.temperature', _number(0, strict=True), False), ('train.grad_reg.mode', TEXT, False),
    ('train.lr_plateau', MAPPING, False), ('train.lr_plateau.factor', _number(0, strict=True), False),
    ('train.lr_plateau.patience', _whole(0), False), ('train.lr_plateau.min_iter', _whole(0), False),
    ('train.lr_plateau.min_lr', _number(0), False),
    ('train.meta', MAPPING, False), ('train.meta.mode', TEXT, False), ('train.meta.outer_step', ANY_NUMBER, False),
    ('train.meta.support_ratio', ANY_NUMBER, False), ('train.meta.support_batch', _whole(1), False),
    ('train.meta.query_batch', _whole(1), False), ('train.meta.seed', _whole(), False),
    ('val', MAPPING, False), ('val.val_freq', _whole(1), False), ('val.metrics', MAPPING, False),
    ('val.select_by', TEXTS, False), ('val.key_metric', TEXT, False),
    ('logger', MAPPING, False), ('logger.print_freq', _whole(1), False),
    ('logger.save_checkpoint_freq', _number(0, strict=True), False),
    ('logger.save_latest_freq', _number(0, strict=True), False), ('logger.use_tb_logger', FLAG, False),
)


def _options_at(opt: Dict[str, Any], pattern: str) -> Iterator[Tuple[str, bool, Any]]:
    """(dotted name, present, value) of every option ``pattern`` names whose parent is a mapping."""
    *parents, last = pattern.split('.')
    nodes: List[Tuple[str, Any]] = [('', opt)]
    for part in parents:
        nodes = [(f'{where}{key}.', node[key]) for where, node in nodes if isinstance(node, dict)
                 for key in (node if part == '*' else [part] if part in node else [])]
    for where, node in nodes:
        if isinstance(node, dict):
            for key in (node if last == '*' else [last]):
                yield f'{where}{key}', key in node and node[key] is not None, node.get(key)


def check_option_values(opt: Dict[str, Any], source: str) -> None:
    """Every option of :data:`OPTION_KINDS` of the right kind, and the required ones present: a
    :class:`ConfigError` naming ``source`` (e.g. ``config FILE``), each option and what it must be, before
    anything is built."""
    problems: Dict[str, str] = {}
    for pattern, kind, required in OPTION_KINDS:
        for name, present, value in _options_at(opt, pattern):
            if name in problems:
                continue
            if not present:
                if required:
                    problems[name] = f'{name} is missing (it must be {kind.description})'
            elif not kind.accepts(value):
                hint = ''
                if isinstance(value, str) and kind.description.startswith(('a number', 'a whole')):
                    with contextlib.suppress(ValueError):
                        float(value)
                        hint = f' (YAML reads {value} as text: write !!float {value}, or with a decimal point)'
                problems[name] = f'{name} must be {kind.description}, got {value!r} ({type(value).__name__}){hint}'
    if problems:
        raise ConfigError(f'{source}: malformed option(s) {list(problems)}: ' + '; '.join(problems.values()))


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
    """pyiqa's option conventions on options checked by :func:`parse_training_argv`: phases, ``num_gpu: auto``,
    debug name, paths, seeding."""
    from pyiqa.utils.options import make_paths

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
        dataset['phase'] = phase.split('_')[0]
    for key, value in opt['path'].items():
        if value is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = os.path.expanduser(value)
    make_paths(opt, root_path)
    seed_everything(int(opt['manual_seed']) + rank)
    return opt


def parse_training_argv(argv: Sequence[str]) -> Tuple[Dict[str, Any], argparse.Namespace]:
    """Parse ``argv``, read the YAML it names, apply its overrides and check the option values: all before
    anything else runs."""
    args = build_argument_parser().parse_args(list(argv))
    opt = load_yaml(args.opt)
    for entry in args.force_yml or []:
        apply_override(opt, entry)
    check_option_values(opt, f'config {args.opt}')
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

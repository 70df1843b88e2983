"""Model folders: a GRMP-IQA model as a folder anyone can load with its path alone, and the one reader of every
place a model's weights can come from.

A model folder holds three files:

- ``model.safetensors``: every tensor of the network (fp32, or fp16 with ``half``), no pickle anywhere (a
  model folder never depends on base weights, unlike the compact checkpoints training writes);
- ``config.json``: what ``create_metric`` needs (the network options: backbone, prompts, preprocessing), the
  score direction and range, the base weights it started from with their sha256, and the package version;
- ``README.md``: the model card (data, split sizes, held-out results, settings, intended use and limits, licence
  of the base weights, the lines that use it).

:func:`read_model` reads a model folder, a folder of the Hugging Face hub cache named ``hf://OWNER/NAME`` (or
``hf://OWNER/NAME@REVISION``; looked up offline, nothing is downloaded), a bare ``.safetensors`` file or a torch
checkpoint (through :func:`~pyiqa_grmp.archs.checkpoint.read_grmp_checkpoint`; a compact one, holding only the
tensors training changed, names its base in ``applies_to``, checked by :func:`check_applies_to`, and is applied
onto that base by :class:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA`). :func:`export` writes a model folder, or with
``full`` one file of the whole network. Nothing read executes code: the
config is bounded JSON, the safetensors header is bounded JSON checked (dtypes, shapes, offsets) before a tensor
is read, and the network options must be plain data of known names.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch

from .archs.checkpoint import COMPACT_FORMAT, CheckpointMismatchError, GRMPCheckpoint, read_grmp_checkpoint
from .checkpointing import atomic_torch_save, atomic_write, write_atomically
from .pretrained import WEIGHT_VARIANTS

if TYPE_CHECKING:
    from .archs.grmp_arch import GRMPIQA

FORMAT = 'pyiqa_grmp.model/1'
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
HF_PREFIX = 'hf://'
#: Bounds of what is read before anything is checked: config.json, and the JSON header of model.safetensors.
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
#: The options of :class:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA` that say what network a set of weights is for
#: (architecture and preprocessing); training-time (augment, prompt_dropout) and run-time (precision) ones are not.
NETWORK_OPTIONS = ('backbone', 'num_visual_prompts', 'n_ctx', 'class_names', 'scene_names', 'resize', 'crop', 'mean',
                   'std', 'antialias')
#: Tensor dtypes a model folder may hold (every parameter of the model is floating point), with their sizes.
SAFETENSORS_DTYPES = {'F32': 4, 'F16': 2, 'BF16': 2, 'F64': 8}
MAX_OPTION_DEPTH = 8
#: The options of :class:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA` that say where its weights come from: what a
#: compact checkpoint records to rebuild the base it applies to (with the network options).
WEIGHTS_OPTIONS = {'pretrained': (bool,), 'pretrained_model_path': (str, type(None)), 'weights': (str,),
                   'backbone_pretrained': (str, type(None))}
#: The file beside a run's checkpoints that holds the frozen tensors no file or tag re-creates (a random
#: initialisation), named by their digest.
STORED_BASE = re.compile(r'base-[0-9a-f]{16}\.safetensors')
FULL_EXPORT_FILE = 'model.pth'


class ModelFolderError(CheckpointMismatchError):
    """A model folder, a safetensors file or a network description cannot be used; the message names the file."""


# --------------------------------------------------------------------------------------- network options
def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_OPTION_DEPTH:
        raise ModelFolderError(f'{where}: nested deeper than {MAX_OPTION_DEPTH} levels')
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (list, tuple):
        for item in value:
            _check_plain(item, where, depth + 1)
        return
    if type(value) is dict and all(type(key) is str for key in value):
        for item in value.values():
            _check_plain(item, where, depth + 1)
        return
    raise ModelFolderError(f'{where}: holds a {type(value).__name__}, not plain data')


def check_network_options(options: Any, where: str) -> Dict[str, Any]:
    """The network options of a file (a mapping of :data:`NETWORK_OPTIONS` to plain data), checked."""
    if not isinstance(options, Mapping):
        raise ModelFolderError(f'{where}: the network options must be a mapping, got {type(options).__name__}')
    unknown = sorted(str(key) for key in options if key not in NETWORK_OPTIONS)
    if unknown:
        raise ModelFolderError(f'{where}: unknown network options {unknown}; known: {list(NETWORK_OPTIONS)}')
    _check_plain(dict(options), where)
    return {key: options[key] for key in NETWORK_OPTIONS if key in options}


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def merge_network_options(given: Mapping[str, Any], described: Mapping[str, Any], defaults: Mapping[str, Any],
                          source: str) -> Dict[str, Any]:
    """``given`` with the options ``described`` by the file filled in. An option given with a value other than its
    default that contradicts the file is an error naming both values (an option given at its default value cannot
    be told from one not given, and takes the file's)."""
    merged = dict(given)
    conflicts = []
    for name, value in described.items():
        ours = given.get(name, defaults.get(name))
        if _as_json(ours) != _as_json(defaults.get(name)) and _as_json(ours) != _as_json(value):
            conflicts.append(f'{name}={ours!r} given, {name}={value!r} in {source}')
        merged[name] = value
    if conflicts:
        raise ModelFolderError(f'the options given contradict the network that {source} describes: '
                               + '; '.join(conflicts) + '. Leave these options out: the file says what network it is')
    return merged


def check_applies_to(value: Any, where: str) -> Dict[str, Any]:
    """The ``applies_to`` entry of a compact checkpoint, checked: its format, the digest of the frozen tensors,
    and their base: ``{'file': NAME, 'path': PATH}`` (a stored base) or :data:`WEIGHTS_OPTIONS` to rebuild it."""
    _check_plain(value, where)
    if type(value) is not dict or value.get('format') != COMPACT_FORMAT:
        raise ModelFolderError(f'{where}: its applies_to entry is not a base reference of format {COMPACT_FORMAT!r}')
    if not isinstance(value.get('digest'), str) or not re.fullmatch(r'sha256:[0-9a-f]{64}', value['digest']):
        raise ModelFolderError(f'{where}: its applies_to entry has no sha256 digest of the base tensors')
    base = value.get('base')
    if type(base) is not dict:
        raise ModelFolderError(f'{where}: its applies_to entry does not say where the base weights come from')
    if 'file' in base:
        if set(base) != {'file', 'path'} or not isinstance(base['file'], str) or \
                not STORED_BASE.fullmatch(base['file']) or not isinstance(base['path'], str):
            raise ModelFolderError(f'{where}: its stored base must be {{file: base-HEX.safetensors, path: PATH}}, '
                                   f'got {base!r}')
    else:
        wrong = [key for key, item in base.items()
                 if key not in WEIGHTS_OPTIONS or not isinstance(item, WEIGHTS_OPTIONS[key])]
        if wrong:
            raise ModelFolderError(f'{where}: its base names unknown or ill-typed weight options {sorted(wrong)}; '
                                   f'known: {list(WEIGHTS_OPTIONS)}')
    return value


# ------------------------------------------------------------------------------------------------ reading
def hf_snapshot(spec: str) -> str:
    """The local folder of ``hf://OWNER/NAME[@REVISION]`` in the Hugging Face hub cache (``HF_HUB_CACHE``), looked
    up offline; FileNotFoundError saying how to fetch it when it is not there."""
    repo_id, _, revision = spec[len(HF_PREFIX):].partition('@')
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'{spec!r}: a Hugging Face model is named hf://OWNER/NAME or hf://OWNER/NAME@REVISION')
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get('HF_HUB_CACHE') or None
    try:
        return snapshot_download(repo_id=repo_id, revision=revision or None, cache_dir=cache_dir,
                                 local_files_only=True)
    except Exception as error:  # the hub raises several types for "not in the cache"
        raise FileNotFoundError(
            f'model {spec} is not in the Hugging Face cache ({cache_dir or "the default cache"}): '
            f'{type(error).__name__}. Fetch it once, e.g. `hf download {repo_id}` (or huggingface-cli download), '
            f'or pass the path of a model folder') from error


def _refuse(path: str, why: str) -> ModelFolderError:
    return ModelFolderError(f'{path} is not a safetensors file of GRMP-IQA weights: {why}; nothing in it was used')


def check_safetensors_header(path: str) -> Dict[str, dict]:
    """The tensor entries of a safetensors file's header, checked before any tensor is read: the header is bounded
    JSON, every tensor floating point with a shape whose size is exactly its byte range, every range inside the
    file."""
    size = os.path.getsize(path)
    with open(path, 'rb') as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _refuse(path, f'it has {size} bytes, fewer than a header')
        length = int.from_bytes(prefix, 'little')
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise _refuse(path, f'its header claims {length} bytes (at most {MAX_HEADER_BYTES} and the file size)')
        raw = file.read(length)
    try:
        header = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(path, 'its header is not JSON') from None
    if not isinstance(header, dict):
        raise _refuse(path, 'its header is not a JSON object')
    data_bytes = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
            raise _refuse(path, f'tensor {name!r} has no dtype, shape and data_offsets')
        dtype, shape, offsets = entry['dtype'], entry['shape'], entry['data_offsets']
        if dtype not in SAFETENSORS_DTYPES:
            raise _refuse(path, f'tensor {name!r} has dtype {dtype!r}; a GRMP-IQA tensor is one of '
                                f'{sorted(SAFETENSORS_DTYPES)}')
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise _refuse(path, f'tensor {name!r} has shape {shape!r}')
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets) or \
                not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            raise _refuse(path, f'tensor {name!r} has data offsets {offsets!r} outside the {data_bytes} data bytes')
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise _refuse(path, f'tensor {name!r} of shape {shape} {dtype} does not fill its byte range {offsets}')
        entries[name] = entry
    return entries


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header checked first (:func:`check_safetensors_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_header(path)
    try:
        return load_file(path, device='cpu')
    except SafetensorError as error:
        raise _refuse(path, str(error)) from error


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'model folder {os.path.dirname(path)} has no {CONFIG_FILE}')
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ModelFolderError(f'{path} is larger than {MAX_CONFIG_BYTES} bytes; a model config is a few KB')
    try:
        with open(path, 'rb') as file:
            config = json.loads(file.read().decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as error:
        raise ModelFolderError(f'{path} is not JSON: {error}') from error
    if not isinstance(config, dict) or config.get('format') != FORMAT:
        raise ModelFolderError(f'{path} is not a GRMP-IQA model config (its "format" must be {FORMAT!r})')
    config['network'] = check_network_options(config.get('network'), path)
    return config


def read_model_folder(folder: str) -> GRMPCheckpoint:
    """The weights and network options of a model folder (see the module docstring)."""
    config = _read_config(os.path.join(folder, CONFIG_FILE))
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'model folder {folder} has no {WEIGHTS_FILE}')
    return GRMPCheckpoint(path=folder, source='pyiqa_grmp', state_dict=read_safetensors(weights),
                          container='model folder', network=config['network'], base=config.get('base_weights'))


def read_model(path: str) -> GRMPCheckpoint:
    """The weights of a model folder, ``hf://OWNER/NAME[@REVISION]``, a ``.safetensors`` file or a checkpoint
    file, with the network options it carries (``network``, None when it says nothing of its network)."""
    path = os.fspath(path)
    if path.startswith(HF_PREFIX):
        path = hf_snapshot(path)
    if os.path.isdir(path):
        return read_model_folder(path)
    if path.endswith('.safetensors'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'GRMP-IQA weights not found: {path}')
        return GRMPCheckpoint(path=path, source='pyiqa_grmp', state_dict=read_safetensors(path),
                              container='safetensors')
    checkpoint = read_grmp_checkpoint(path)
    if checkpoint.network is not None:
        checkpoint.network = check_network_options(checkpoint.network, f'checkpoint {path}')
    _check_plain(checkpoint.base, f'checkpoint {path}')
    if checkpoint.applies_to is not None:
        checkpoint.applies_to = check_applies_to(checkpoint.applies_to, f'checkpoint {path}')
        if checkpoint.network is None:
            raise ModelFolderError(f'checkpoint {path} holds only the tensors training changed but does not say what '
                                   'network they belong to, so their base cannot be rebuilt')
    return checkpoint


def checkpoint_description(model: 'GRMPIQA', base: Optional[str]) -> Dict[str, Any]:
    """The entries beside ``params`` in a checkpoint of ``model`` (plain data, read with ``weights_only``): its
    network options and the weights it started from, so that its path alone loads it."""
    return {'network': model.network_options(), 'base': {'pretrained_model_path': base}}


# ------------------------------------------------------------------------------------------------ writing
def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def base_weights_entry(path: Optional[str]) -> Optional[dict]:
    """The base weights a model started from: file name, sha256 (when the file is here) and licence (from
    :data:`~pyiqa_grmp.pretrained.WEIGHT_VARIANTS` for a released checkpoint)."""
    if not path:
        return None
    name = os.path.basename(path)
    variant = next((v for v in WEIGHT_VARIANTS.values() if v.file_name == name), None)
    return {'file': name, 'sha256': sha256_of(path) if os.path.isfile(path) else None,
            'variant': variant.name if variant else None,
            'licence': variant.licence if variant else 'not known to pyiqa_grmp: that of the starting checkpoint'}


def build_config(model: 'GRMPIQA', *, half: bool, base: Optional[dict], labels: Optional[dict] = None) -> dict:
    """config.json of a model folder holding ``model``'s weights."""
    from . import __version__

    return {'format': FORMAT, 'metric': 'grmp_iqa', 'package': 'pyiqa_grmp', 'package_version': __version__,
            'network': model.network_options(), 'dtype': 'float16' if half else 'float32',
            'score': {'lower_better': False, 'range': [0.0, 1.0],
                      'meaning': 'probability of "high quality"; higher is better'},
            'labels': labels or {}, 'base_weights': base}


def _plain_tensors(tensors: Mapping[str, torch.Tensor], half: bool = False) -> Dict[str, torch.Tensor]:
    """CPU copies of ``tensors`` that own their storage (fp16 with ``half``), ready to be written."""
    copies = {key: value.detach().cpu().clone().contiguous() for key, value in tensors.items()}
    if half:
        copies = {key: value.half() if value.is_floating_point() else value for key, value in copies.items()}
    return copies


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], half: bool = False) -> None:
    """``tensors`` as a safetensors file (no pickle), written atomically."""
    from safetensors.torch import save as save_tensors

    data = save_tensors(_plain_tensors(tensors, half))
    atomic_write(path, lambda handle: handle.write(data))


def write_model_folder(out_dir: str, model: 'GRMPIQA', *, half: bool = False, base: Optional[dict] = None,
                       labels: Optional[dict] = None, summary: Optional[dict] = None) -> str:
    """Write ``model`` as a model folder (weights, config, card) into ``out_dir``, each file atomically."""
    config = build_config(model, half=half, base=base, labels=labels)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), model.state_dict(), half)
    write_atomically(os.path.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2) + '\n')
    write_atomically(os.path.join(out_dir, CARD_FILE), model_card(out_dir, config, summary))
    return out_dir


def _whole_model(checkpoint: str, network: Optional[Mapping[str, Any]]) -> Tuple[GRMPCheckpoint, 'GRMPIQA']:
    """The checkpoint as read, and its whole network with its weights (a compact checkpoint's applied onto its
    base). ``network``: the network options of a checkpoint that does not carry them."""
    from .archs.grmp_arch import GRMPIQA

    source = read_model(checkpoint)
    network = dict(network or {})
    options = check_network_options({k: v for k, v in network.items() if k in NETWORK_OPTIONS},
                                    'the network options given')
    if 'backbone_pretrained' in network:  # only for a checkpoint without the backbone (official pre-training)
        options['backbone_pretrained'] = network['backbone_pretrained']
    return source, GRMPIQA(**options, pretrained_model_path=checkpoint).eval()


def export_full_checkpoint(checkpoint: str, path: str, *, half: bool = False,
                           network: Optional[Mapping[str, Any]] = None) -> str:
    """Write every tensor of a checkpoint's network (a compact one's applied onto its base) into one file
    ``{'params': state_dict, 'network': ..., 'base': ...}`` that loads with its path alone and needs no base;
    ``torch.load(path, weights_only=True)`` reads it, and so does pyiqa's ``load_pretrained_network``."""
    source, model = _whole_model(checkpoint, network)
    base = dict(source.base) if source.base else {'pretrained_model_path': os.path.abspath(checkpoint)}
    atomic_torch_save({'params': _plain_tensors(model.state_dict(), half), 'network': model.network_options(),
                       'base': base}, path)
    return path


def export(checkpoint: str, out_dir: str, *, full: bool = False, half: bool = False,
           network: Optional[Mapping[str, Any]] = None) -> str:
    """Write a GRMP-IQA checkpoint (ours, compact or whole, official, a model folder or ``hf://OWNER/NAME``) in a
    form to share; returns the path written.

    By default ``out_dir`` becomes a model folder (model.safetensors, config.json, README.md) that
    ``create_metric('grmp_iqa', pretrained_model_path=out_dir)`` loads with no other option. ``full`` writes one
    file of the whole network instead (``out_dir`` itself when it ends with ``.pth``, else
    ``out_dir/model.pth``), for users who want a single file that needs no base weights. ``half`` stores fp16
    tensors. ``network``: the network options (the ``network:`` section of its training YAML) of a checkpoint
    written before checkpoints carried them.
    """
    checkpoint, out_dir = os.fspath(checkpoint), os.fspath(out_dir)
    if not checkpoint.startswith(HF_PREFIX) and not os.path.exists(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint} not found')
    if not full:
        return export_checkpoint(checkpoint, out_dir, half=half, network=network)
    path = out_dir if out_dir.endswith('.pth') else os.path.join(out_dir, FULL_EXPORT_FILE)
    return export_full_checkpoint(checkpoint, path, half=half, network=network)


def export_checkpoint(checkpoint: str, out_dir: str, *, half: bool = False,
                      network: Optional[Mapping[str, Any]] = None, summary: Optional[dict] = None) -> str:
    """Write the model folder of a checkpoint (ours or official, or a model folder). ``network`` gives the network
    options of a checkpoint that does not carry them (the ``network:`` section of its training YAML)."""
    source, model = _whole_model(checkpoint, network)
    base = dict(source.base or {})
    if 'file' not in base:  # a checkpoint names the file it started from; a model folder's config has the entry
        base = base_weights_entry(base.get('pretrained_model_path') or checkpoint)
    labels = None if summary is None else {'lower_better': summary['data']['lower_better']}
    return write_model_folder(out_dir, model, half=half, base=base, labels=labels, summary=summary)


# --------------------------------------------------------------------------------------------- model card
def _interval(row: Mapping, metric: str) -> str:
    low, high = row[f'{metric}_ci']
    return f'{row[metric]:.4f} [{low:.4f}, {high:.4f}]'


def precision_text(settings: dict) -> str:
    """The precision line of an adapt report and model card: what ran in which precision, and why."""
    precision = settings['precision']
    text = f'{precision} for training, validation and the held-out scores ({settings["precision_reason"]})'
    if precision != 'fp32':
        text += (f"; `create_metric` scores in fp32 unless given `precision='{precision}'`, which reproduces the "
                 'held-out scores')
    return text


def _results_lines(summary: Optional[dict]) -> List[str]:
    if summary is None:
        return ['## Data and held-out results', '',
                'Not recorded: this folder was exported from a checkpoint. `pyiqa-grmp adapt` writes a folder with '
                'its data, split and held-out results; measure this one on held-out images of your own before '
                'relying on it.', '']
    data, counts, results, settings = summary['data'], summary['split'], summary['results'], summary['settings']
    rows = [('starting model, zero-shot', results['before']), ('adapted (this model)', results['after']),
            ('gain (paired)', results['gain'])]
    direction = 'lower is better (DMOS; correlations use the negated labels)' if data['lower_better'] else \
        'higher is better'
    best = summary['training'].get('best')
    return [
        '## Data', '',
        f'- {data["description"]}: {data["num_images"]} labelled images, scores from {data["mos_min"]:g} to '
        f'{data["mos_max"]:g}, {direction}.',
        f'- Split (seed {settings["seed"]}): {counts["shots"]} shots for training, {counts["val"]} validation '
        f'carve-out (checkpoint choice), {counts["test"]} held-out test images, {counts["unused"]} unused.', '',
        f'## Held-out results ({counts["test"]} images never used for training or choosing the checkpoint)', '',
        '| model | SRCC [95 % CI] | PLCC [95 % CI] |', '|---|---|---|',
        *[f'| {label} | {_interval(row, "srcc")} | {_interval(row, "plcc")} |' for label, row in rows], '',
        f'Intervals: percentile bootstrap over {summary["bootstrap"]["resamples"]} resamples of the held-out images.',
        '', '## Settings', '',
        f'- Preset `{settings["preset"]}`' + (f', changed: {", ".join(settings["changed"])}' if settings['changed']
                                             else '') + '.',
        f'- {summary["training"]["iterations"]} training iterations on {settings["device"]}; checkpoint chosen at '
        + (f'iteration {best["iter"]} (carve-out SRCC {best["srcc"]:.4f}).' if best else 'the last validation.'),
        f'- Precision: {precision_text(settings)}.', '']


def model_card(folder: str, config: Mapping, summary: Optional[dict] = None) -> str:
    """The README.md of a model folder."""
    network, base = config['network'], config.get('base_weights') or {}
    backbone = f'`{network["backbone"]}`' if isinstance(network['backbone'], str) else \
        'a custom open_clip config (see config.json)'
    base_text = (f'`{base["file"]}` (sha256 `{base["sha256"]}`)' if base.get('sha256') else
                 f'`{base.get("file")}`') if base else 'not recorded'
    folder = os.path.abspath(folder)
    name = os.path.basename(folder)
    if name == 'model':  # adapt's RUN_DIR/model: name it with its run
        name = f'{os.path.basename(os.path.dirname(folder))}/{name}'
    return '\n'.join([
        f'# GRMP-IQA model `{name}`', '',
        'No-reference image quality from GRMP-IQA (Li et al., ICCV 2025) as a pyiqa metric: the score is the '
        'probability of "high quality", in (0, 1), higher is better. Written by pyiqa_grmp '
        f'{config["package_version"]}.', '',
        '## Use it', '', '```python', 'import pyiqa, pyiqa_grmp',
        f"metric = pyiqa.create_metric('grmp_iqa', pretrained_model_path='{name}')  # the path of this folder",
        'score = metric("photo.jpg")  # higher is better', '```', '', '```bash',
        f'pyiqa-grmp score grmp_iqa -t YOUR_IMAGES/ --metric-opt grmp_iqa:pretrained_model_path={name} '
        '--csv scores.csv', '```', '',
        'From the Hugging Face hub cache (after `hf download OWNER/NAME`): '
        "`pretrained_model_path='hf://OWNER/NAME'`; nothing is downloaded by the metric.", '',
        '## Network', '',
        f'- Backbone: {backbone}; {network["num_visual_prompts"]} visual prompts per block, {network["n_ctx"]} text '
        f'context vectors, classes {list(network["class_names"])}.',
        f'- Preprocessing: squashed to {network["resize"]}x{network["resize"]}, centre crop {network["crop"]}, '
        f'mean {list(network["mean"])}, std {list(network["std"])}.',
        f'- Weights: `{WEIGHTS_FILE}`, {config["dtype"]}, every tensor of the network (backbone included).', '',
        *_results_lines(summary),
        '## Intended use and limits', '',
        '- Ranking the quality of images like those it was adapted to (content, devices, distortions). Few-shot '
        'adaptation fits one collection: expect lower correlations on other kinds of images.',
        '- The score is not calibrated to any MOS scale; compare scores of this model with each other only.',
        '- Not for decisions about people, and not a measure of aesthetics or of content.', '',
        '## Licence', '',
        f'- Base weights: {base_text}; licence: {base.get("licence", "not recorded")}.',
        '- The adapted weights derive from the base weights and carry their licence terms; the data used to adapt '
        'them may add terms of their own.', ''])

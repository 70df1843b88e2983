"""Per-shard output: one parquet file per input shard, the run's metadata in it, completion, checks and merge.

``OUT/<shard>.parquet`` has the columns ``key``, one per metric (float64, null where it failed), ``error`` (the
failures of the row, as the score CSV's ``errors``), ``width``, ``height`` (of the decoded image; null when it
was not decoded) and the kept columns. Its key-value metadata (:data:`METADATA_KEY`, JSON) holds the run
(:func:`run_metadata`: metrics, their options, weights checksums, precision, preprocessing, input options,
package version), the shard (its source, image count and own failures) and the run's failures once, in full.

Completion: the parquet file itself is the marker. It is written whole with
:func:`~pyiqa_grmp.checkpointing.atomic_write` (temporary file, fsync, rename, fsync of the folder), so it exists
only once complete; a run killed mid-shard leaves at most a temporary ``.<shard>.parquet.<hex>.tmp`` beside it,
which the next run for that shard deletes before redoing the shard from scratch. A separate marker file would be
a second file to keep in step with the first for no added guarantee on a POSIX file system (datatrove needs one
because its outputs may live on object stores, where a rename is not atomic). ``OUT/_shards.json`` lists the
run's shards in order, so that :func:`merge_outputs` names the ones not done and keeps shard order.

A run is refused before scoring when a completed shard of ``OUT`` was scored with other settings
(:func:`check_same_run`, naming the difference); each run compares with its own completed shards and with the
first completed shard of the listing, so shards written one after another all agree, and :func:`merge_outputs`
refuses any mix two runs started at the same moment could still make.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checkpointing import atomic_write, write_atomically
from ..data.image_io import printable
from .collect import decode_path, encode_path
from .results import Failure, failure_text
from .shards import Shard

if TYPE_CHECKING:
    import pandas as pd

#: The key of this package's entry in a shard parquet's key-value metadata.
METADATA_KEY = b'pyiqa_grmp'
#: The listing of the run's shards, in ``OUT``.
LISTING_FILE = '_shards.json'
#: Run metadata entries that must be equal for shards to belong to one run (the package version is recorded
#: only: a new release that scores the same is welcome to finish a run).
COMPARED = ('metrics', 'metric_options', 'weights', 'precision', 'preprocessing', 'inputs')
OUTPUT_FORMAT = 1


# ------------------------------------------------------------------------------------------------ metadata
def weights_digest(metric: object) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a created metric's network tensors (sorted by name):
    the weights actually scored with, whatever file or hub they came from."""
    import torch

    net = getattr(metric, 'net', metric)
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f'{name}|{value.dtype}|{tuple(value.shape)}|'.encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b'')
    return digest.hexdigest()


def _preprocessing(metric: object) -> Optional[dict]:
    from .pipeline import declared_resize

    net = getattr(metric, 'net', None)
    described = {'declared_resize': repr(declared_resize(metric)) if declared_resize(metric) else None}
    options = getattr(net, 'network_options', None)
    if callable(options):
        described.update({k: v for k, v in options().items()
                          if k in ('resize', 'crop', 'mean', 'std', 'antialias')})
    return described


def _plain(value: object) -> object:
    """``value`` as JSON data (what is not JSON is written as its text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_metadata(metric_names: Sequence[str], metric_options: Mapping[str, Mapping[str, object]],
                 metrics: Mapping[str, object], precision: Optional[str], inputs: Mapping[str, object]) -> dict:
    """What a shard's scores depend on: metrics, options, the weights and preprocessing of each created metric
    (None for one that could not be), precision, the input options, and the package version."""
    from .. import __version__

    return _plain({
        'format': OUTPUT_FORMAT, 'package_version': __version__, 'metrics': list(metric_names),
        'metric_options': {name: dict(metric_options.get(name, {})) for name in metric_names},
        'weights': {name: weights_digest(metrics[name]) if name in metrics else None for name in metric_names},
        'preprocessing': {name: _preprocessing(metrics[name]) if name in metrics else None for name in metric_names},
        'precision': precision, 'inputs': dict(inputs)})


def differences(found: Mapping, current: Mapping, keys: Sequence[str] = COMPARED,
                labels: Tuple[str, str] = ('there', 'now')) -> List[str]:
    """The entries (``metrics``, ``weights.grmp_iqa``, ...) where two run metadata differ, with both values
    (``VALUE there, VALUE now``: ``labels`` name the two)."""
    def walk(a: object, b: object, where: str) -> List[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [line for key in sorted(set(a) | set(b)) for line in walk(a.get(key), b.get(key),
                                                                               f'{where}.{key}')]
        return [] if a == b else [f'{where[1:]}: {json.dumps(a)} {labels[0]}, {json.dumps(b)} {labels[1]}']

    lines = [line for key in keys for line in walk(found.get(key), current.get(key), f'.{key}')]
    metrics = [line for line in lines if line.startswith('metrics:')]
    return metrics or lines  # other metrics: their options and weights differ too, which says nothing more


def check_same_run(current: Mapping, completed: Mapping[str, Mapping], out_dir: str,
                   keys: Sequence[str] = COMPARED) -> None:
    """Refuse (ValueError naming the shard and the difference) when a completed shard's run differs from this."""
    for name, metadata in completed.items():
        found = differences(metadata['run'], current, keys)
        if found:
            raise ValueError(f'{printable(os.path.join(out_dir, name))}.parquet was scored with other settings: '
                             f'{"; ".join(found)}. Give another out folder, or delete its shards to rescore them')


# ------------------------------------------------------------------------------------------------- listing
def shard_source(shard: Shard) -> dict:
    """What identifies a shard's input: its file's name and size (not its folder, which machines may mount
    elsewhere), or for a part of a folder its image count and the sha256 of their paths."""
    if shard.kind != 'files':
        return {'kind': shard.kind, 'file': encode_path(os.path.basename(shard.path)),
                'bytes': os.path.getsize(shard.path)}
    digest = hashlib.sha256('\n'.join(encode_path(p) for p in shard.images).encode('utf-8')).hexdigest()
    return {'kind': 'files', 'images': len(shard.images), 'sha256': digest}


def check_listing(out_dir: str, shards: Sequence[Shard]) -> None:
    """Write ``OUT/_shards.json`` (the run's shards in order), or refuse when it lists other shards."""
    listing = {'format': OUTPUT_FORMAT, 'shards': [{'name': s.name, **shard_source(s)} for s in shards]}
    path = os.path.join(out_dir, LISTING_FILE)
    if os.path.exists(path):
        with open(path, encoding='utf-8') as handle:
            try:
                earlier = json.load(handle)
            except ValueError as error:
                raise ValueError(f'{printable(path)} is not a shard listing of this package ({error}): give '
                                 'another out folder') from error
        if earlier != listing:
            before = {s['name']: s for s in earlier.get('shards', [])}
            now = {s['name']: s for s in listing['shards']}
            changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
            raise ValueError(f'{printable(out_dir)} was made for other shards (listed in {LISTING_FILE}): '
                             f'{len(before)} there, {len(now)} now; they differ at {", ".join(changed[:5])}. Give '
                             'the same targets and shard_size, or another out folder')
        return
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(path, json.dumps(listing, indent=1) + '\n')


def output_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f'{name}.parquet')


def read_output_metadata(path: str) -> Optional[dict]:
    """The metadata of a shard output, or None when ``path`` is not one (absent, damaged, foreign)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        return None
    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # a damaged or foreign file is no completed shard
        return None


def remove_temporaries(out_dir: str, name: str) -> List[str]:
    """Delete the temporary files a run killed while writing shard ``name`` left (see the module docstring)."""
    if not os.path.isdir(out_dir):
        return []
    prefix = f'.{name}.parquet.'
    stale = [entry.name for entry in os.scandir(out_dir) if entry.name.startswith(prefix)
             and entry.name.endswith('.tmp') and not entry.is_dir(follow_symlinks=False)]
    for entry in stale:
        os.unlink(os.path.join(out_dir, entry))
    return stale


# ------------------------------------------------------------------------------------------------- writing
def write_shard_output(out_dir: str, shard: Shard, run: Mapping, rows: Sequence[Tuple[str, Dict[str, float], str,
                                                                                           Optional[int],
                                                                                           Optional[int]]],
                       columns: Mapping[str, object], shard_failures: Sequence[Failure],
                       run_failures: Sequence[Failure]) -> str:
    """Write ``OUT/<shard>.parquet`` atomically; ``rows`` are (key, scores, error text, width, height)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    metrics = run['metrics']
    data = {'key': pa.array([encode_path(r[0]) for r in rows], pa.string())}
    for metric in metrics:
        data[metric] = pa.array([r[1].get(metric) for r in rows], pa.float64())
    data['error'] = pa.array([r[2] for r in rows], pa.string())
    data['width'] = pa.array([r[3] for r in rows], pa.int32())
    data['height'] = pa.array([r[4] for r in rows], pa.int32())
    for name, values in columns.items():
        data[name if name not in data else f'input_{name}'] = values
    metadata = {'run': run, 'shard': {'name': shard.name, 'source': shard_source(shard), 'images': len(rows),
                                      'failures': [failure_text(f) for f in shard_failures]},
                'failures': [{'metric': f.metric, 'image': f.image, 'reason': f.reason} for f in run_failures]}
    table = pa.table(data).replace_schema_metadata({METADATA_KEY: json.dumps(_plain(metadata)).encode('utf-8')})
    path = output_path(out_dir, shard.name)
    atomic_write(path, lambda handle: pq.write_table(table, handle))
    return path


# --------------------------------------------------------------------------------------------------- merge
def merge_outputs(out_dir: str, allow_partial: bool = False) -> 'pd.DataFrame':
    """Every shard output of ``out_dir`` in one table: shard order (the listing's, then by name), then key order.

    Refused (ValueError naming them) while shards of the listing are not complete (no output yet, or a temporary
    file of a run killed or still going), unless ``allow_partial``; always refused when the shards were scored
    with other settings. ``attrs['metadata']`` holds the run's metadata, ``attrs['missing']`` the shards left out.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f'out folder {printable(out_dir)} does not exist')
    listing_path = os.path.join(out_dir, LISTING_FILE)
    listed: List[str] = []
    if os.path.exists(listing_path):
        with open(listing_path, encoding='utf-8') as handle:
            listed = [s['name'] for s in json.load(handle)['shards']]
    entries = os.listdir(out_dir)
    outputs = {name[:-len('.parquet')] for name in entries if name.endswith('.parquet') and not name.startswith('.')}
    in_progress = {name[1:].split('.parquet.', 1)[0] for name in entries
                   if name.startswith('.') and '.parquet.' in name and name.endswith('.tmp')}
    missing = [name for name in listed if name not in outputs or name in in_progress]
    missing += sorted(in_progress - set(missing))
    if missing and not allow_partial:
        raise ValueError(f'{printable(out_dir)}: {len(missing)} shard(s) not complete: '
                         f'{", ".join(printable(n) for n in missing[:10])}{" ..." if len(missing) > 10 else ""}; '
                         'finish the run (rerun it: completed shards are skipped), or pass allow_partial')
    order = [n for n in listed if n in outputs] + sorted(outputs - set(listed))
    frames, first = [], None
    for name in order:
        path = output_path(out_dir, name)
        metadata = read_output_metadata(path)
        if metadata is None:
            raise ValueError(f'{printable(path)} is not a shard output of this package: move it out of '
                             f'{printable(out_dir)}')
        if first is None:
            first = (name, metadata)
        else:
            found = differences(first[1]['run'], metadata['run'], labels=(f'in {first[0]}', f'in {name}'))
            if found:
                raise ValueError(f'{printable(out_dir)} mixes runs: {printable(first[0])} and {printable(name)} '
                                 f'differ: {printable("; ".join(found))}')
        frame = pq.read_table(path).to_pandas()
        frame['key'] = [decode_path(k) for k in frame['key']]
        frame.insert(0, 'shard', name)
        frames.append(frame.sort_values('key', kind='stable'))
    if not frames:
        raise ValueError(f'{printable(out_dir)} holds no completed shard')
    merged = pd.concat(frames, ignore_index=True)
    merged.attrs['metadata'] = first[1]['run']
    merged.attrs['missing'] = missing
    return merged

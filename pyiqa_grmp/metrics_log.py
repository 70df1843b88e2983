"""The metrics log of a training run: ``metrics.jsonl``, one JSON object per line, written while it trains.

Each record holds ``kind`` ('train' or 'val'), ``iter``, ``epoch``, ``lr`` and the values of that record (training
losses and batch metrics for 'train'; the validation metrics, ``dataset`` and ``improved`` for 'val'). A resumed
run appends again from its resume point, so an iteration may appear more than once; readers keep the last record
per (kind, dataset, iteration). Models write it; reports and plots (:mod:`pyiqa_grmp.reporting`) read it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List, Mapping, Tuple

METRICS_FILE = 'metrics.jsonl'


def _json_value(value: object) -> object:
    """Builtin JSON value of a number, tensor or numpy scalar; NaN and Inf become null (strict JSON)."""
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path`` and flushes it, so the log is readable while training runs."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: Mapping[str, object]) -> None:
        """Append ``record`` (numbers, strings, booleans; tensors and numpy scalars are converted)."""
        line = json.dumps({key: _json_value(value) for key, value in record.items()})
        with open(self.path, 'a') as stream:
            stream.write(line + '\n')
            stream.flush()


def read_metrics(path: str) -> List[dict]:
    """The records of a metrics log, the last one per (kind, dataset, iteration), in iteration order.

    A line that is not JSON (a run killed while writing it) is left out with a warning that counts them.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'metrics log {path} not found')
    latest: Dict[Tuple[str, str, int], dict] = {}
    broken = 0
    with open(path) as stream:
        for line in stream:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (str(record['kind']), str(record.get('dataset', '')), int(record['iter']))
            except (ValueError, KeyError, TypeError):
                broken += 1
                continue
            latest[key] = record
    if broken:
        warnings.warn(f'{path}: {broken} line(s) are not complete JSON records (cut short?) and were left out')
    return [latest[key] for key in sorted(latest, key=lambda k: (k[2], k[0], k[1]))]

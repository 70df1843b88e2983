"""The one place pyiqa metrics are created, for ``score``, ``compare`` and ``demo`` alike.

Before anything is created, every name must be a pyiqa metric and every option key one the metric takes (its
arch's ``__init__`` parameters and pyiqa's ``InferenceModel`` options; an arch taking ``**kwargs`` takes any), else
:class:`MetricRequestError` says which, with the close names or the valid keys. Each metric is then created
inside :func:`~pyiqa_grmp.trusted_loading.trusted_loading`, and with pyiqa's downloads watched: a file pyiqa cannot
download (no network, or ``HF_HUB_OFFLINE`` set: then no download is tried and pyiqa's "Downloading" line is not
printed) is a :class:`MissingWeightsError` naming the file, its URL and the folder to put it in.
"""
from __future__ import annotations

import builtins
import contextlib
import difflib
import inspect
import os
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..pretrained import WeightsNotFoundError
from .results import CREATION_FAILURE_PREFIX, Failure, ScoreReport

NameMap = Callable[[str], str]


class MetricRequestError(ValueError):
    """A metric name or option key that pyiqa does not know; raised before any metric is created."""


class MissingWeightsError(WeightsNotFoundError):
    """A file a pyiqa metric loads is not in the weight cache and cannot be downloaded."""

    def __init__(self, file_name: str, url: str, folder: str, reason: str, takes_path: bool) -> None:
        self.file_name, self.url, self.folder = file_name, url, folder
        alternative = ', or pass the metric option pretrained_model_path=FILE' if takes_path else ''
        super().__init__(f'the file {file_name} is not in {folder} and {reason}: put {file_name} (from {url}) into '
                         f'{folder}{alternative}')


def _identity(name: str) -> str:
    return name


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on')


# --------------------------------------------------------------------------------------------- the checks
def option_keys(pyiqa_name: str) -> Optional[frozenset]:
    """The option keys metric ``pyiqa_name`` takes, or None when it takes any (or its arch cannot be looked up)."""
    from pyiqa.archs import _lazy_import_arch
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.models.inference_model import InferenceModel
    from pyiqa.utils.registry import ARCH_REGISTRY

    arch_type = DEFAULT_CONFIGS[pyiqa_name]['metric_opts']['type']
    try:
        if arch_type not in ARCH_REGISTRY:
            _lazy_import_arch(arch_type)
        arch = ARCH_REGISTRY.get(arch_type)
    except Exception:  # an arch that cannot even be imported: creating the metric reports why
        return None
    arch_parameters = list(inspect.signature(arch.__init__).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in arch_parameters):
        return None
    parameters = arch_parameters + list(inspect.signature(InferenceModel.__init__).parameters.values())
    keys = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(keys - {'self', 'metric_name', 'device'})


def check_metric_requests(names: Sequence[str], options: Mapping[str, Mapping[str, object]],
                          pyiqa_name: NameMap = _identity) -> None:
    """Raise :class:`MetricRequestError` for the first name that is not a pyiqa metric or option key it does
    not take; ``pyiqa_name`` maps a row name (e.g. ``NAME@TAG``) to the name pyiqa knows."""
    import pyiqa

    known = pyiqa.list_models()
    for name in names:
        base = pyiqa_name(name)
        if base not in known:
            close = difflib.get_close_matches(base, known, n=3)
            listed = ' or '.join([', '.join(close[:-1]), close[-1]] if len(close) > 1 else close)
            hint = f'did you mean {listed}?' if close else 'pyiqa.list_models() names them all'
            raise MetricRequestError(f'unknown metric {name!r}: {hint}')
        given = sorted(options.get(name, {}))
        valid = option_keys(base) if given else None
        for key in given if valid is not None else ():
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f'did you mean {close[0]}? ' if close else ''
                raise MetricRequestError(f'metric {name!r} has no option {key!r}: {hint}its options are '
                                         f'{", ".join(sorted(valid))}')


# ----------------------------------------------------------------------------------------------- creation
@contextlib.contextmanager
def _watched_downloads(takes_path: bool) -> Iterator[None]:
    """pyiqa's file downloads inside this block: offline none is tried (nor announced), and one that fails is a
    :class:`MissingWeightsError`; pyiqa's own functions are restored on exit."""
    from pyiqa.utils import download_util

    download, offline = download_util.download_url_to_file, _offline()

    def watched(url: str, destination: str, *args, **kwargs):
        folder, file_name = os.path.split(destination)
        if offline:
            raise MissingWeightsError(file_name, url, folder, 'HF_HUB_OFFLINE is set, so it was not downloaded',
                                      takes_path)
        try:
            return download(url, destination, *args, **kwargs)
        except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError, ...)
            raise MissingWeightsError(file_name, url, folder, f'could not be downloaded ({type(error).__name__}: '
                                      f'{error})', takes_path) from error

    def quiet(*args, **kwargs):
        if not (args and str(args[0]).startswith('Downloading')):
            builtins.print(*args, **kwargs)

    download_util.download_url_to_file = watched
    if offline:  # its "Downloading" line would announce a download that is not tried
        download_util.print = quiet
    try:
        yield
    finally:
        download_util.download_url_to_file = download
        if offline:
            del download_util.print


def build_metrics(names: Sequence[str], options: Mapping[str, Mapping[str, object]], device: Optional[str],
                  pyiqa_name: NameMap = _identity) -> Tuple[Dict[str, object], Dict[str, Exception]]:
    """Check the requests (:func:`check_metric_requests`), then create every metric that can be.

    Returns the created metrics and, by name, why each other one could not be (the others are still created).
    """
    import pyiqa

    from ..trusted_loading import trusted_loading

    check_metric_requests(names, options, pyiqa_name)
    created: Dict[str, object] = OrderedDict()
    failed: Dict[str, Exception] = OrderedDict()
    for name in names:
        given = dict(options.get(name, {}))
        keys = option_keys(pyiqa_name(name))
        try:
            with trusted_loading(given), _watched_downloads(keys is None or 'pretrained_model_path' in keys):
                created[name] = pyiqa.create_metric(pyiqa_name(name), device=device, **given)
        except Exception as error:
            failed[name] = error
    return created, failed


def creation_failure_reason(error: Exception) -> str:
    """The reason a score report gives for a metric that could not be created."""
    return f'{CREATION_FAILURE_PREFIX}{type(error).__name__}: {error}'


def create_metrics(names: Sequence[str], options: Mapping[str, Mapping[str, object]], device: Optional[str],
                   report: ScoreReport, missing_references: Optional[str] = None,
                   pyiqa_name: NameMap = _identity) -> Dict[str, object]:
    """The metrics of a scoring run (:func:`build_metrics`); each one that cannot be is recorded in ``report``.

    ``missing_references`` (when the data has none) is the reason recorded for full-reference metrics.
    """
    created, failed = build_metrics(names, options, device, pyiqa_name)
    failures: List[Failure] = []
    metrics: Dict[str, object] = OrderedDict()
    for name in names:
        if name in failed:
            failures.append(Failure(name, None, creation_failure_reason(failed[name])))
        elif created[name].metric_mode == 'FR' and missing_references:
            failures.append(Failure(name, None, missing_references))
        else:
            metrics[name] = created[name]
    report.errors.extend(failures)
    return metrics

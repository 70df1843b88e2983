"""What a training run shows and keeps: its console progress and its log file.

pyiqa's root logger (``get_root_logger``) prints everything at INFO on the console (the options, the whole
architecture, one "Params ... will not be optimized" warning per frozen tensor: 207 lines at ViT-B/16) and gets
its file handler only on its first call in a process, so a second run in the same process (the protocol's
splits, the tests, a notebook) writes no log at all. :func:`run_log` fixes both for the length of one run,
without changing pyiqa: the run's own file gets every record, the console only warnings and errors (without the
per-parameter ones); pyiqa's handlers and level are put back afterwards.

:class:`TrainingProgress` is what the console shows instead: a bar on a terminal (iteration / total, elapsed
and remaining time, current losses, last validation metric), one line per validation otherwise (logs, CI).
:class:`MessageLogger` is pyiqa's, with an exact remaining-time count (pyiqa's reads ``-1 day, 23:59:59`` at
the last iteration).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import re
import sys
import time
from typing import IO, Dict, Iterator, List, Mapping, Optional

from pyiqa.utils import MessageLogger as PyiqaMessageLogger

#: pyiqa's record format, kept for the run's log file and console.
LOG_FORMAT = '%(asctime)s %(levelname)s: %(message)s'
#: pyiqa's ``GeneralIQAModel.setup_optimizers`` warns once per frozen parameter with this message.
_FROZEN_PARAMETER = re.compile(r'^Params \S+ will not be optimized\.$')


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative number of seconds (negative ones read 0:00:00)."""
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def remaining_seconds(elapsed: float, done: int, left: int) -> Optional[float]:
    """Time left for ``left`` iterations at the mean pace of the ``done`` ones; None before the first."""
    if done <= 0:
        return None
    return elapsed / done * max(0, left)


# ------------------------------------------------------------------------------------------------ the log
class _ConsoleHandler(logging.Handler):
    """Warnings and errors on the current ``sys.stderr``, above any progress bar; not pyiqa's per-parameter
    "will not be optimized" warnings (the log file keeps them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) and not _FROZEN_PARAMETER.match(record.getMessage())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record))
        except Exception:  # noqa: BLE001  (logging's own convention: report, never raise)
            self.handleError(record)


def write_line(text: str, stream: Optional[IO[str]] = None) -> None:
    """One line on ``stream`` (default: the current stderr) that does not break an active progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=stream if stream is not None else sys.stderr)


@contextlib.contextmanager
def run_log(log_file: Optional[str], rank: int = 0) -> Iterator[logging.Logger]:
    """pyiqa's logger, for the length of one run: every record at INFO and above into ``log_file`` (created,
    ``None``: no file), warnings and errors on the console. Other processes of a distributed run (``rank`` > 0)
    log errors only, as pyiqa does. pyiqa's own handlers and level come back at the end, and the file is closed.
    """
    from pyiqa.utils import get_root_logger

    logger = get_root_logger()  # initialised once per process by pyiqa; its handlers are set aside here
    saved_handlers, saved_level = logger.handlers[:], logger.level
    handlers: List[logging.Handler] = [_ConsoleHandler()]
    if rank == 0 and log_file is not None:
        file_handler = logging.FileHandler(log_file, 'w')
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(file_handler)
    logger.handlers = handlers
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    try:
        yield logger
    finally:
        logger.handlers = saved_handlers
        logger.setLevel(saved_level)
        for handler in handlers:
            handler.close()


def trainable_line(net) -> str:
    """``trainable: 12,345 of 149,620,737 parameters (prompt_learner, clip.transformer.resblocks.8-11, ...)``:
    what an optimizer over the tensors that require gradients changes, by module (blocks as ranges)."""
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in net.parameters())
    count = sum(p.numel() for _, p in trainable)
    groups: Dict[str, List[int]] = {}  # module (numbered blocks as '#') -> block numbers
    for name, _ in trainable:
        parts = name.split('.')
        number = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if number is None:
            groups.setdefault('.'.join(parts[:-1]) or name, [])
        else:
            blocks = groups.setdefault('.'.join(parts[:number] + ['#']), [])
            if int(parts[number]) not in blocks:
                blocks.append(int(parts[number]))
    names = []
    for module, blocks in groups.items():
        names.append(module.replace('#', _ranges(blocks)) if blocks else module)
    return f'trainable: {count:,} of {total:,} parameters ({", ".join(names)})'


def _ranges(numbers: List[int]) -> str:
    """[8, 9, 10, 11, 14] -> '8-11,14'."""
    numbers, parts, start = sorted(numbers), [], None
    for index, number in enumerate(numbers):
        start = number if start is None else start
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f'{start}-{number}')
            start = None
    return ','.join(parts)


class MessageLogger(PyiqaMessageLogger):
    """pyiqa's message logger (the log file's periodic lines, TensorBoard scalars) with an exact time estimate.

    pyiqa's estimate divides the time since ``start_iter`` by ``current - start_iter + 1`` iterations and
    multiplies by ``total - current - 1`` left: one iteration too many done and one too few left, so it reads
    ``-1 day, 23:59:59`` at the last iteration. Here ``first_iter`` is the first iteration this process runs
    (1, or the resumed iteration + 1) and ``total_iter`` the last one, and pyiqa's counts are shifted to match:
    done = current - first + 1, left = total - current (never negative).
    """

    def __init__(self, opt: dict, first_iter: int, total_iter: int, tb_logger=None) -> None:
        super().__init__(opt, start_iter=first_iter, tb_logger=tb_logger)
        self.total_iter = total_iter

    def __call__(self, log_vars: dict) -> None:
        self.max_iters = max(self.total_iter, int(log_vars['iter'])) + 1  # pyiqa subtracts current + 1
        super().__call__(log_vars)


# -------------------------------------------------------------------------------------------- the console
class TrainingProgress:
    """The console view of one training run (rank 0 only; other ranks show nothing).

    On a terminal: a bar ``NAME 12/48 [elapsed<remaining] l_quality=... val srcc=...``, updated every step. On
    anything else (a file, a pipe, CI): one line per validation, and one every ``print_freq`` iterations when the
    run has no validation, each with the same facts.
    """

    def __init__(self, name: str, total: int, start: int, key_metric: str = 'srcc', print_freq: int = 100,
                 validates: bool = True, enabled: bool = True, stream: Optional[IO[str]] = None) -> None:
        self.name, self.total, self.start, self.key_metric = name, int(total), int(start), key_metric
        self.print_freq, self.validates, self.enabled = max(1, int(print_freq)), validates, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.current, self.losses, self.lr = self.start, {}, None
        self.validation: Dict[str, Dict[str, float]] = {}  # dataset -> metric -> value, of the last validation
        self.best: Dict[str, Dict[str, object]] = {}  # dataset -> {'val', 'iter'} of the key metric
        self.started = time.monotonic()
        isatty = getattr(self.stream, 'isatty', None)
        self.bar = None
        if enabled and callable(isatty) and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc=name, unit='it', file=self.stream,
                            dynamic_ncols=True, leave=True)

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.enabled:
            write_line(text, self.stream)

    def step(self, current_iter: int, log: Mapping[str, float], lr: Optional[float] = None) -> None:
        """One training iteration done; ``log`` holds its losses (keys ``l_*``) among other values."""
        self.losses = {k: float(v) for k, v in log.items() if k.startswith('l_') and _is_number(v)}
        self.lr = lr
        advanced, self.current = current_iter - self.current, current_iter
        if self.bar is not None:
            self.bar.set_postfix_str(self._facts(with_position=False), refresh=False)
            self.bar.update(advanced)
        elif self.enabled and not self.validates and current_iter % self.print_freq == 0:
            self.note(self.line())

    def validated(self, current_iter: int, results: Mapping[str, Mapping[str, float]],
                  best: Mapping[str, Mapping[str, Mapping[str, object]]]) -> None:
        """A validation at ``current_iter``: ``results`` its metrics per dataset, ``best`` the model's record
        of the best results (pyiqa's ``best_metric_results``)."""
        self.validation = {d: {m: float(v) for m, v in r.items() if _is_number(v)} for d, r in results.items()}
        self.best = {d: dict(best[d][self.key_metric]) for d in results
                     if self.key_metric in (best.get(d) or {})}
        if self.bar is not None:
            self.bar.set_postfix_str(self._facts(with_position=False))
        elif self.enabled:
            self.note(self.line())

    def line(self) -> str:
        """Where the run is, as one line."""
        return f'{self.name}: {self._facts(with_position=True)}'

    def _facts(self, with_position: bool) -> str:
        parts = []
        if with_position:
            elapsed = time.monotonic() - self.started
            left = remaining_seconds(elapsed, self.current - self.start, self.total - self.current)
            parts.append(f'iter {self.current}/{self.total}  elapsed {format_duration(elapsed)}  '
                         f'remaining {"?" if left is None else format_duration(left)}')
        parts += [f'{name} {value:.4f}' for name, value in self.losses.items()]
        if self.lr is not None:
            parts.append(f'lr {self.lr:.2e}')
        for dataset, metrics in self.validation.items():
            if self.key_metric not in metrics:
                continue
            where = f' {dataset}' if len(self.validation) > 1 else ''
            text = f'val{where} {self.key_metric} {metrics[self.key_metric]:.4f}'
            best = self.best.get(dataset)
            if best and _is_number(best.get('val')):
                text += f' (best {float(best["val"]):.4f} at {best.get("iter")})'
            parts.append(text)
        return '  '.join(parts)

    def close(self) -> None:
        """End the bar (it stays on screen, at the iteration reached)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)

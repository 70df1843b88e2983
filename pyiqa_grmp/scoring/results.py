"""What scoring gives and the score CSV it is written to: typed failures, reports, the CSV format, the row log
that streams rows as batches finish, and the reading of rows back for ``resume``; format and parse live here only.

A score CSV has the columns ``image``, ``reference``, one per metric and ``errors``; one row per image. Paths are
written with :func:`~pyiqa_grmp.scoring.collect.encode_path`, scores with 6 significant digits (empty where
there is none), and ``errors`` joins the image's failures with `` | ``, each the reason, prefixed ``METRIC: ``
when one metric failed (see :func:`failure_text`; :func:`parse_failures` reads them back).
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..checkpointing import atomic_write
from ..data.image_io import NotARegularFileError, file_kind, open_regular_file, printable
from ..errors import InvalidArgument
from .collect import decode_path, encode_path

#: The longest field (characters) a score CSV read back may hold; a longer one means it is not a score CSV.
MAX_CSV_FIELD = 1 << 24
#: Separates the failures of one image in the ``errors`` column.
FAILURE_SEPARATOR = ' | '
#: How the reason of a metric that could not be created starts (:func:`~.metrics.creation_failure_reason`).
CREATION_FAILURE_PREFIX = 'cannot create metric: '
#: What the row of every image says of such a metric: its long reason is given once, in the run's failures.
NOT_CREATED = "metric not created (see the run's first failure)"


@dataclass(frozen=True)
class Failure:
    """Something that was not scored, and why.

    ``metric`` is None when the image failed as a whole (unreadable, no reference); ``image`` is None when the
    metric failed on every image (it cannot be created, or needs references the data lacks).
    """

    metric: Optional[str]
    image: Optional[str]
    reason: str

    @property
    def kind(self) -> str:
        """``'image'`` (the image, for every metric), ``'metric'`` (the metric, on every image) or ``'score'``."""
        if self.metric is None:
            return 'image'
        return 'metric' if self.image is None else 'score'


@dataclass
class ScoreReport:
    """Scores of every metric on every image, and every failure with its reason."""

    images: List[str]
    refs: Dict[str, str]
    metrics: List[str]
    scores: Dict[str, Dict[str, float]] = field(default_factory=dict)  # image -> metric -> score
    errors: List[Failure] = field(default_factory=list)

    def failures_of(self, image: str) -> List[Failure]:
        """The failures that concern ``image``: its own and those of metrics that failed on every image."""
        return [f for f in self.errors if f.image in (image, None)]

    def summary(self) -> List[Tuple[str, float, int, int]]:
        """(metric, mean score, images scored, images failed) per metric."""
        rows = []
        for metric in self.metrics:
            values = [s[metric] for s in self.scores.values() if metric in s]
            failed = len(self.images) - len(values)
            mean = sum(values) / len(values) if values else math.nan
            rows.append((metric, mean, len(values), failed))
        return rows


@dataclass
class ImageResult:
    """What scoring one image gave: its scores per metric, its failures, and the (width, height) it decoded to
    (None when it could not be read)."""

    index: int
    path: str
    scores: Dict[str, float] = field(default_factory=dict)
    errors: List[Failure] = field(default_factory=list)
    size: Optional[Tuple[int, int]] = None


# ------------------------------------------------------------------------------------------------ the format
def csv_header(metrics: Sequence[str]) -> List[str]:
    """The columns of a score CSV."""
    return ['image', 'reference', *metrics, 'errors']


def failure_text(failure: Failure) -> str:
    """How ``failure`` reads in the ``errors`` column: one line, its metric first when it has one."""
    text = failure.reason if failure.metric is None else f'{failure.metric}: {failure.reason}'
    return printable(text.replace('\r', ' ').replace('\n', ' '))


def row_failure(failure: Failure) -> Failure:
    """``failure`` as an image's row gives it: a metric that could not be created reads :data:`NOT_CREATED`, so
    that its reason (often a long message) is not copied into every row."""
    if failure.kind == 'metric' and failure.reason.startswith(CREATION_FAILURE_PREFIX):
        return Failure(failure.metric, failure.image, NOT_CREATED)
    return failure


def errors_text(failures: Sequence[Failure]) -> str:
    """The ``errors`` cell of an image with these failures (those of the image and of every image, in order)."""
    return FAILURE_SEPARATOR.join(failure_text(row_failure(f)) for f in failures)


def parse_failures(text: str, image: str, metrics: Sequence[str]) -> List[Failure]:
    """The failures of ``image`` that an ``errors`` cell holds (the inverse of :func:`failure_text`, up to the
    escaping it does for reading)."""
    failures = []
    for reason in text.split(FAILURE_SEPARATOR) if text else []:
        metric = next((m for m in metrics if reason.startswith(f'{m}: ')), None)
        failures.append(Failure(metric, image, reason if metric is None else reason[len(metric) + 2:]))
    return failures


def csv_row(image: str, reference: str, scores: Dict[str, float], metrics: Sequence[str],
            failures: Sequence[Failure]) -> List[str]:
    """The row of ``image``: its paths, its scores per metric and ``failures`` (those of the image and of every
    image, in that order)."""
    return [encode_path(image), encode_path(reference) if reference else '',
            *[f'{scores[m]:.6g}' if m in scores else '' for m in metrics],
            errors_text(failures)]


def parse_row(row: List[str], metrics: Sequence[str]) -> Tuple[Dict[str, float], List[Failure]]:
    """The scores and failures a row read by :func:`read_rows` holds."""
    scores = {m: float(v) for m, v in zip(metrics, row[2:-1]) if v != ''}
    return scores, parse_failures(row[-1], decode_path(row[0]), metrics)


def write_csv(report: ScoreReport, path: str) -> None:
    """One row per image: its scores per metric and the reasons of any failure (written atomically)."""
    rows = [csv_row(image, report.refs.get(image, ''), report.scores.get(image, {}), report.metrics,
                    report.failures_of(image)) for image in report.images]
    write_rows_atomically(path, csv_header(report.metrics), rows)


def write_rows_atomically(path: str, header: List[str], rows: Sequence[List[str]]) -> None:
    """The CSV written whole, atomically (see :func:`pyiqa_grmp.checkpointing.atomic_write`)."""
    data = _csv_bytes([header, *rows])
    atomic_write(path, lambda handle: handle.write(data))


def _csv_bytes(rows: Sequence[List[str]]) -> bytes:
    text = io.StringIO(newline='')
    csv.writer(text).writerows(rows)
    return text.getvalue().encode('utf-8')


# ------------------------------------------------------------------------------------------- files of a run
def part_file(csv_path: str, rank: int) -> str:
    """Where rank ``rank`` (> 0) of a parallel run appends its rows; rank 0 appends to ``csv_path`` itself."""
    return csv_path if rank == 0 else f'{csv_path}.part{rank}'


def existing_part_files(csv_path: str) -> List[str]:
    """Part files of earlier runs next to ``csv_path``."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    pattern = re.compile(re.escape(os.path.basename(csv_path)) + r'\.part[0-9]+$')
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if pattern.match(name))


def _complete_rows(path: str) -> bytes:
    """The bytes of a score CSV up to its last complete line (a killed run may leave half a row)."""
    try:
        with open_regular_file(path) as handle:
            data = handle.read()
    except NotARegularFileError as error:
        raise ValueError(f'the score CSV {error}') from error
    except OSError as error:
        raise ValueError(f'cannot read the score CSV {printable(path)}: {error.strerror or error}') from error
    return data[:data.rfind(b'\n') + 1]


#: What a refused score CSV asks for (``{name}``: the arguments, see :class:`~pyiqa_grmp.errors.InvalidArgument`).
OTHER_CSV = 'give another {csv_path}, or drop {resume} to overwrite it'


def refused_csv(detail: str) -> InvalidArgument:
    """The refusal of a score CSV (or part file) of ``csv_path`` as it is, with ``resume``."""
    return InvalidArgument('csv_path', detail, mentions=('resume',))


def read_rows(path: str, header: List[str]) -> Dict[str, List[str]]:
    """The complete rows of a score CSV or part file, as written, by the image they name (:func:`decode_path`).

    A file written for other columns, or that is not a score CSV (not UTF-8, NUL bytes, fields that are not
    CSV or too long, scores that are not numbers, bad path escapes), is an
    :class:`~pyiqa_grmp.errors.InvalidArgument` of ``csv_path`` (whose file or part file it is) naming the file
    and line.
    """
    data = _complete_rows(path)
    name = printable(path)
    refusal = 'it is not a score CSV written by this command: ' + OTHER_CSV
    if b'\x00' in data:
        raise refused_csv(f'{name} line {_line_at(data, data.index(0))} holds a NUL byte: {refusal}')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as error:
        raise refused_csv(f'{name} line {_line_at(data, error.start)} is not UTF-8 text: {refusal}') from error
    reader = csv.reader(io.StringIO(text, newline=''), strict=True)
    limit = csv.field_size_limit(MAX_CSV_FIELD)
    try:
        table = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise refused_csv(f'{name} line {reader.line_num}: {error}: {refusal}') from error
    finally:
        csv.field_size_limit(limit)
    if not table:
        return {}
    if table[0][1] != header:
        found = table[0][1][2:-1] if table[0][1][:2] == ['image', 'reference'] else table[0][1]
        raise refused_csv(f'{name} was written for the metrics {found}, not {header[2:-1]}: {OTHER_CSV}')
    rows: Dict[str, List[str]] = {}
    for number, row in table[1:]:
        if len(row) != len(header):
            raise refused_csv(f'{name} line {number} has {len(row)} fields instead of {len(header)}: it is not a '
                              'score CSV of these metrics')
        for metric, value in zip(header[2:-1], row[2:-1]):
            try:
                float(value or 0)
            except ValueError:
                raise refused_csv(f'{name} line {number}: the {metric} score {printable(value[:40])!r} is not a '
                                  f'number: {refusal}') from None
        try:
            image = decode_path(row[0])
            decode_path(row[1])
        except ValueError as error:
            raise refused_csv(f'{name} line {number}: {printable(str(error))}: {refusal}') from None
        rows.setdefault(image, row)
    return rows


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b'\n', 0, offset) + 1


class RowLog:
    """Rows appended to a CSV file and flushed as they come, after the header; resumes after the last full row.

    The file is never written through a symbolic link: a link at ``path`` is replaced by a regular file (that
    holds the rows of the link's file when resuming), and the link's target is left as it was.
    """

    def __init__(self, path: str, header: List[str], resume: bool) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keep = _complete_rows(path) if resume and os.path.exists(path) else b''
        if not keep or os.path.islink(path):
            start = keep or _csv_bytes([header])
            atomic_write(path, lambda handle: handle.write(start))
            keep = start
        try:  # a link or a FIFO put there meanwhile is refused, not followed or waited on
            descriptor = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ValueError(f'cannot write the score CSV {printable(path)}: {error.strerror}') from error
        kind = file_kind(os.fstat(descriptor).st_mode)
        if kind != 'regular file':
            os.close(descriptor)
            raise ValueError(f'cannot write the score CSV {printable(path)}: it is a {kind}')
        os.set_blocking(descriptor, True)
        self.handle = os.fdopen(descriptor, 'w', newline='', encoding='utf-8')
        self.handle.truncate(len(keep))
        self.handle.seek(len(keep))
        self.writer = csv.writer(self.handle)

    def append(self, rows: Sequence[List[str]]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

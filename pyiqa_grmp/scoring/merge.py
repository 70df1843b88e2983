"""Putting a run back together: the report and the final CSV of every image, from the rows kept by ``resume``
and the results of every rank (gathered to rank 0), in image order; each failure once."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.image_io import printable
from .results import (Failure, ImageResult, ScoreReport, csv_row, existing_part_files, failure_text, parse_row,
                      row_failure, write_rows_atomically)

#: What each rank gives rank 0: the creation failures of its metrics and the results of its images.
RankResults = Tuple[List[Failure], List[ImageResult]]


@dataclass
class Plan:
    """What rank 0 decided before scoring: the images, their references, the rows kept, what is left to score."""

    images: List[str]
    refs: Dict[str, str]
    pairing_errors: Dict[str, str]
    kept: Dict[str, List[str]]
    todo: List[Tuple[int, str, Optional[str]]]


def add_results(report: ScoreReport, results: Sequence[ImageResult]) -> None:
    """The scores and failures of ``results`` added to ``report``."""
    for result in results:
        if result.scores:
            report.scores[result.path] = dict(result.scores)
        report.errors.extend(result.errors)


def merge_report(report: ScoreReport, plan: Plan, gathered: Sequence[RankResults]) -> None:
    """Rank 0's report of the whole collection: each failure once, in image order after the setup failures."""
    creation = list(OrderedDict.fromkeys(f for errors, _ in gathered for f in errors))
    report.errors = [Failure(None, image, reason) for image, reason in plan.pairing_errors.items()]
    report.errors += creation
    creation_texts = {failure_text(row_failure(f)) for f in creation}
    new = {r.index: r for _, results in gathered for r in results}
    for index, image in enumerate(plan.images):
        if index in new:
            add_results(report, [new[index]])
        elif image in plan.kept:
            scores, failures = parse_row(plan.kept[image], report.metrics)
            if scores:
                report.scores[image] = scores
            if image not in plan.pairing_errors:
                report.errors += [f for f in failures if failure_text(f) not in creation_texts]


def write_final_csv(csv_path: str, header: List[str], plan: Plan, gathered: Sequence[RankResults]) -> None:
    """The CSV in image order: kept rows as they were, new rows with the creation failures of their rank."""
    metrics = header[2:-1]
    new = {r.index: (errors, r) for errors, results in gathered for r in results}
    pairing_creation = gathered[0][0]
    rows = []
    for index, image in enumerate(plan.images):
        if image in plan.kept:
            rows.append(plan.kept[image])
        elif image in plan.pairing_errors:
            rows.append(csv_row(image, '', {}, metrics,
                                [Failure(None, image, plan.pairing_errors[image]), *pairing_creation]))
        elif index in new:
            creation, result = new[index]
            rows.append(csv_row(image, plan.refs.get(image, ''), result.scores, metrics,
                                [*creation, *result.errors]))
        else:
            raise RuntimeError(f'internal error: no row for {printable(image)}')
    write_rows_atomically(csv_path, header, rows)
    for path in existing_part_files(csv_path):
        os.remove(path)

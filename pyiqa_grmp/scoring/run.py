"""Scoring a whole collection, at any scale: the plan (images, references, rows kept by ``resume``), the
streamed rows, and the merge of every rank's results into one report and one CSV.

Rows go to the ``csv_path`` file as batches finish (flushed), so a killed run loses only the batches in flight;
``resume`` keeps the rows of an earlier run and scores the rest. Under ``torchrun`` the images are split over
the ranks (:mod:`pyiqa_grmp.distributed`) and rank 0 writes the one CSV a single process would.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from .. import distributed
from ..data.image_io import file_kind, printable
from ..errors import InvalidArgument
from .collect import collect_targets, decode_path, pair_references
from .merge import Plan, add_results, merge_report, write_final_csv
from .metrics import check_metric_requests, create_metrics
from .pipeline import progress_bar, score_stream
from .results import (Failure, ImageResult, RowLog, ScoreReport, csv_header, csv_row, existing_part_files,
                      part_file, read_rows)


def _plan(target: str, ref: Optional[str], header: List[str], csv_path: Optional[str], resume: bool) -> Plan:
    if csv_path and os.path.lexists(csv_path) and not os.path.islink(csv_path):
        kind = file_kind(os.lstat(csv_path).st_mode)
        if kind != 'regular file':
            raise InvalidArgument('csv_path', f'{printable(csv_path)} is a {kind}, not a regular file: give another '
                                              '{csv_path}')
    images = collect_targets(target)
    refs: Dict[str, str] = {}
    pairing_errors: Dict[str, str] = {}
    if ref:
        root = target if os.path.isdir(target) else os.path.dirname(target)
        refs, pairing_errors = pair_references(images, root, ref)
    kept: Dict[str, List[str]] = {}
    if csv_path and resume:
        for path in [csv_path, *existing_part_files(csv_path)]:
            if os.path.exists(path):
                for image, row in read_rows(path, header).items():
                    kept.setdefault(image, row)
        _check_kept_rows(kept, set(images), refs, csv_path)
    elif csv_path:
        for path in existing_part_files(csv_path):
            os.remove(path)
    todo = [(index, image, refs.get(image)) for index, image in enumerate(images)
            if image not in kept and image not in pairing_errors]
    return Plan(images, refs, pairing_errors, kept, todo)


def _check_kept_rows(kept: Dict[str, List[str]], images: set, refs: Dict[str, str], csv_path: str) -> None:
    strangers = [image for image in kept if image not in images]
    if strangers:
        raise InvalidArgument('csv_path', f'{printable(csv_path)} (or its part files) has rows for {len(strangers)} '
                              f'images that are not in this target, e.g. {printable(strangers[0])}: it was written for '
                              'another target; give another {csv_path}, or drop {resume} to overwrite it', ('resume',))
    for image, row in kept.items():
        if decode_path(row[1]) != refs.get(image, ''):
            raise InvalidArgument('csv_path', f'{printable(csv_path)}: {printable(image)} was scored against the '
                                  f'reference {printable(row[1])!r}, this run pairs it with '
                                  f'{printable(refs.get(image, ""))!r}; give another {{csv_path}}, or drop {{resume}} '
                                  'to overwrite it', ('resume',))


def score_images(metric_names: Sequence[str], target: str, ref: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True,
                 metric_options: Optional[Dict[str, Dict[str, object]]] = None, workers: int = 0,
                 csv_path: Optional[str] = None, resume: bool = False,
                 metrics: Optional[Dict[str, object]] = None) -> ScoreReport:
    """Score every image of ``target`` (folder, ``.txt`` list or file) with every metric; failures are recorded,
    never raised or skipped.

    Unless ``metrics`` are given, metric names and option keys are checked first: an unknown one is a
    :class:`~pyiqa_grmp.scoring.metrics.MetricRequestError` before anything is read or scored.
    With ``csv_path`` rows are written as batches finish and the file is rewritten at the end in image order
    (atomically); ``resume`` keeps the rows already there (and in part files) and scores only the missing images.
    In a process group (torchrun) the images are split over the ranks; rank 0 gets the report of every image
    and writes the CSV, the other ranks get a report of their share only. ``metrics`` (created metrics by name,
    ``metric_names`` in order) are used instead of creating them, e.g. to time the scoring alone.
    """
    metric_names = list(metric_names)
    metric_options = metric_options or {}
    unknown = sorted(set(metric_options) - set(metric_names))
    if unknown:
        raise InvalidArgument('metric_options', f'names metrics that are not scored: {unknown}')
    if resume and not csv_path:
        raise ValueError('resume needs the CSV file of the earlier run')
    if metrics is None:
        check_metric_requests(metric_names, metric_options)
    header = csv_header(metric_names)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    plan, failure = None, None
    if rank == 0:
        try:
            plan = _plan(target, ref, header, csv_path, resume)
        except (ValueError, FileNotFoundError) as error:
            failure = error
    plan, failure = distributed.broadcast_object((plan, failure))
    if failure is not None:
        raise failure

    report = ScoreReport(images=plan.images, refs=plan.refs, metrics=metric_names)
    if metrics is None:
        no_references = None if ref else 'full-reference metric: give reference images (ref; -r on the command line)'
        metrics = create_metrics(metric_names, metric_options, device, report, missing_references=no_references)
    creation_errors = list(report.errors)
    mine = distributed.shard(plan.todo, rank, world_size)
    log = RowLog(part_file(csv_path, rank), header, resume) if csv_path else None
    results: List[ImageResult] = []
    try:
        with progress_bar(len(mine), progress and rank == 0, 'scoring') as bar:
            if log is not None and rank == 0:
                log.append([csv_row(image, '', {}, metric_names, [Failure(None, image, reason), *creation_errors])
                            for image, reason in plan.pairing_errors.items() if image not in plan.kept])
            stream = score_stream([p for _, p, _ in mine], metrics, batch_size, workers,
                                  [r for _, _, r in mine] if ref else None, [i for i, _, _ in mine])
            for chunk in stream:
                if log is not None:
                    log.append([csv_row(r.path, plan.refs.get(r.path, ''), r.scores, metric_names,
                                        [*creation_errors, *r.errors]) for r in chunk])
                results.extend(chunk)
                bar.update(len(chunk))
    finally:
        if log is not None:
            log.close()
    gathered = distributed.gather_objects((creation_errors, results))
    if rank != 0:
        report.images = [p for _, p, _ in mine]
        add_results(report, results)
        return report
    merge_report(report, plan, gathered)
    if csv_path:
        write_final_csv(csv_path, header, plan, gathered)
    return report

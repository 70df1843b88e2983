"""Scoring a whole collection, at any scale: the plan (images, references, rows kept by ``resume``), the
streamed rows, and the merge of every rank's results into one report and one CSV (:func:`score_images`); or
shard by shard into a folder of parquet files, this process taking every ``num_shards``-th shard
(:func:`score_to_shards`).

Rows go to the ``csv_path`` file as batches finish (flushed), so a killed run loses only the batches in flight;
``resume`` keeps the rows of an earlier run and scores the rest. Under ``torchrun`` the images are split over
the ranks (:mod:`pyiqa_grmp.distributed`) and rank 0 writes the one CSV a single process would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import distributed
from ..data.image_io import file_kind, printable
from ..errors import InvalidArgument
from .collect import collect_targets, decode_path, pair_references
from .merge import Plan, add_results, merge_report, write_final_csv
from .metrics import check_metric_requests, create_metrics
from .pipeline import progress_bar, score_stream
from .results import (OTHER_CSV, Failure, ImageResult, RowLog, ScoreReport, csv_header, csv_row, errors_text,
                      existing_part_files, part_file, read_rows, refused_csv)
from .shard_output import (check_listing, check_same_run, output_path, read_output_metadata, remove_temporaries,
                           run_metadata, shard_source, write_shard_output)
from .shards import list_shards, read_shard, release_row_groups


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
        raise refused_csv(f'{printable(csv_path)} (or its part files) has rows for {len(strangers)} images that are '
                          f'not in this target, e.g. {printable(strangers[0])}: it was written for another target; '
                          f'{OTHER_CSV}')
    for image, row in kept.items():
        if decode_path(row[1]) != refs.get(image, ''):
            raise refused_csv(f'{printable(csv_path)}: {printable(image)} was scored against the reference '
                              f'{printable(row[1])!r}, this run pairs it with {printable(refs.get(image, ""))!r}; '
                              f'{OTHER_CSV}')


def score_images(metric_names: Sequence[str], target: str, ref: Optional[str] = None, device: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True,
                 metric_options: Optional[Dict[str, Dict[str, object]]] = None, workers: int = 0,
                 csv_path: Optional[str] = None, resume: bool = False,
                 metrics: Optional[Dict[str, object]] = None, decode: str = 'cpu') -> ScoreReport:
    """Score every image of ``target`` (folder, ``.txt`` list or file) with every metric; failures are recorded,
    never raised or skipped.

    Unless ``metrics`` are given, metric names and option keys are checked first: an unknown one is a
    :class:`~pyiqa_grmp.scoring.metrics.MetricRequestError` before anything is read or scored.
    With ``csv_path`` rows are written as batches finish and the file is rewritten at the end in image order
    (atomically); ``resume`` keeps the rows already there (and in part files) and scores only the missing images.
    In a process group (torchrun) the images are split over the ranks; rank 0 gets the report of every image
    and writes the CSV, the other ranks get a report of their share only. ``metrics`` (created metrics by name,
    ``metric_names`` in order) are used instead of creating them, e.g. to time the scoring alone. ``decode``:
    where JPEGs are decoded, 'cpu', 'gpu' or 'auto' (:func:`~pyiqa_grmp.scoring.pipeline.decode_mode`).
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
                                  [r for _, _, r in mine] if ref else None, [i for i, _, _ in mine], decode=decode)
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


# ------------------------------------------------------------------------------------------------- by shard
#: Run metadata compared before any metric is created, when every shard of this process is complete already.
REQUEST_METADATA = ('metrics', 'metric_options', 'precision', 'inputs')
#: Why a full-reference metric does not score shards.
NO_REFERENCES_IN_SHARDS = 'full-reference metric: shard inputs carry no reference images'


@dataclass
class ShardRun:
    """What :func:`score_to_shards` did in this process: per shard (name, 'scored' or 'skipped', images, rows
    with an error, output path), and every failure once (metrics not created, damaged shards, images)."""

    out_dir: str
    shards: List[Tuple[str, str, int, int, str]] = field(default_factory=list)
    errors: List[Failure] = field(default_factory=list)


def _validate_slot(num_shards: int, shard_index: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise InvalidArgument('num_shards', f'must be an integer >= 1, got {num_shards!r}')
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise InvalidArgument('shard_index', f'must be an integer in [0, num_shards - 1] = [0, {num_shards - 1}], '
                                             f'got {shard_index!r}')


def score_to_shards(metric_names: Sequence[str], targets: Sequence[str], out_dir: str, *, shard_size: int,
                    device: Optional[str] = None, batch_size: int = 8, progress: bool = True,
                    metric_options: Optional[Dict[str, Dict[str, object]]] = None, workers: int = 0,
                    num_shards: int = 1, shard_index: int = 0,
                    image_column: Optional[str] = None, key_column: Optional[str] = None,
                    keep_columns: Sequence[str] = (), precision: Optional[str] = None, decode: str = 'cpu',
                    metrics: Optional[Dict[str, object]] = None) -> ShardRun:
    """Score the shards ``shard_index``, ``shard_index + num_shards``, ... of ``targets`` into ``out_dir``, one
    parquet file each (:mod:`.shard_output`); failures are rows and reports, never raised.

    Completed shards are skipped, and partial ones (a killed run's temporary file) redone from scratch; a run
    whose metrics, options, weights, precision or input options differ from a completed shard's is refused
    before scoring, naming the difference. Nothing is shared with other processes but ``out_dir``: each task of
    a scheduler (or rank of a launcher) runs this alone with its own ``shard_index``. ``decode`` and ``metrics``
    as in :func:`score_images`: with ``decode='gpu'`` the workers read each member's bytes and nvJPEG decodes
    the JPEGs among them.
    """
    metric_names = list(metric_names)
    metric_options = metric_options or {}
    _validate_slot(num_shards, shard_index)
    unknown = sorted(set(metric_options) - set(metric_names))
    if unknown:
        raise InvalidArgument('metric_options', f'names metrics that are not scored: {unknown}')
    if metrics is None:
        check_metric_requests(metric_names, metric_options)
    shards = list_shards(list(targets), shard_size)
    check_listing(out_dir, shards)
    mine = shards[shard_index::num_shards]
    inputs = {'image_column': image_column, 'key_column': key_column, 'keep_columns': list(keep_columns),
              'shard_size': shard_size, 'decode': decode}
    run = ShardRun(out_dir)
    completed: Dict[str, dict] = {}
    todo = []
    for shard in mine:
        remove_temporaries(out_dir, shard.name)
        found = read_output_metadata(output_path(out_dir, shard.name))
        if found is not None and found['shard']['source'] == shard_source(shard):
            completed[shard.name] = found
            run.shards.append((shard.name, 'skipped', found['shard']['images'], -1, output_path(out_dir, shard.name)))
        else:
            todo.append(shard)
    for shard in shards:  # the first completed shard of the run, whoever wrote it (see shard_output)
        found = completed.get(shard.name) or read_output_metadata(output_path(out_dir, shard.name))
        if found is not None:
            completed.setdefault(shard.name, found)
            break
    if not todo:
        check_same_run(run_metadata(metric_names, metric_options, {}, precision, inputs), completed, out_dir,
                       REQUEST_METADATA)
        return run
    report = ScoreReport(images=[], refs={}, metrics=metric_names)
    if metrics is None:
        metrics = create_metrics(metric_names, metric_options, device, report,
                                 missing_references=NO_REFERENCES_IN_SHARDS)
    creation_errors = list(report.errors)
    run.errors.extend(creation_errors)
    current = run_metadata(metric_names, metric_options, metrics, precision, inputs)
    check_same_run(current, completed, out_dir)
    for shard in todo:
        contents = read_shard(shard, image_column, key_column, keep_columns)
        results: List[ImageResult] = []
        with progress_bar(len(contents.sources), progress, shard.name) as bar:
            for chunk in score_stream(contents.sources, metrics, batch_size, workers, decode=decode):
                results.extend(chunk)
                bar.update(len(chunk))
        release_row_groups()
        rows = []
        for result in results:
            width, height = result.size or (None, None)
            rows.append((result.path, result.scores, errors_text([*creation_errors, *result.errors]), width,
                         height))
        path = write_shard_output(out_dir, shard, current, rows, contents.columns, contents.failures,
                                  creation_errors)
        failed = sum(1 for r in results if r.errors or len(r.scores) < len(metric_names))
        run.shards.append((shard.name, 'scored', len(rows), failed, path))
        run.errors.extend(contents.failures)
        run.errors.extend(f for r in results for f in r.errors)
    order = {s.name: i for i, s in enumerate(mine)}
    run.shards.sort(key=lambda entry: order[entry[0]])
    return run

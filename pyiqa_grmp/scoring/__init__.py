"""Scoring image collections with any pyiqa metric (GRMP-IQA included), at any scale.

One module per job: :mod:`.collect` (what is scored: folders, lists, references, path names in CSVs),
:mod:`.metrics` (the one metric factory), :mod:`.pipeline` (decoding workers, the declared resize, batches),
:mod:`.results` (typed failures, reports, the score CSV, resume), :mod:`.merge` (the ranks' rows put back
together), :mod:`.shards` (webdataset, parquet and folder shards listed and read), :mod:`.shard_output` (a parquet
file per shard, completion, run metadata, merge) and :mod:`.run` (:func:`score_images`, the whole collection;
:func:`score_to_shards`, shard by shard).
"""
from .collect import EncodedImage, ImageFile, ImageSource, collect_targets, decode_path, encode_path, read_image_list
from .metrics import (MetricRequestError, MissingWeightsError, build_metrics, check_metric_requests,
                      create_metrics)
from .pipeline import (FIXED_RESIZE_ATTRIBUTE, DecodedImages, DecodedItem, declared_resize,
                       default_workers, finish_item, metric_device, prepared_items, score_paths, score_stream,
                       shared_gpu)
from .results import Failure, ImageResult, ScoreReport, csv_header, errors_text, read_rows, write_csv
from .run import ShardRun, score_images, score_to_shards
from .shard_output import merge_outputs
from .shards import Shard, expand_braces, list_shards, read_shard

__all__ = ['FIXED_RESIZE_ATTRIBUTE', 'DecodedImages', 'DecodedItem', 'EncodedImage', 'Failure', 'ImageFile', 'ImageResult',
           'ImageSource', 'MetricRequestError', 'MissingWeightsError', 'ScoreReport', 'build_metrics',
           'check_metric_requests', 'collect_targets', 'create_metrics', 'csv_header', 'declared_resize',
           'decode_path', 'default_workers', 'encode_path', 'errors_text', 'finish_item', 'metric_device',
           'prepared_items', 'read_image_list', 'read_rows', 'score_images', 'score_paths', 'score_stream',
           'shared_gpu', 'write_csv',
           'Shard', 'ShardRun', 'expand_braces', 'list_shards', 'merge_outputs', 'read_shard',
           'score_to_shards']

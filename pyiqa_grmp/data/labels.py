"""The one reader of label tables, and the one min-max normalisation of labels.

A label table is a CSV, a TSV or an Excel sheet (``.xlsx``, with ``openpyxl``) with a header and one row per
image: a column of image paths relative to an image folder, a column of scores (MOS, or DMOS when lower is better)
and, in a full-reference layout, a column of reference paths. Columns are chosen by position (0-based) or by
name. Otherwise they are pyiqa's layouts, (image, score, ...) for NR and (reference, image, score, ...) for FR,
or, for the files users bring (``columns_by_name``), found by name: see :func:`read_label_table`. Labelled data
come from a meta CSV and its image folder, or from a pyiqa dataset name (its dataset info names both).
"""
from __future__ import annotations

import importlib
import os
import zipfile
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np
import pandas as pd

#: A column of a label table: its 0-based position or its name in the header.
Column = Union[int, str]
#: Default column positions of each layout.
LAYOUTS: Dict[str, Dict[str, int]] = {'nr': {'image': 0, 'score': 1}, 'fr': {'reference': 0, 'image': 1, 'score': 2}}
#: pyiqa dataset types whose meta CSV is (image, MOS, ...) and (reference, image, MOS, ...).
NR_LAYOUT_TYPES = ('GeneralNRDataset', 'LIVEChallengeDataset')
FR_LAYOUT_TYPES = ('GeneralFRDataset',)
#: What :func:`minmax_normalise` does with constant values: 0.5, 0, or raise.
CONSTANT_RULES = ('half', 'zero', 'error')
#: Lines of the file named in an error about bad rows.
LISTED_LINES = 5
#: Column names (compared lower-cased, spaces and hyphens as underscores) that hold the score, when the columns
#: are found by name: exactly these, so that KonIQ-10k's ``MOS`` is chosen over ``c1`` ... ``MOS_zscore``.
SCORE_NAMES = ('mos', 'dmos', 'score')
#: The score names whose labels are lower-better (DMOS: a difference from the pristine reference).
LOWER_BETTER_NAMES = ('dmos',)
#: Column names that hold the image path, when found by name; without one, the first column is the image.
IMAGE_NAMES = ('image_name', 'image', 'img_name', 'img', 'image_path', 'img_path', 'filename', 'file_name',
               'file', 'path', 'name')
#: File name endings read as tab-separated and as Excel; any other file is CSV (tab-separated when its header
#: line holds tabs and no comma).
TSV_SUFFIXES = ('.tsv', '.tab')
EXCEL_SUFFIXES = ('.xlsx', '.xlsm')

Values = TypeVar('Values')  # a numpy array or a torch tensor


class LabelTableError(ValueError):
    """A label table cannot be read, or its columns do not hold what they should."""


@dataclass
class LabelledImages:
    """Labelled images in table order: image paths, raw scores, reference paths (FR layouts), label direction,
    and where they came from; ``table`` holds the rows behind them (after any row filter), for other columns."""

    images: List[str]
    mos: np.ndarray
    references: Optional[List[str]] = None
    lower_better: bool = False
    description: str = ''
    meta_info: str = ''
    root: str = ''
    table: Optional[pd.DataFrame] = None
    #: How the columns were chosen, e.g. "images from column 'image_name', scores from column 'MOS' (by name)".
    column_choice: str = ''
    #: The header names of the columns read, by role ('image', 'score', 'reference').
    columns: Dict[str, str] = field(default_factory=dict)

    def subset(self, rows: Sequence[int], description: str) -> 'LabelledImages':
        """The rows ``rows`` (indices in table order) only, described by ``description``."""
        rows = np.asarray(rows, dtype=int)
        return replace(self, images=[self.images[i] for i in rows], mos=self.mos[rows],
                       references=None if self.references is None else [self.references[i] for i in rows],
                       description=description,
                       table=None if self.table is None else self.table.iloc[rows].reset_index(drop=True))


@dataclass(frozen=True)
class LabelSource:
    """Where labelled images are: the meta CSV, its image folder, the reference folder (FR layouts) or None,
    whether the labels are lower-better according to the source (None: unknown, inferred from a DMOS column
    name), a phrase naming it, and whether the columns are found by name (a user's file) or by pyiqa's layout."""

    meta_info: str
    root: str
    reference_root: Optional[str]
    lower_better: Optional[bool]
    description: str
    columns_by_name: bool = False


# ------------------------------------------------------------------------------------------------ sources
def _reroot(path: str, data_root: str) -> str:
    """A pyiqa dataset-info path (``./datasets/...``) moved under ``data_root``, as pyiqa's standard layout."""
    normalised = path.replace('\\', '/')
    for prefix in ('./datasets/', 'datasets/'):
        if normalised.startswith(prefix):
            return os.path.join(data_root, normalised[len(prefix):])
    return path


def dataset_source(name: str, data_root: str = './datasets') -> LabelSource:
    """The label source of a pyiqa dataset name, its paths re-rooted from ``./datasets`` to ``data_root``.

    Raises ValueError for an unknown name or a layout this reader does not know, and FileNotFoundError when the
    meta CSV is not where pyiqa's standard layout puts it.
    """
    import pyiqa

    try:
        info = pyiqa.get_dataset_info(name)
    except AssertionError:
        known = ', '.join(sorted(pyiqa.get_dataset_info()))
        raise ValueError(f'unknown pyiqa dataset {name!r}; known names: {known}') from None
    kind = info.get('type')
    if kind not in NR_LAYOUT_TYPES + FR_LAYOUT_TYPES:
        raise ValueError(f'pyiqa dataset {name!r} has type {kind}, whose meta CSV layout the label reader does not '
                         'know; pass meta_info= (column 0 image path, column 1 MOS) and root= instead')
    target = _reroot(info['dataroot_target'], data_root)
    references = None
    if kind in FR_LAYOUT_TYPES:  # like GeneralFRDataset: references next to the images unless dataroot_ref
        references = _reroot(info.get('dataroot_ref') or info['dataroot_target'], data_root)
    meta = _reroot(info['meta_info_file'], data_root)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f'meta info CSV {meta} not found; put pyiqa\'s standard layout of {name} under '
                                f'data_root={data_root}')
    return LabelSource(meta, target, references, bool(info.get('lower_better', False)),
                       f'pyiqa dataset {name} (meta CSV {meta}, images under {target})')


def label_source(dataset: Optional[str] = None, data_root: str = './datasets', meta_info: Optional[str] = None,
                 root: Optional[str] = None) -> LabelSource:
    """The label source of a pyiqa dataset name (``dataset``, under ``data_root``) or of a meta CSV
    (``meta_info``, image paths relative to ``root``); exactly one of the two is given."""
    if (dataset is None) == (meta_info is None):
        raise ValueError('give either dataset= (a pyiqa dataset name) or meta_info= (a meta CSV), not both or neither')
    if dataset is not None:
        return dataset_source(dataset, data_root)
    if root is None:
        raise ValueError(f'meta_info={meta_info} needs root=, the folder its image paths are relative to')
    return LabelSource(meta_info, root, None, None, f'meta CSV {meta_info} (images under {root})',
                       columns_by_name=True)


# ------------------------------------------------------------------------------------------------ reading
def _row_filter_mask(table: pd.DataFrame, row_filter: Optional[Mapping]) -> np.ndarray:
    """Rows kept by ``row_filter`` ({column: [values]}: a row is kept when, for every column, its value is
    listed; values compare as text). None keeps every row.

    It lets one labelled set serve several stages without overlap, e.g. pre-train on some reference photos and
    fine-tune on the others.
    """
    keep = np.ones(len(table), dtype=bool)
    if row_filter is None:
        return keep
    if not isinstance(row_filter, Mapping) or not row_filter:
        raise LabelTableError(f'row_filter must map column names to lists of values, got {row_filter!r}')
    for column, values in row_filter.items():
        if column not in table.columns:
            raise LabelTableError(f'row_filter column {column!r} is not in the meta-info file '
                                  f'(columns: {list(table.columns)})')
        if isinstance(values, (str, int, float)) or not values:
            raise LabelTableError(f'row_filter[{column!r}] must be a non-empty list, got {values!r}')
        keep &= table[column].astype(str).isin([str(v) for v in values]).to_numpy()
    if not keep.any():
        raise LabelTableError(f'row_filter {dict(row_filter)} keeps none of the {len(table)} rows')
    return keep


def _position(table: pd.DataFrame, column: Column) -> Optional[int]:
    """The 0-based position of a column given by position or by name; None when the table has no such column."""
    if isinstance(column, str):
        return table.columns.get_loc(column) if column in table.columns else None
    return column if 0 <= column < table.shape[1] else None


def _place(column: Column) -> str:
    return f'column {column + 1}' if isinstance(column, int) else f'column {column!r}'


def _layout_text(columns: Mapping[str, Column]) -> str:
    """'the image path in column 1 and the score in column 2', for the messages."""
    parts = [f'the {role}{" path" if role != "score" else ""} in {_place(column)}' for role, column in columns.items()]
    return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _normalised_name(column: object) -> str:
    return str(column).strip().lower().replace(' ', '_').replace('-', '_')


def _named_column(table: pd.DataFrame, names: Sequence[str], role: str, meta_info: str) -> Optional[str]:
    """The one column whose name is in ``names``; None when there is none; LabelTableError naming the columns
    when several are."""
    found = [column for column in table.columns if _normalised_name(column) in names]
    if len(found) > 1:
        raise LabelTableError(f'meta info CSV {meta_info} has {len(found)} columns that could hold the {role}: '
                              f'{found}, so which one is meant is ambiguous; its columns are {list(table.columns)}. '
                              f'Name the {role} column (adapt --{role}-column, or {role}_column=)')
    return found[0] if found else None


def _columns_by_name(table: pd.DataFrame, columns: Dict[str, Column], chosen: Mapping[str, Optional[Column]],
                     meta_info: str) -> Dict[str, Column]:
    """``columns`` with the image and score columns not chosen by the caller found by name (NR layout): the score
    is the one column named MOS, DMOS or score (any case), refused when there is none or more than one; the
    image is the one column named like :data:`IMAGE_NAMES`, else the first column."""
    found = dict(columns)
    if chosen['score'] is None:
        score = _named_column(table, SCORE_NAMES, 'score', meta_info)
        if score is None:
            raise LabelTableError(f'meta info CSV {meta_info} has no column named MOS, DMOS or score (in any case); '
                                  f'its columns are {list(table.columns)}. Name the score column (adapt '
                                  '--score-column, or score_column=)')
        found['score'] = score
    if chosen['image'] is None:
        image = _named_column(table, IMAGE_NAMES, 'image', meta_info)
        found['image'] = 0 if image is None else image
    return found


def _read_table(meta_info: str) -> pd.DataFrame:
    """The file as a table: Excel (first sheet) by its ending, else CSV or TSV; LabelTableError when unreadable."""
    suffix = os.path.splitext(meta_info)[1].lower()
    try:
        if suffix in EXCEL_SUFFIXES:
            try:
                importlib.import_module('openpyxl')
            except ImportError:
                raise LabelTableError(f'label file {meta_info} is an Excel sheet, whose reading needs the package '
                                      'openpyxl (pip install openpyxl), which is not installed; or save the sheet as '
                                      'CSV') from None
            return pd.read_excel(meta_info, engine='openpyxl')
        with open(meta_info, 'rb') as file:
            header = file.readline(65536)
        tabs = suffix in TSV_SUFFIXES or (b'\t' in header and b',' not in header)
        return pd.read_csv(meta_info, sep='\t' if tabs else ',')
    except LabelTableError:
        raise
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError,
            zipfile.BadZipFile) as error:
        kind = 'an Excel sheet' if suffix in EXCEL_SUFFIXES else 'CSV'
        raise LabelTableError(f'meta info CSV {meta_info} cannot be read as {kind}: {error}') from error


def _checked_scores(table: pd.DataFrame, position: int, meta_info: str, layout_text: str,
                    require_varying: bool) -> np.ndarray:
    """The score column as floats; LabelTableError when it is not numeric, some rows are not (named by their
    line in the file), or, with ``require_varying``, every score is the same."""
    name = table.columns[position]
    scores = pd.to_numeric(table.iloc[:, position], errors='coerce').to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size == len(scores):
        raise LabelTableError(
            f'meta info CSV {meta_info} has no numeric score column: column {position + 1} ({name!r}) must hold the '
            f'scores (MOS), but it holds e.g. {table.iat[0, position]!r}; the layout is: rows with {layout_text}')
    if bad.size:
        lines = (table.index[bad[:LISTED_LINES]] + 2).tolist()  # line 1 is the header
        raise LabelTableError(f'meta info CSV {meta_info}: {bad.size} rows have a missing or non-numeric score '
                              f'(empty, text, NaN or Inf) in column {name!r}, e.g. on lines {lines}')
    if require_varying and np.ptp(scores) == 0:
        raise LabelTableError(f'meta info CSV {meta_info}: every score in column {name!r} is {scores[0]:g}; a '
                              'constant MOS gives nothing to learn or to correlate with')
    return scores


def read_label_table(meta_info: str, root: str, *, layout: str = 'nr', image_column: Optional[Column] = None,
                     score_column: Optional[Column] = None, reference_column: Optional[Column] = None,
                     reference_root: Optional[str] = None, row_filter: Optional[Mapping] = None,
                     require_varying: bool = False, lower_better: Optional[bool] = False,
                     description: str = '', columns_by_name: bool = False) -> LabelledImages:
    """Read and check a label table; image paths are ``os.path.join(root, cell)`` in file order.

    ``layout`` ('nr' or 'fr') gives the default column positions (:data:`LAYOUTS`); ``image_column``,
    ``score_column`` and ``reference_column`` choose others, by position or name. With ``columns_by_name`` (NR
    layout; the files users bring) the columns not chosen are found by name instead: the score is the one column
    named MOS, DMOS or score (any case, exactly: not ``MOS_zscore``), refused when there is none or several (e.g.
    both MOS and DMOS); the image is the one column named like :data:`IMAGE_NAMES`, else the first column.
    ``lower_better`` None infers the direction from the score column's name (DMOS: lower is better). References
    (FR) are relative to ``reference_root`` (default ``root``). ``row_filter`` keeps only some rows (see
    :func:`_row_filter_mask`). Every score of the rows kept must be a finite number, and with ``require_varying``
    not all the same. CSV, TSV and Excel files are read (:func:`_read_table`).

    Raises FileNotFoundError for a missing file and :class:`LabelTableError` naming the file and the problem:
    unreadable CSV, no rows, a missing column, missing or non-numeric scores (with their line numbers).
    """
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {sorted(LAYOUTS)}, got {layout!r}')
    chosen = {'reference': reference_column, 'image': image_column, 'score': score_column}
    columns = {role: LAYOUTS[layout][role] if chosen[role] is None else chosen[role]
               for role in ('reference', 'image', 'score') if role in LAYOUTS[layout] or chosen[role] is not None}
    if not os.path.isfile(meta_info):
        raise FileNotFoundError(f'meta info CSV {meta_info} not found')
    table = _read_table(meta_info)
    if table.empty:
        raise LabelTableError(f'meta info CSV {meta_info} has no rows')
    if columns_by_name and layout == 'nr':
        columns = _columns_by_name(table, columns, chosen, meta_info)
    positions = {role: _position(table, column) for role, column in columns.items()}
    for role, position in positions.items():
        if position is None:
            raise LabelTableError(
                f'meta info CSV {meta_info} has no {role} column: it needs a header and rows with '
                f'{_layout_text(columns)}; it has {table.shape[1]} column(s) {list(table.columns)} and {len(table)} '
                'rows')
    table = table[_row_filter_mask(table, row_filter)]
    scores = _checked_scores(table, positions['score'], meta_info, _layout_text(columns), require_varying)
    table = table.reset_index(drop=True)
    score_name = str(table.columns[positions['score']])
    if lower_better is None:
        lower_better = _normalised_name(score_name) in LOWER_BETTER_NAMES
    how = 'by name' if columns_by_name and chosen['score'] is None else 'as given or by position'
    column_choice = (f'images from column {str(table.columns[positions["image"]])!r}, scores from column '
                     f'{score_name!r} ({how}; {"lower" if lower_better else "higher"} is better)')
    images = [os.path.join(root, str(cell)) for cell in table.iloc[:, positions['image']]]
    references = None
    if 'reference' in positions:
        reference_root = root if reference_root is None else reference_root
        references = [os.path.join(reference_root, str(cell)) for cell in table.iloc[:, positions['reference']]]
    return LabelledImages(images=images, mos=scores, references=references, lower_better=lower_better,
                          description=description, meta_info=meta_info, root=root, table=table,
                          column_choice=column_choice,
                          columns={role: str(table.columns[position]) for role, position in positions.items()})


def read_labels(source: LabelSource, lower_better: Optional[bool] = None, **options) -> LabelledImages:
    """:func:`read_label_table` of a label source: its layout, folders, description and column rule;
    ``lower_better`` overrides the source's label direction. ``options`` are those of :func:`read_label_table`."""
    layout = 'nr' if source.reference_root is None else 'fr'
    direction = source.lower_better if lower_better is None else bool(lower_better)
    return read_label_table(source.meta_info, source.root, layout=layout, reference_root=source.reference_root,
                            lower_better=direction, description=source.description,
                            columns_by_name=source.columns_by_name, **options)


# ----------------------------------------------------------------------------------------- normalisation
def minmax_normalise(values: Values, constant: str) -> Values:
    """``(values - min) / (max - min)`` of a numpy array or torch tensor, in its type, shape and device.

    Values that are all equal have no range: ``constant`` says what they become, 'half' (0.5, the official
    meta-training's rule for a task part), 'zero' (0), or 'error' (ValueError: labels that must vary).
    """
    if constant not in CONSTANT_RULES:
        raise ValueError(f'constant must be one of {CONSTANT_RULES}, got {constant!r}')
    low, high = values.min(), values.max()
    if high > low:
        return (values - low) / (high - low)
    if constant == 'error':
        raise ValueError(f'all {len(values)} values equal {float(low):g}; min-max normalisation is undefined')
    return (values - low) * 0 + (0.5 if constant == 'half' else 0.0)

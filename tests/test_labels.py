"""pyiqa_grmp.data.labels: the one label-table reader (NR and FR layouts, columns by index or by name, every
check with its message), label sources, and the one min-max normalisation with its three constant rules."""
import os

import numpy as np
import pandas as pd
import pyiqa
import pytest
import torch
from PIL import Image

from pyiqa_grmp.data.fewshot_dataset import DatasetConfigError, FewShotNRDataset
from pyiqa_grmp.data.labels import (LabelTableError, label_source, minmax_normalise, read_label_table,
                                    read_labels)
from pyiqa_grmp.data.task_dataset import DistortionTaskDataset


def _csv(tmp_path, frame, name='meta.csv'):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def nr_csv(tmp_path):
    return _csv(tmp_path, pd.DataFrame({'image': ['a.png', 'b.png', 'c.png'], 'mos': [3.0, 1.5, 2.0],
                                        'std': [0.1, 0.2, 0.3]}))


@pytest.fixture
def fr_csv(tmp_path):
    return _csv(tmp_path, pd.DataFrame({'ref_name': ['r1.png', 'r1.png', 'r2.png'],
                                        'dist_name': ['d1.png', 'd2.png', 'd3.png'], 'dmos': [10.0, 20.0, 30.0]}))


# ------------------------------------------------------------------------------------------------- layouts
def test_nr_layout_reads_image_and_score_by_position_in_file_order(nr_csv):
    labels = read_label_table(nr_csv, '/images')
    assert labels.images == ['/images/a.png', '/images/b.png', '/images/c.png']
    assert labels.mos.tolist() == [3.0, 1.5, 2.0]
    assert labels.references is None and labels.meta_info == nr_csv and labels.root == '/images'
    assert labels.table['std'].tolist() == [0.1, 0.2, 0.3]


def test_fr_layout_reads_reference_image_and_score_by_position(fr_csv):
    labels = read_label_table(fr_csv, '/dist', layout='fr', reference_root='/refs')
    assert labels.images == ['/dist/d1.png', '/dist/d2.png', '/dist/d3.png']
    assert labels.references == ['/refs/r1.png', '/refs/r1.png', '/refs/r2.png']
    assert labels.mos.tolist() == [10.0, 20.0, 30.0]


def test_fr_references_default_to_the_image_folder(fr_csv):
    assert read_label_table(fr_csv, '/dist', layout='fr').references[0] == '/dist/r1.png'


def test_columns_can_be_chosen_by_name(fr_csv):
    labels = read_label_table(fr_csv, '/dist', image_column='dist_name', score_column='dmos')
    assert labels.images[0] == '/dist/d1.png' and labels.mos.tolist() == [10.0, 20.0, 30.0]
    assert labels.references is None


def test_columns_can_be_chosen_by_index(nr_csv):
    labels = read_label_table(nr_csv, '/images', score_column=2)
    assert labels.mos.tolist() == [0.1, 0.2, 0.3]


def test_row_filter_keeps_the_listed_rows(nr_csv):
    labels = read_label_table(nr_csv, '/images', row_filter={'image': ['a.png', 'c.png']})
    assert labels.images == ['/images/a.png', '/images/c.png'] and labels.mos.tolist() == [3.0, 2.0]


def test_subset_takes_rows_of_every_field(fr_csv):
    part = read_label_table(fr_csv, '/dist', layout='fr').subset([2, 0], 'two rows')
    assert part.images == ['/dist/d3.png', '/dist/d1.png'] and part.references == ['/dist/r2.png', '/dist/r1.png']
    assert part.mos.tolist() == [30.0, 10.0] and part.description == 'two rows' and len(part.table) == 2


# -------------------------------------------------------------------------------------------------- errors
def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='meta info CSV .*nope.csv not found'):
        read_label_table(str(tmp_path / 'nope.csv'), str(tmp_path))


def test_unreadable_csv_is_named(tmp_path):
    (tmp_path / 'meta.csv').write_text('')
    with pytest.raises(LabelTableError, match='cannot be read as CSV'):
        read_label_table(str(tmp_path / 'meta.csv'), str(tmp_path))


def test_header_without_rows_is_refused(tmp_path):
    (tmp_path / 'meta.csv').write_text('image,mos\n')
    with pytest.raises(LabelTableError, match='has no rows'):
        read_label_table(str(tmp_path / 'meta.csv'), str(tmp_path))


def test_too_few_columns_say_which_layout_is_needed(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image': ['a.png']}))
    message = (r"has no score column: it needs a header and rows with the image path in column 1 and the score in "
               r"column 2; it has 1 column\(s\) \['image'\]")
    with pytest.raises(LabelTableError, match=message):
        read_label_table(path, str(tmp_path))


def test_a_named_column_that_is_not_there_is_refused(nr_csv):
    with pytest.raises(LabelTableError, match="has no score column.*the score in column 'dmos'"):
        read_label_table(nr_csv, '/images', score_column='dmos')


def test_text_score_column_is_refused(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image_name': ['a.png', 'b.png'], 'comment': ['nice', 'ok']}))
    with pytest.raises(LabelTableError, match=r"has no numeric score column: column 2 \('comment'\) must hold the "
                                              r"scores \(MOS\), but it holds e.g. 'nice'"):
        read_label_table(path, str(tmp_path))


def test_missing_and_non_numeric_scores_are_named_by_line(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image': list('abcd'), 'mos': ['1', '', 'x', '4']}))
    with pytest.raises(LabelTableError, match=r"2 rows have a missing or non-numeric score \(empty, text, NaN or Inf\) "
                                              r"in column 'mos', e.g. on lines \[3, 4\]"):
        read_label_table(path, str(tmp_path))


def test_lines_of_bad_scores_count_rows_a_filter_left_out(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image': list('abcd'), 'mos': [1.0, 2.0, 3.0, np.nan]}))
    with pytest.raises(LabelTableError, match=r'on lines \[5\]'):
        read_label_table(path, str(tmp_path), row_filter={'image': ['c', 'd']})


def test_constant_scores_are_refused_when_they_must_vary(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image': list('abc'), 'mos': [3.0, 3.0, 3.0]}))
    assert read_label_table(path, str(tmp_path)).mos.tolist() == [3.0] * 3
    with pytest.raises(LabelTableError, match="every score in column 'mos' is 3; a constant MOS"):
        read_label_table(path, str(tmp_path), require_varying=True)


def test_datasets_name_themselves_in_label_errors(tmp_path):
    path = _csv(tmp_path, pd.DataFrame({'image': list('ab'), 'mos': [1.0, np.nan]}))
    opt = {'name': 'toy', 'type': 'FewShotNRDataset', 'dataroot_target': str(tmp_path), 'meta_info_file': path,
           'num_shots': 1, 'phase': 'train'}
    with pytest.raises(DatasetConfigError, match="dataset 'toy': meta info CSV .* NaN"):
        FewShotNRDataset(opt)
    source = {'name': 'kadid', 'meta_info_file': path, 'dataroot_target': str(tmp_path)}
    with pytest.raises(DatasetConfigError, match="source 'kadid': meta info CSV .* NaN"):
        DistortionTaskDataset({'name': 'tasks', 'sources': [source]})


# ------------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize('kwargs, message', [
    ({}, 'not both or neither'),
    ({'dataset': 'livec', 'meta_info': 'm.csv'}, 'not both or neither'),
    ({'meta_info': 'm.csv'}, 'needs root='),
])
def test_label_source_needs_one_source(kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_source(**kwargs)


def test_pyiqa_fr_dataset_is_rerooted_with_references_and_its_label_direction(fr_csv, tmp_path, monkeypatch):
    os.rename(fr_csv, tmp_path / 'fr.csv')
    info = {'type': 'GeneralFRDataset', 'dataroot_target': './datasets/dist', 'dataroot_ref': './datasets/refs',
            'meta_info_file': './datasets/fr.csv', 'lower_better': True}
    monkeypatch.setattr(pyiqa, 'get_dataset_info', lambda name=None: info)
    source = label_source(dataset='toy_fr', data_root=str(tmp_path))
    assert (source.root, source.reference_root) == (str(tmp_path / 'dist'), str(tmp_path / 'refs'))
    labels = read_labels(source)
    assert labels.lower_better and labels.references[0] == str(tmp_path / 'refs' / 'r1.png')
    assert not read_labels(source, lower_better=False).lower_better


def test_pyiqa_dataset_without_its_files_says_where_to_put_them(tmp_path, monkeypatch):
    info = {'type': 'GeneralNRDataset', 'dataroot_target': './datasets/x', 'meta_info_file': './datasets/x.csv'}
    monkeypatch.setattr(pyiqa, 'get_dataset_info', lambda name=None: info)
    with pytest.raises(FileNotFoundError, match="put pyiqa's standard layout of toy under data_root="):
        label_source(dataset='toy', data_root=str(tmp_path))


# ------------------------------------------------------------------------------------------- normalisation
def test_minmax_maps_the_range_to_unit_interval():
    assert minmax_normalise(np.array([2.0, 6.0, 4.0]), constant='error').tolist() == [0.0, 1.0, 0.5]


@pytest.mark.parametrize('rule, value', [('half', 0.5), ('zero', 0.0)])
def test_constant_values_follow_the_chosen_rule(rule, value):
    assert minmax_normalise(np.array([3.0, 3.0]), constant=rule).tolist() == [value, value]


def test_constant_values_are_an_error_when_asked():
    with pytest.raises(ValueError, match='all 2 values equal 3; min-max normalisation is undefined'):
        minmax_normalise(np.array([3.0, 3.0]), constant='error')


def test_unknown_constant_rule_is_refused():
    with pytest.raises(ValueError, match='constant must be one of'):
        minmax_normalise(np.array([1.0, 2.0]), constant='one')


def test_minmax_keeps_a_tensor_a_tensor():
    labels = torch.tensor([1.0, 3.0, 2.0])
    assert torch.equal(minmax_normalise(labels, constant='half'), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(minmax_normalise(torch.tensor([2.0, 2.0]), constant='half'), torch.tensor([0.5, 0.5]))


def test_one_image_held_out_of_a_source_is_labelled_half(tmp_path):
    for name in ('i01_01_1.png', 'i01_01_2.png', 'i01_01_3.png'):
        Image.new('RGB', (8, 8)).save(tmp_path / name)
    path = _csv(tmp_path, pd.DataFrame({'image': ['i01_01_1.png', 'i01_01_2.png', 'i01_01_3.png'],
                                        'mos': [1.0, 2.0, 3.0]}))
    source = {'name': 'one', 'meta_info_file': path, 'dataroot_target': str(tmp_path)}
    dataset = DistortionTaskDataset({'name': 'v', 'phase': 'val', 'sources': [source], 'val_fraction': 0.34,
                                     'resize': 8})
    assert [label for _, label in dataset.held_out] == [0.5]


# ------------------------------------------------------------------------------- columns of users' files
#: The header of KonIQ-10k's koniq10k_scores_and_distributions.csv: vote counts c1..c5 come before the MOS.
KONIQ_HEADER = ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD', 'MOS_zscore']
#: The layout of SPAQ's annotations/MOS and Image attribute scores.xlsx.
SPAQ_HEADER = ['Image name', 'MOS', 'Brightness', 'Colorfulness', 'Contrast', 'Noisiness', 'Sharpness']


def _user_file(tmp_path, header, rows, name='labels.csv'):
    frame = pd.DataFrame(rows, columns=header)
    path = tmp_path / name
    if name.endswith('.xlsx'):
        frame.to_excel(path, index=False)
    else:
        frame.to_csv(path, index=False, sep='\t' if name.endswith('.tsv') else ',')
    return str(path)


def _by_name(path, **options):
    return read_label_table(path, '/images', columns_by_name=True, lower_better=None, **options)


def test_koniq_header_chooses_mos_not_the_vote_counts(tmp_path):
    rows = [['1.jpg', 0, 1, 20, 80, 19, 120, 3.82, 0.6, 71.2], ['2.jpg', 5, 30, 60, 20, 5, 120, 2.95, 0.8, 52.0]]
    labels = _by_name(_user_file(tmp_path, KONIQ_HEADER, rows))
    assert labels.mos.tolist() == [3.82, 2.95] and labels.images == ['/images/1.jpg', '/images/2.jpg']
    assert labels.columns == {'image': 'image_name', 'score': 'MOS'} and not labels.lower_better
    assert "scores from column 'MOS' (by name" in labels.column_choice


def test_spaq_layout_chooses_image_name_and_mos(tmp_path):
    rows = [['00001.png', 42.3, 50.1, 40.0, 44.0, 30.2, 47.0], ['00002.png', 71.0, 60.0, 65.0, 70.1, 60.0, 75.3]]
    labels = _by_name(_user_file(tmp_path, SPAQ_HEADER, rows))
    assert labels.mos.tolist() == [42.3, 71.0] and labels.columns == {'image': 'Image name', 'score': 'MOS'}


def test_a_dmos_column_means_lower_is_better(tmp_path):
    labels = _by_name(_user_file(tmp_path, ['filename', 'DMOS'], [['a.png', 30.0], ['b.png', 60.0]]))
    assert labels.lower_better and labels.columns['score'] == 'DMOS'
    given = read_label_table(_user_file(tmp_path, ['filename', 'DMOS'], [['a.png', 30.0], ['b.png', 60.0]]), '/i',
                             columns_by_name=True, lower_better=False)
    assert not given.lower_better


def test_both_mos_and_dmos_is_ambiguous_and_refused_naming_the_columns(tmp_path):
    path = _user_file(tmp_path, ['image', 'MOS', 'DMOS'], [['a.png', 3.0, 40.0]])
    with pytest.raises(LabelTableError, match=r"2 columns that could hold the score: \['MOS', 'DMOS'\].*its columns "
                                              r"are \['image', 'MOS', 'DMOS'\].*--score-column"):
        _by_name(path)


def test_no_score_named_column_is_refused_naming_the_columns(tmp_path):
    path = _user_file(tmp_path, ['image', 'quality', 'MOS_zscore'], [['a.png', 3.0, 0.2]])
    with pytest.raises(LabelTableError, match=r"no column named MOS, DMOS or score.*\['image', 'quality', "
                                              r"'MOS_zscore'\]"):
        _by_name(path)


def test_explicit_columns_win_over_the_names(tmp_path):
    path = _user_file(tmp_path, KONIQ_HEADER, [['1.jpg', 0, 1, 20, 80, 19, 120, 3.82, 0.6, 71.2],
                                               ['2.jpg', 5, 30, 60, 20, 5, 120, 2.95, 0.8, 52.0]])
    labels = _by_name(path, score_column='MOS_zscore')
    assert labels.mos.tolist() == [71.2, 52.0] and labels.columns['score'] == 'MOS_zscore'


def test_without_an_image_named_column_the_first_column_is_the_image(tmp_path):
    labels = _by_name(_user_file(tmp_path, ['picture', 'score'], [['a.png', 1.0], ['b.png', 2.0]]))
    assert labels.images == ['/images/a.png', '/images/b.png']


def test_pyiqa_layouts_stay_positional_without_columns_by_name(tmp_path):
    labels = read_label_table(_user_file(tmp_path, KONIQ_HEADER, [['1.jpg', 0, 1, 2, 3, 4, 10, 3.8, 0.6, 71.2]]),
                              '/images')
    assert labels.columns['score'] == 'c1'


def test_tsv_files_are_read_by_their_ending_and_by_their_header(tmp_path):
    rows = [['a.png', 1.0], ['b.png', 2.0]]
    assert _by_name(_user_file(tmp_path, ['image_name', 'MOS'], rows, 'labels.tsv')).mos.tolist() == [1.0, 2.0]
    (tmp_path / 'labels.txt').write_text('image_name\tMOS\na.png\t1.5\nb.png\t2.5\n')
    assert _by_name(str(tmp_path / 'labels.txt')).mos.tolist() == [1.5, 2.5]


def test_excel_sheets_are_read_with_openpyxl(tmp_path):
    pytest.importorskip('openpyxl')
    path = _user_file(tmp_path, SPAQ_HEADER, [['00001.png', 42.3, 1, 2, 3, 4, 5], ['00002.png', 71.0, 1, 2, 3, 4, 5]],
                      'MOS and Image attribute scores.xlsx')
    assert _by_name(path).mos.tolist() == [42.3, 71.0]


def test_excel_without_openpyxl_names_the_package(tmp_path, monkeypatch):
    import sys

    (tmp_path / 'scores.xlsx').write_bytes(b'PK\x03\x04')
    monkeypatch.setitem(sys.modules, 'openpyxl', None)  # import openpyxl now raises ImportError
    with pytest.raises(LabelTableError, match=r'needs the package openpyxl \(pip install openpyxl\)'):
        _by_name(str(tmp_path / 'scores.xlsx'))


def test_meta_csv_sources_find_columns_by_name(tmp_path):
    path = _user_file(tmp_path, KONIQ_HEADER, [['1.jpg', 0, 1, 2, 3, 4, 10, 3.8, 0.6, 71.2],
                                               ['2.jpg', 0, 1, 2, 3, 4, 10, 2.1, 0.6, 41.2]])
    labels = read_labels(label_source(meta_info=path, root='/images'))
    assert labels.mos.tolist() == [3.8, 2.1]

"""The one metric factory: names and option keys checked before anything is scored, missing pyiqa files named
with where to put them, and failures typed from scoring to the CSV and back."""
import socket

import numpy as np
import pytest
from PIL import Image
from pyiqa.utils import download_util

from grmp_test_utils import run_main
from pyiqa_grmp.cli import main
from pyiqa_grmp.comparison import split_metric_name
from pyiqa_grmp.scoring import (Failure, MetricRequestError, MissingWeightsError, build_metrics,
                                check_metric_requests, score_images)
from pyiqa_grmp.scoring.results import csv_row, parse_row


def _tiny_png(path, size=32, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def no_network(monkeypatch):
    """Internet sockets refused (local ones still work: decoding workers use them)."""
    local_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError('network disabled by the test')
        return local_connect(self, address)

    monkeypatch.setattr(socket.socket, 'connect', connect)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    folder = tmp_path / 'empty_cache'
    monkeypatch.setattr(download_util, 'DEFAULT_CACHE_DIR', str(folder))
    return folder


def test_misspelled_metric_stops_the_score_command_before_any_image_is_scored(tmp_path):
    _tiny_png(tmp_path / 'a.png')
    out_csv = tmp_path / 'scores.csv'
    # in this process (run_main prints what would escape the command as the interpreter would: a traceback)
    status, _, err = run_main(['score', 'entropy', 'grmp_iq', '-t', str(tmp_path), '--csv', str(out_csv)])
    assert status == 2, err
    assert "unknown metric 'grmp_iq': did you mean grmp_iqa" in err
    assert 'AssertionError' not in err and 'Traceback' not in err
    assert not out_csv.exists()


def test_unknown_metric_is_our_value_error_with_the_close_names():
    with pytest.raises(MetricRequestError, match="unknown metric 'brisqe': did you mean brisque"):
        check_metric_requests(['entropy', 'brisqe'], {})


def test_unknown_option_key_names_the_close_key_and_every_valid_one():
    with pytest.raises(MetricRequestError) as refused:
        check_metric_requests(['niqe'], {'niqe': {'pretrained_path': 'x.mat'}})
    message = str(refused.value)
    assert "metric 'niqe' has no option 'pretrained_path': did you mean pretrained_model_path?" in message
    assert 'crop_border' in message and 'check_input_range' in message


def test_unknown_option_key_is_a_usage_error_of_the_score_command(tmp_path, capsys):
    _tiny_png(tmp_path / 'a.png')
    assert main(['score', 'niqe', '-t', str(tmp_path), '--metric-opt', 'niqe:crop_bordr=2']) == 2
    assert "has no option 'crop_bordr': did you mean crop_border?" in capsys.readouterr().err


def test_an_arch_taking_any_keyword_accepts_any_option_key():
    check_metric_requests(['entropy'], {'entropy': {'anything': 1}})  # EntropyArch takes **kwargs


def test_name_at_tag_rows_are_checked_by_their_pyiqa_name():
    pyiqa_name = lambda name: split_metric_name(name)[0]  # noqa: E731
    check_metric_requests(['niqe@border', 'entropy@plain'], {'niqe@border': {'crop_border': 2}}, pyiqa_name)
    with pytest.raises(MetricRequestError, match="unknown metric 'nique@x': did you mean .*niqe"):
        check_metric_requests(['nique@x'], {}, pyiqa_name)


def test_offline_missing_pyiqa_file_says_which_file_to_put_where(empty_cache, no_network, monkeypatch, capsys):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    created, failed = build_metrics(['niqe', 'entropy'], {}, 'cpu')
    assert list(created) == ['entropy']
    error = failed['niqe']
    assert isinstance(error, MissingWeightsError)
    assert f'put niqe_modelparameters.mat (from {error.url}) into {empty_cache}' in str(error)
    assert 'pretrained_model_path=FILE' in str(error) and 'URLError' not in str(error)
    assert 'Downloading' not in capsys.readouterr().out


def test_failed_download_says_which_file_to_put_where(empty_cache, no_network, monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE')
    _, failed = build_metrics(['niqe'], {}, 'cpu')
    assert isinstance(failed['niqe'], MissingWeightsError)
    assert 'could not be downloaded' in str(failed['niqe']) and f'into {empty_cache}' in str(failed['niqe'])
    assert not (empty_cache / 'niqe_modelparameters.mat').exists()


def test_the_download_watch_is_gone_after_creation(empty_cache):
    download = download_util.download_url_to_file
    build_metrics(['niqe'], {}, 'cpu')
    assert download_util.download_url_to_file is download and 'print' not in vars(download_util)


def test_typed_failures_round_trip_through_a_csv_row():
    failures = [Failure(None, '/p/a.png', 'cannot read image /p/a.png: truncated'),
                Failure('piqe', '/p/a.png', 'RuntimeError: too small: 1x1')]
    row = csv_row('/p/a.png', '', {'entropy': 7.25}, ['entropy', 'piqe'], failures)
    assert parse_row(row, ['entropy', 'piqe']) == ({'entropy': 7.25}, failures)


def test_resume_reads_back_the_failures_of_the_kept_rows(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    _tiny_png(folder / 'a.png')
    _tiny_png(folder / 'dot.png', size=1)  # piqe needs 16x16 blocks
    (folder / 'broken.png').write_bytes(b'not an image')
    out_csv = tmp_path / 'scores.csv'
    first = score_images(['entropy', 'piqe'], str(folder), progress=False, csv_path=str(out_csv))
    assert {f.kind for f in first.errors} == {'image', 'score'}
    again = score_images(['entropy', 'piqe'], str(folder), progress=False, csv_path=str(out_csv), resume=True)
    assert again.errors == first.errors

"""Released weights: resolved through pyiqa's cache, never downloaded in tests, clear errors offline."""
import shutil
import socket

import pyiqa
import pytest
import torch
from pyiqa.utils import download_util

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS
from pyiqa_grmp.pretrained import DEFAULT_VARIANT, WEIGHT_VARIANTS, WeightsNotFoundError, resolve_weights

DEFAULT = WEIGHT_VARIANTS[DEFAULT_VARIANT]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(download_util, 'DEFAULT_CACHE_DIR', str(tmp_path))
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def test_default_metric_uses_the_authors_livec_checkpoint():
    assert DEFAULT.file_name == 'clive_50_prompt_lda_5.0.pt'
    assert DEFAULT.url() == 'https://huggingface.co/zzhowe/GRMP-IQA/resolve/main/clive_50_prompt_lda_5.0.pt'
    assert DEFAULT.metric_name == 'grmp_iqa'


def test_cached_file_is_used_without_network(cache_dir, no_network, monkeypatch, tiny_checkpoint):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    shutil.copy(tiny_checkpoint, cache_dir / DEFAULT.file_name)
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', backbone=TINY_BACKBONE,
                                 num_visual_prompts=TINY_NUM_PROMPTS)
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(metric(images), make_tiny_model(seed=3)(images))


def test_missing_file_offline_names_file_url_location_and_alternative(cache_dir, no_network):
    with pytest.raises(WeightsNotFoundError) as error:
        pyiqa.create_metric('grmp_iqa', device='cpu')
    message = str(error.value)
    assert DEFAULT.file_name in message
    assert DEFAULT.url() in message
    assert str(cache_dir / DEFAULT.file_name) in message
    assert 'pretrained_model_path=' in message


def test_failed_download_gives_the_same_guidance_and_leaves_no_partial_file(cache_dir, monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)

    def failing_download(url, model_dir=None, progress=True, file_name=None):
        (cache_dir / file_name).write_bytes(b'')
        raise OSError('Name or service not known')

    monkeypatch.setattr(download_util, 'load_file_from_url', failing_download)
    with pytest.raises(WeightsNotFoundError, match='could not be downloaded .*Name or service not known'):
        resolve_weights()
    assert not (cache_dir / DEFAULT.file_name).exists()


def test_hf_endpoint_mirror_is_honoured(monkeypatch):
    monkeypatch.setenv('HF_ENDPOINT', 'https://hf-mirror.com/')
    assert DEFAULT.url() == 'https://hf-mirror.com/zzhowe/GRMP-IQA/resolve/main/clive_50_prompt_lda_5.0.pt'


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(KeyError, match=DEFAULT_VARIANT):
        resolve_weights('no_such_weights')

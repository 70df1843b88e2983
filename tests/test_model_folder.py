"""Model folders (model.safetensors, config.json, README.md) and checkpoints that say what network they are: each
loads with its path alone, nothing in it is pickled, fp16 stays within its measured bound, and the Hugging Face
cache layout is found offline."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pyiqa
import pytest
import torch
import yaml
from pyiqa.archs import build_network
from pyiqa.models import build_model

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, scores_of, training_options
from pyiqa_grmp.archs.checkpoint import CheckpointMismatchError
from pyiqa_grmp.cli import main
from pyiqa_grmp.model_folder import (CONFIG_FILE, WEIGHTS_FILE, ModelFolderError, export_checkpoint, read_model,
                                     sha256_of)

TINY_NETWORK = {'backbone': TINY_BACKBONE, 'num_visual_prompts': TINY_NUM_PROMPTS}
#: Bound of the score deviation of fp16-stored weights from fp32 (scores in (0, 1)). Measured on tiny random models
#: (seeds 0-2, 32 random images each): at most 5.6e-4; the bound leaves room for other models and images.
HALF_BOUND = 2e-3
CONFIG = Path(__file__).resolve().parent.parent / 'configs' / 'smoke' / 'finetune_synthetic.yml'


def _reference(checkpoint):
    """The tiny model of ``checkpoint`` built with its options given by hand, as before checkpoints described
    their network."""
    return build_network({'type': 'GRMPIQA', **TINY_NETWORK, 'pretrained_model_path': checkpoint}).eval()


@pytest.fixture(scope='module')
def images():
    return torch.rand(4, 3, 244, 244, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def folder(tiny_checkpoint, tmp_path_factory):
    return export_checkpoint(tiny_checkpoint, str(tmp_path_factory.mktemp('export') / 'tiny'), network=TINY_NETWORK)


def test_folder_loads_with_its_path_alone_and_scores_as_the_checkpoint(folder, tiny_checkpoint, images):
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=folder)
    assert torch.equal(scores_of(metric, images), scores_of(_reference(tiny_checkpoint), images))


def test_score_command_loads_the_folder_with_its_path_alone(folder, tmp_path):
    from PIL import Image

    Image.new('RGB', (64, 48), (120, 30, 200)).save(tmp_path / 'a.png')
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(['score', 'grmp_iqa', '-t', str(tmp_path / 'a.png'), '--device', 'cpu',
                       '--metric-opt', f'grmp_iqa:pretrained_model_path={folder}', '--csv', str(tmp_path / 's.csv')])
    assert status == 0 and 'a.png' in (tmp_path / 's.csv').read_text()


def test_config_says_what_network_and_base_weights_it_is(folder, tiny_checkpoint):
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    assert config['network']['backbone'] == TINY_BACKBONE
    assert config['network']['num_visual_prompts'] == TINY_NUM_PROMPTS
    assert (config['network']['resize'], config['network']['crop']) == (244, 224)
    assert config['score'] == {'lower_better': False, 'range': [0.0, 1.0],
                               'meaning': 'probability of "high quality"; higher is better'}
    assert config['base_weights']['sha256'] == sha256_of(tiny_checkpoint)
    assert config['dtype'] == 'float32' and config['package_version']


def test_model_card_has_the_lines_to_use_it_and_the_licence(folder):
    card = (Path(folder) / 'README.md').read_text()
    assert "pyiqa.create_metric('grmp_iqa', pretrained_model_path='tiny')  # the path of this folder" in card
    assert '## Intended use and limits' in card and '## Licence' in card


def test_safetensors_file_is_json_header_and_raw_tensors_only(folder):
    from safetensors import safe_open

    data = (Path(folder) / WEIGHTS_FILE).read_bytes()
    length = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + length])
    tensors = {k: v for k, v in header.items() if k != '__metadata__'}
    # every byte after the header belongs to exactly one tensor: nothing else (no pickle) fits in the file
    extents = sorted(tuple(entry['data_offsets']) for entry in tensors.values())
    assert extents[0][0] == 0 and extents[-1][1] == len(data) - 8 - length
    assert all(a[1] == b[0] for a, b in zip(extents, extents[1:]))
    assert data[:2] != b'PK' and data[0] != 0x80  # not torch's zip archive, not a pickle stream
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework='pt') as handle:
        assert set(handle.keys()) == set(tensors)


def test_half_stores_fp16_and_scores_within_the_measured_deviation(folder, tiny_checkpoint, images, tmp_path):
    half = export_checkpoint(tiny_checkpoint, str(tmp_path / 'half'), half=True, network=TINY_NETWORK)
    assert {t.dtype for t in read_model(half).state_dict.values()} == {torch.float16}
    full = scores_of(pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=folder), images)
    halved = scores_of(pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=half), images)
    assert 0 < (full - halved).abs().max() <= HALF_BOUND
    assert os.path.getsize(Path(half) / WEIGHTS_FILE) < 0.6 * os.path.getsize(Path(folder) / WEIGHTS_FILE)


def _hub_cache(tmp_path, folder, repo='someone/grmp-tiny', commit='0123456789abcdef0123456789abcdef01234567'):
    """A Hugging Face hub cache holding ``folder`` as the snapshot of ``repo`` at ``commit`` (main)."""
    cache = tmp_path / 'hub'
    repo_dir = cache / f'models--{repo.replace("/", "--")}'
    shutil.copytree(folder, repo_dir / 'snapshots' / commit)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(commit)
    return cache


def test_hugging_face_cache_layout_is_found_offline(folder, images, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_CACHE', str(_hub_cache(tmp_path, folder)))
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path='hf://someone/grmp-tiny')
    expected = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=folder)
    assert torch.equal(scores_of(metric, images), scores_of(expected, images))


def test_model_missing_from_the_hugging_face_cache_says_how_to_fetch_it(folder, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_CACHE', str(_hub_cache(tmp_path, folder)))
    with pytest.raises(FileNotFoundError, match='hf://someone/other is not in the Hugging Face cache.*hf download '
                                                'someone/other'):
        read_model('hf://someone/other')


def test_options_contradicting_the_folder_are_an_error_naming_both(folder):
    with pytest.raises(ModelFolderError, match=f'num_visual_prompts=7 given, num_visual_prompts={TINY_NUM_PROMPTS} '
                                               'in .*tiny'):
        pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=folder, num_visual_prompts=7)


def test_a_file_that_is_not_safetensors_is_refused_naming_it(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / 'broken')
    (broken / WEIGHTS_FILE).write_bytes(b'\x80\x04not a safetensors file at all')
    with pytest.raises(ModelFolderError, match=f'{broken / WEIGHTS_FILE} is not a safetensors file'):
        read_model(str(broken))


def test_integer_tensors_are_refused_from_the_header(tmp_path):
    from safetensors.torch import save_file

    save_file({'clip.logit_scale': torch.zeros(3, dtype=torch.int64)}, str(tmp_path / 'w.safetensors'))
    with pytest.raises(ModelFolderError, match="tensor 'clip.logit_scale' has dtype 'I64'"):
        read_model(str(tmp_path / 'w.safetensors'))


def test_export_command_writes_a_folder_from_an_old_checkpoint_and_its_yaml(tiny_checkpoint, images, tmp_path):
    (tmp_path / 'train.yml').write_text(yaml.safe_dump({'network': {'type': 'GRMPIQA', **TINY_NETWORK}}))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(['export', tiny_checkpoint, str(tmp_path / 'out'), '--network-yaml', str(tmp_path / 'train.yml')])
    assert status == 0 and 'pretrained_model_path=' in buffer.getvalue()
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=str(tmp_path / 'out'))
    assert torch.equal(scores_of(metric, images), scores_of(_reference(tiny_checkpoint), images))


def test_checkpoint_written_by_training_loads_with_its_path_alone(synthetic_workdir, images):
    opt = training_options(CONFIG, synthetic_workdir)
    model = build_model(opt)
    model.save_network(model.net, 'net_best')
    path = os.path.join(opt['path']['models'], 'net_best.pth')
    saved = torch.load(path, weights_only=True)
    assert saved['network']['backbone'] == opt['network']['backbone']
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', pretrained_model_path=path)
    assert torch.equal(scores_of(metric, images), scores_of(model.get_bare_model(model.net).eval(), images))


def test_old_checkpoint_of_another_network_says_pass_the_network_options(tiny_checkpoint):
    with pytest.raises(CheckpointMismatchError) as error:
        build_network({'type': 'GRMPIQA', 'backbone': TINY_BACKBONE, 'num_visual_prompts': 7,
                       'pretrained_model_path': tiny_checkpoint})
    assert 'pass the `network:` options of its YAML' in str(error.value)
    assert 'missing keys (' not in str(error.value) and len(str(error.value)) < 700

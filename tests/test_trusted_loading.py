"""No file or option reaches code through pyiqa's loaders: pickled weights, TorchScript and split files.

Every payload is first shown to run when loaded naively (plain ``torch.load(weights_only=False)`` or
``pickle.load``); the command then runs it through pyiqa's loaders and the marker it would create stays absent.
"""
import os
import pickle

import numpy as np
import pandas as pd
import pyiqa
import pytest
import torch
import yaml
from PIL import Image

from grmp_test_utils import run_main
from pyiqa_grmp.trusted_loading import RefusedFileError, read_split_file, trusted_loading

TIMEOUT = 180
SMOKE_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'smoke', 'finetune_synthetic.yml')


class Payload:
    """Unpickling it creates the folder ``marker``: code run by whoever loads the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickled_weights(path, marker) -> str:
    torch.save({'params': Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the naive read runs it
    assert os.path.isdir(marker)
    os.rmdir(marker)
    return str(path)


def _pickled_split(path, marker) -> str:
    with open(path, 'wb') as handle:
        pickle.dump({1: {'train': Payload(marker)}}, handle)
    with open(path, 'rb') as handle:
        pickle.load(handle)  # the naive read runs it
    assert os.path.isdir(marker)
    os.rmdir(marker)
    return str(path)


class _Ran:
    """One ``pyiqa-grmp`` command run on its payload in this process, from ``cwd``."""

    def __init__(self, args, cwd, payload, marker):
        self.payload, self.marker = payload, marker
        self.status, out, err = run_main(args, cwd)
        self.output = out + err

    def result(self):
        """(exit status, standard output + error)."""
        return self.status, self.output


def _general_nr_yaml(path, split_file) -> str:
    """The smoke fine-tuning YAML with a pyiqa GeneralNRDataset (reading ``split_file``) as its train set."""
    opt = yaml.safe_load(open(SMOKE_CONFIG).read())
    opt['name'] = f'refused_{path.parent.name}'  # one experiment folder per run: no archiving of another's
    opt['datasets']['train'] = {'name': 'synthetic', 'type': 'GeneralNRDataset', 'split_file': split_file,
                                'dataroot_target': 'datasets/synthetic',
                                'meta_info_file': 'datasets/synthetic/meta_info_synthetic.csv',
                                'batch_size_per_gpu': 4, 'num_worker_per_gpu': 0, 'use_shuffle': True,
                                'dataset_enlarge_ratio': 1, 'prefetch_mode': None}
    path.write_text(yaml.safe_dump(opt))
    return str(path)


@pytest.fixture(scope='module')
def commands(tmp_path_factory, synthetic_workdir, tiny_checkpoint):
    """Every entry point run on its payload, in this process (a refusal comes before anything else happens).

    Each payload is first shown to run under a naive load; the commands then read it through pyiqa's loaders.
    """
    from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS

    root = tmp_path_factory.mktemp('payloads')
    images = root / 'img'
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f'{index}.png')
    pd.DataFrame({'name': [f'{i}.png' for i in range(4)], 'mos': [1.0, 2.0, 3.0, 4.0]}).to_csv(
        root / 'meta.csv', index=False)
    data = synthetic_workdir / 'datasets' / 'synthetic'
    (root / 'tiny.yml').write_text(yaml.safe_dump({  # adapt: a tiny network, a pyiqa dataset that --set can point
        'network': {'backbone': TINY_BACKBONE, 'num_visual_prompts': TINY_NUM_PROMPTS},
        'datasets': {'train': {'type': 'GeneralNRDataset', 'split_file': 'splits.pkl'}}}))

    def weights_option(folder):
        return f'cnniqa:pretrained_model_path={folder / "evil.pth"}'

    def split_file(folder):
        return str(folder / 'evil.pkl')

    runs = {  # name -> (payload writer, command arguments given the run's folder, working directory)
        'score': (_pickled_weights, lambda f: ['score', 'cnniqa', '-t', str(images), '--workers', '0', '--device',
                                               'cpu', '--metric-opt', weights_option(f)], root),
        'compare': (_pickled_weights, lambda f: ['compare', 'cnniqa', '--meta-info', str(root / 'meta.csv'),
                                                 '--root', str(images), '--workers', '0', '--device', 'cpu',
                                                 '--out', str(f / 'out'), '--metric-opt', weights_option(f)], root),
        'demo': (_pickled_weights, lambda f: ['demo', '--metrics', 'cnniqa', '--size', '64', '--device', 'cpu',
                                              '--out', str(f / 'out'), '--metric-opt', weights_option(f)], root),
        'train_yaml': (_pickled_split, lambda f: ['train', '-opt', _general_nr_yaml(f / 'opt.yml', split_file(f))],
                       synthetic_workdir),
        'train_force_yml': (_pickled_split, lambda f: [  # --force_yml changes a key the YAML has
            'train', '-opt', _general_nr_yaml(f / 'opt.yml', 'splits.pkl'),
            '--force_yml', f'datasets:train:split_file={split_file(f)}'], synthetic_workdir),
        'adapt_set': (_pickled_split, lambda f: [
            'adapt', '--meta-info', str(data / 'meta_info_synthetic.csv'), '--root', str(data), '--out',
            str(f / 'run'), '--from', tiny_checkpoint, '--override', str(root / 'tiny.yml'), '--preset', 'cpu',
            '--shots', '24', '--num-val', '8', '--device', 'cpu',
            '--set', f'datasets:train:split_file={split_file(f)}'], root),
    }
    ran = {}
    for name, (write_payload, arguments, cwd) in runs.items():
        folder = root / name
        folder.mkdir()
        payload = write_payload(folder / ('evil.pth' if write_payload is _pickled_weights else 'evil.pkl'),
                                folder / 'marker')
        ran[name] = _Ran(arguments(folder), cwd, payload, folder / 'marker')
    return ran


def _assert_refused(run, option):
    """The command ran, created no marker, and named the file and the option; no traceback."""
    status, output = run.result()
    assert not os.path.exists(run.marker), output
    assert f'refused {run.payload} (option {option})' in output, output
    assert 'Traceback' not in output, output
    return status, output


# ------------------------------------------------------------------------------------- metrics: the commands
def test_score_refuses_pickled_code_in_pretrained_model_path(commands):
    status, output = _assert_refused(commands['score'], 'pretrained_model_path')
    assert status == 1 and 'cannot create metric: RefusedFileError' in output


def test_compare_refuses_pickled_code_in_pretrained_model_path(commands):
    status, _ = _assert_refused(commands['compare'], 'pretrained_model_path')
    assert status == 1


def test_demo_refuses_pickled_code_in_pretrained_model_path(commands):
    status, _ = _assert_refused(commands['demo'], 'pretrained_model_path')
    assert status != 0


# ---------------------------------------------------------------------------------- split files: the commands
def test_train_refuses_pickled_code_in_a_yaml_split_file(commands):
    status, _ = _assert_refused(commands['train_yaml'], 'split_file')
    assert status == 2


def test_train_refuses_pickled_code_in_a_force_yml_split_file(commands):
    status, _ = _assert_refused(commands['train_force_yml'], 'split_file')
    assert status == 2


def test_adapt_refuses_pickled_code_in_a_set_split_file(commands):
    status, _ = _assert_refused(commands['adapt_set'], 'split_file')
    assert status == 2


# ----------------------------------------------------------------------------------- what still loads
@pytest.fixture
def cnniqa_weights(tmp_path) -> str:
    """A legitimate cnniqa state dict in pyiqa's format ({'params': state_dict}), random weights."""
    from pyiqa.archs.cnniqa_arch import CNNIQA

    path = tmp_path / 'cnniqa.pth'
    torch.save({'params': CNNIQA(pretrained=None).state_dict()}, path)
    return str(path)


def test_a_pyiqa_state_dict_given_as_pretrained_model_path_loads_and_scores(cnniqa_weights):
    with trusted_loading({'pretrained_model_path': cnniqa_weights}):
        metric = pyiqa.create_metric('cnniqa', pretrained_model_path=cnniqa_weights, device='cpu')
    assert torch.isfinite(metric(torch.rand(1, 3, 64, 64))).all()


def test_numpy_arrays_in_weights_load_under_the_guard(tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save({'params': {'w': torch.ones(2)}, 'best': np.float64(0.5), 'curve': np.arange(3)}, path)
    with trusted_loading():
        loaded = torch.load(path, weights_only=False)
    assert loaded['best'] == 0.5 and loaded['curve'].tolist() == [0, 1, 2]


def test_a_legitimate_split_pickle_selects_rows_of_a_general_nr_dataset(synthetic_workdir, tmp_path):
    from pyiqa.data import build_dataset

    split = tmp_path / 'split.pkl'
    with open(split, 'wb') as handle:
        pickle.dump({1: {'train': [0, 2, 5], 'val': [1], 'test': [3, 4]}}, handle)
    data = synthetic_workdir / 'datasets' / 'synthetic'
    with trusted_loading():
        dataset = build_dataset({'name': 's', 'type': 'GeneralNRDataset', 'phase': 'train', 'split_file': str(split),
                                 'dataroot_target': str(data), 'meta_info_file': str(data / 'meta_info_synthetic.csv')})
    rows = pd.read_csv(data / 'meta_info_synthetic.csv').iloc[[0, 2, 5], 0].tolist()
    assert [os.path.basename(path) for path, _ in dataset.paths_mos] == [os.path.basename(r) for r in rows]


# ----------------------------------------------------------------------------------- malformed split files
@pytest.mark.parametrize('content, reason', [
    ([[0, 1]], 'not a non-empty dict'),
    ({1: [0, 1]}, "split 1 is a list"),
    ({1: {'train': [0, 10 ** 6]}}, 'holds 1000000, not a row index of the'),
    ({1: {'train': [-1]}}, 'holds -1'),
    ({1: {'train': ['0']}}, "holds '0'"),
    ({2: {'train': [0]}}, 'no split_index 1'),
    ({1: {'train': np.arange(3)}}, 'names the global numpy'),
])
def test_a_malformed_split_file_is_refused_naming_file_and_option(synthetic_workdir, tmp_path, content, reason):
    from pyiqa.data import build_dataset

    split = tmp_path / 'bad.pkl'
    with open(split, 'wb') as handle:
        pickle.dump(content, handle)
    data = synthetic_workdir / 'datasets' / 'synthetic'
    with trusted_loading(), pytest.raises(RefusedFileError, match=reason) as refused:
        build_dataset({'name': 's', 'type': 'GeneralNRDataset', 'phase': 'train', 'split_file': str(split),
                       'dataroot_target': str(data), 'meta_info_file': str(data / 'meta_info_synthetic.csv')})
    assert (refused.value.path, refused.value.option) == (str(split), 'split_file')


def test_a_split_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    import pyiqa_grmp.trusted_loading as trusted

    split = tmp_path / 'big.pkl'
    split.write_bytes(pickle.dumps({1: {'train': list(range(100))}}))
    monkeypatch.setattr(trusted, 'SPLIT_FILE_MAX_BYTES', 64)
    with pytest.raises(RefusedFileError, match='larger than'):
        read_split_file(str(split))


def test_a_truncated_split_file_is_refused(tmp_path):
    split = tmp_path / 'cut.pkl'
    split.write_bytes(pickle.dumps({1: {'train': [0, 1, 2]}})[:-4])
    with pytest.raises(RefusedFileError, match='not a readable split pickle'):
        read_split_file(str(split))


# ----------------------------------------------------------------------------------- TorchScript, scope
def test_a_torchscript_backbone_given_by_the_user_is_refused(tmp_path):
    from pyiqa.archs import clip_model

    path = str(tmp_path / 'scripted.pt')
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with trusted_loading({'backbone': path}), pytest.raises(RefusedFileError, match='TorchScript') as refused:
        clip_model.load(path, 'cpu')
    assert refused.value.option == 'backbone'


def test_a_torchscript_file_given_as_pretrained_model_path_is_refused(tmp_path):
    path = str(tmp_path / 'scripted.pt')
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with trusted_loading({'pretrained_model_path': path}), \
            pytest.raises(RefusedFileError, match='TorchScript') as refused:
        pyiqa.create_metric('cnniqa', pretrained_model_path=path, device='cpu')
    assert refused.value.option == 'pretrained_model_path'


def test_topiq_semantic_model_name_is_never_evaluated(tmp_path):
    from pyiqa.archs import topiq_swin

    from pyiqa_grmp.scoring import ScoreReport, create_metrics

    marker = tmp_path / 'marker'
    payload = f"__import__('os').mkdir({str(marker)!r}) or 'swin'"
    with pytest.raises(KeyError):
        topiq_swin.create_swin(payload)  # pyiqa's own call evaluates it
    assert marker.is_dir()
    marker.rmdir()
    report = ScoreReport(images=['a.png'], refs={}, metrics=['topiq_nr'])
    assert create_metrics(['topiq_nr'], {'topiq_nr': {'semantic_model_name': payload}}, 'cpu', report) == {}
    assert not marker.exists()
    reason = report.errors[0].reason
    assert 'RefusedInputError' in reason and 'option semantic_model_name' in reason


def test_the_guard_patches_nothing_outside_its_block():
    from pyiqa.archs import arch_util
    from pyiqa.data import base_iqa_dataset

    from pyiqa.archs import topiq_swin

    before = (torch.load, torch.jit.load, base_iqa_dataset.pickle, base_iqa_dataset.BaseIQADataset.get_split_with_file)
    with trusted_loading(), trusted_loading():
        assert torch.load is not before[0] and base_iqa_dataset.pickle is not pickle and 'eval' in vars(topiq_swin)
    assert (torch.load, torch.jit.load, base_iqa_dataset.pickle,
            base_iqa_dataset.BaseIQADataset.get_split_with_file) == before
    assert 'eval' not in vars(topiq_swin)
    assert arch_util.torch.load is torch.serialization.load

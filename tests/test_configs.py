"""The paper configs parse with pyiqa, carry the paper's hyperparameters, and fail early without their data."""
from pathlib import Path

import pytest
from pyiqa.data import build_dataset

from pyiqa_grmp.data.fewshot_dataset import DatasetConfigError
from pyiqa_grmp.training import parse_training_options

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
PAPER_CONFIGS = ['finetune_livec_50shot.yml', 'finetune_koniq10k_50shot.yml']


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_config_has_the_official_hyperparameters(name, tmp_path):
    opt, _ = parse_training_options(['-opt', str(CONFIGS / name)], str(tmp_path))
    train, network, data = opt['train'], opt['network'], opt['datasets']['train']
    assert opt['model_type'] == 'GRMPFinetuneModel'
    assert (network['backbone'], network['num_visual_prompts'], network['n_ctx']) == ('ViT-B-16-quickgelu', 100, 4)
    assert (train['optim']['type'], train['optim']['lr'], train['optim']['weight_decay']) == ('SGD', 1e-3, 1e-4)
    assert train['grad_reg'] == {'lam': 5.0, 'mode': 'official', 'temperature': 1.0}
    assert train['lr_plateau'] == {'factor': 0.3, 'patience': 6, 'min_iter': 10, 'min_lr': 5e-7}
    assert train['total_epoch'] == 2000 and opt['val']['val_freq'] == 5
    assert (data['num_shots'], data['train_ratio'], data['batch_size_per_gpu']) == (50, 0.8, 50)
    assert opt['val']['select_by'] == ['srcc', 'plcc']


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_config_without_its_data_fails_naming_the_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt, _ = parse_training_options(['-opt', str(CONFIGS / name)], str(tmp_path))
    with pytest.raises(DatasetConfigError, match='meta_info_file .* not found'):
        build_dataset(opt['datasets']['train'])


def test_unregistered_model_type_fails_before_training(tmp_path):
    config = (CONFIGS / 'smoke' / 'finetune_synthetic.yml').read_text().replace(
        'model_type: GRMPFinetuneModel', 'model_type: NoSuchModel')
    (tmp_path / 'bad.yml').write_text(config)
    with pytest.raises(ValueError, match="model_type 'NoSuchModel' is not registered"):
        parse_training_options(['-opt', str(tmp_path / 'bad.yml')], str(tmp_path))

"""The paper configs parse with pyiqa, carry the paper's hyperparameters, and fail early without their data."""
from pathlib import Path

import pytest
from pyiqa.data import build_dataset

from grmp_test_utils import nested_settings, settings_that_differ
from pyiqa_grmp.data.fewshot_dataset import DatasetConfigError
from pyiqa_grmp.presets import paper_settings
from pyiqa_grmp.training import parse_training_options

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
PAPER_CONFIGS = ['finetune_livec_50shot.yml', 'finetune_koniq10k_50shot.yml']
#: Every config of the paper in configs/ and the section of presets/paper.yml it carries.
STAGE_OF_CONFIG = {**{name: 'finetune' for name in PAPER_CONFIGS},
                   'meta_pretrain_kadid10k_tid2013.yml': 'meta_pretrain'}


@pytest.mark.parametrize('name, stage', STAGE_OF_CONFIG.items())
def test_paper_config_agrees_with_paper_yml_on_every_paper_setting(name, stage, tmp_path):
    opt, _ = parse_training_options(['-opt', str(CONFIGS / name)], str(tmp_path))
    settings = paper_settings(stage)
    assert len(nested_settings(settings)) >= 15
    differing = settings_that_differ(opt, settings)
    assert not differing, f'{name} differs from presets/paper.yml (config, paper): {differing}'


def test_every_paper_config_is_checked_against_paper_yml():
    configs = sorted(p.name for p in CONFIGS.glob('*.yml') if p.name.startswith(('finetune_', 'meta_pretrain_')))
    assert configs == sorted(STAGE_OF_CONFIG)


def test_paper_settings_match_the_official_code():
    """The numbers themselves, against the official code (a changed paper.yml must change this test too)."""
    finetune, meta = paper_settings('finetune'), paper_settings('meta_pretrain')
    assert finetune['train']['optim'] == {'type': 'SGD', 'lr': 1e-3, 'weight_decay': 1e-4}
    assert finetune['train']['grad_reg'] == {'lam': 5.0, 'mode': 'official', 'temperature': 1.0}
    assert finetune['train']['lr_plateau'] == {'factor': 0.3, 'patience': 6, 'min_iter': 10, 'min_lr': 5e-7}
    assert (finetune['train']['total_epoch'], finetune['val']['val_freq']) == (2000, 5)
    assert finetune['datasets']['train']['num_shots'] == 50 and finetune['manual_seed'] == 2024
    assert meta['train']['optim'] == {'type': 'Adam', 'lr': 1e-4} and meta['train']['total_epoch'] == 50
    assert (meta['train']['meta']['outer_step'], meta['train']['meta']['support_batch'],
            meta['train']['meta']['query_batch']) == (0.01, 75, 50)


def test_model_defaults_and_adapt_presets_are_the_paper_settings():
    from pyiqa_grmp.adaptation import PRESETS
    from pyiqa_grmp.models.finetune_model import DEFAULT_GRAD_REG, DEFAULT_LR_PLATEAU, DEFAULT_TRAINABLE
    from pyiqa_grmp.models.meta_model import DEFAULT_META

    finetune = paper_settings('finetune')
    assert (DEFAULT_TRAINABLE, DEFAULT_GRAD_REG, DEFAULT_LR_PLATEAU) == (
        finetune['train']['trainable'], finetune['train']['grad_reg'], finetune['train']['lr_plateau'])
    assert DEFAULT_META == paper_settings('meta_pretrain')['train']['meta']
    assert PRESETS['paper']['train'] == finetune['train'] and PRESETS['paper']['val_freq'] == 5
    assert PRESETS['cpu']['train']['grad_reg'] == finetune['train']['grad_reg']


def test_paper_settings_are_fresh_copies():
    paper_settings('finetune')['train']['grad_reg']['lam'] = 0
    assert paper_settings('finetune')['train']['grad_reg']['lam'] == 5.0


def test_paper_yml_is_package_data():
    """Found through importlib.resources (as from an installed wheel), and listed in setup.cfg's package data."""
    import configparser
    from importlib import resources

    assert resources.files('pyiqa_grmp.presets').joinpath('paper.yml').is_file()
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / 'setup.cfg')
    assert 'presets/*.yml' in setup['options.package_data']['pyiqa_grmp'].split()


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

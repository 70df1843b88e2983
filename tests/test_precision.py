"""Scoring precision: bf16 on CPU close to fp32 with fp32 scores and bf16 caches; bad values refused clearly."""
import pyiqa
import pytest
import torch

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS, photo_tensor
from pyiqa_grmp.archs.grmp_arch import GRMPIQA
from pyiqa_grmp.precision import with_precision


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.cat([photo_tensor(name, (300, 300)) for name in ('astronaut', 'coffee', 'chelsea', 'rocket')])


def test_bf16_on_cpu_scores_close_to_fp32_in_float32(images):
    model = make_tiny_model()
    with torch.no_grad():
        exact = model(images)
        model.precision = 'bf16'
        half = model(images)
    assert half.dtype == torch.float32
    difference = (half - exact).abs().max().item()
    # Measured 0.0105 on this tiny random model (scores 0.26-0.38): bf16 keeps 8 bits of mantissa.
    assert 0 < difference < 0.03


def test_bf16_caches_prompt_keys_values_and_text_features_in_bf16(images):
    model = make_tiny_model(precision='bf16')
    with torch.no_grad():
        model(images, return_scene_logits=True)
    keys_values = model._constants['prompt_kv'][1]
    assert {t.dtype for pair in keys_values for t in pair} == {torch.bfloat16}
    assert model._constants['quality_text'][1].dtype == torch.bfloat16
    assert model._constants['scene_text'][1].dtype == torch.bfloat16


def test_scene_logits_are_float32_under_bf16(images):
    model = make_tiny_model(precision='bf16')
    with torch.no_grad():
        score, scene_logits = model(images, return_scene_logits=True)
    assert score.dtype == scene_logits.dtype == torch.float32


def test_switching_back_to_fp32_gives_the_exact_scores_again(images):
    model = make_tiny_model()
    with torch.no_grad():
        exact = model(images)
        model.precision = 'bf16'
        model(images)
        model.precision = 'fp32'
        again = model(images)
    assert torch.equal(again, exact)


def test_bf16_gradients_reach_the_prompts_in_training():
    model = make_tiny_model(precision='bf16').train()
    model(torch.rand(2, 3, 244, 244)).sum().backward()
    assert model.prompt_learner.ctx.grad is not None and torch.isfinite(model.prompt_learner.ctx.grad).all()
    assert model.prompt_learner.ctx.grad.dtype == torch.float32


def test_fp16_on_cpu_is_refused_naming_the_option(images):
    model = make_tiny_model(precision='fp16')
    with pytest.raises(ValueError, match="precision 'fp16' does not run on cpu: fp16 needs CUDA"):
        model(images)


def test_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        make_tiny_model(precision='fp8')


def test_create_metric_takes_the_precision_option(tiny_checkpoint, images):
    kwargs = dict(pretrained_model_path=tiny_checkpoint, backbone=TINY_BACKBONE, num_visual_prompts=TINY_NUM_PROMPTS)
    exact = pyiqa.create_metric('grmp_iqa', device='cpu', **kwargs)(images)
    metric = pyiqa.create_metric('grmp_iqa', device='cpu', precision='bf16', **kwargs)
    assert isinstance(metric.net, GRMPIQA) and metric.net.precision == 'bf16'
    assert (metric(images) - exact).abs().max() < 0.03


def test_with_precision_sets_it_for_grmp_metrics_only_and_an_explicit_option_wins():
    options = with_precision({'grmp_iqa@b': {'precision': 'fp32'}}, ['grmp_iqa@a', 'grmp_iqa@b'], 'bf16')
    assert options == {'grmp_iqa@a': {'precision': 'bf16'}, 'grmp_iqa@b': {'precision': 'fp32'}}


# ------------------------------------------------------------------------------------------ the CLI
def _cli_grmp_options(checkpoint):
    import yaml

    backbone = yaml.safe_dump(TINY_BACKBONE, default_flow_style=True).strip()
    return ['--metric-opt', f'grmp_iqa:pretrained_model_path={checkpoint}', '--metric-opt',
            f'grmp_iqa:backbone={backbone}', '--metric-opt', f'grmp_iqa:num_visual_prompts={TINY_NUM_PROMPTS}']


@pytest.fixture(scope='module')
def two_images(tmp_path_factory):
    from PIL import Image

    from grmp_test_utils import photo

    folder = tmp_path_factory.mktemp('two')
    Image.fromarray(photo('astronaut')).save(folder / 'a.png')
    Image.fromarray(photo('coffee')).save(folder / 'b.png')
    return folder


def _score_csv(args, path):
    import csv

    from pyiqa_grmp.cli import main

    assert main(['score', *args, '--csv', str(path)]) == 0
    return {row['image']: row for row in csv.DictReader(path.open())}


def test_score_precision_bf16_applies_to_grmp_only(two_images, tiny_checkpoint, tmp_path, capsys):
    common = ['grmp_iqa', 'piqe', '-t', str(two_images), '--device', 'cpu', *_cli_grmp_options(tiny_checkpoint)]
    exact = _score_csv(common, tmp_path / 'fp32.csv')
    half = _score_csv([*common, '--precision', 'bf16'], tmp_path / 'bf16.csv')
    assert 'applies to GRMP-IQA metrics only; piqe keep their own precision' in capsys.readouterr().err
    for image, row in exact.items():
        assert half[image]['piqe'] == row['piqe']
        assert 0 < abs(float(half[image]['grmp_iqa']) - float(row['grmp_iqa'])) < 0.03


@pytest.mark.parametrize('command', ['score', 'compare'])
def test_fp16_on_cpu_exits_2_naming_the_option(command, two_images, capsys):
    from pyiqa_grmp.cli import main

    source = ['-t', str(two_images)] if command == 'score' else ['--meta-info', str(two_images / 'meta.csv')]
    assert main([command, 'grmp_iqa', *source, '--device', 'cpu', '--precision', 'fp16']) == 2
    assert "precision 'fp16' does not run on cpu" in capsys.readouterr().err

"""`pyiqa-grmp adapt`: end to end on the synthetic dataset with a tiny backbone, and bad input refused early."""
import contextlib
import io
import json
import os
import re
import shlex

import numpy as np
import pandas as pd
import pyiqa
import pytest
import torch
import yaml
from PIL import Image
from pyiqa.archs import build_network

from conftest import make_tiny_model
from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS
from pyiqa_grmp.adaptation import BOOTSTRAP_RESAMPLES
from pyiqa_grmp.cli import main
from pyiqa_grmp.metrics_log import read_metrics
from pyiqa_grmp.stats import bootstrap_indices, bootstrap_intervals, correlation_values

TINY_NETWORK = {'backbone': TINY_BACKBONE, 'num_visual_prompts': TINY_NUM_PROMPTS}


def _run(argv, errors=None):
    """main(argv) with its standard output captured (and its standard error into ``errors``, a StringIO, if
    given); returns (status, output)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(errors or io.StringIO()):
        status = main(argv)
    return status, buffer.getvalue()


@pytest.fixture(scope='module')
def tiny_start(tmp_path_factory):
    """A tiny random GRMP-IQA checkpoint and the --override file that describes its network."""
    folder = tmp_path_factory.mktemp('start')
    torch.save({'params': make_tiny_model(seed=3).state_dict()}, folder / 'start.pth')
    (folder / 'tiny.yml').write_text(yaml.safe_dump({'network': TINY_NETWORK}))
    return {'checkpoint': str(folder / 'start.pth'), 'override': str(folder / 'tiny.yml')}


@pytest.fixture(scope='module')
def adapted(synthetic_workdir, tiny_start, tmp_path_factory):
    """`pyiqa-grmp adapt` on the synthetic dataset: 24 shots, 8 carved out, 20 % held out, 3 epochs."""
    data = synthetic_workdir / 'datasets' / 'synthetic'
    out = tmp_path_factory.mktemp('adapt') / 'run'
    errors = io.StringIO()
    status, output = _run(['adapt', '--meta-info', str(data / 'meta_info_synthetic.csv'), '--root', str(data),
                           '--out', str(out), '--from', tiny_start['checkpoint'], '--override', tiny_start['override'],
                           '--preset', 'cpu', '--shots', '24', '--num-val', '8', '--device', 'cpu',
                           '--set', 'train:total_epoch=3'], errors)
    assert status == 0
    return {'out': out, 'output': output, 'errors': errors.getvalue(),
            'summary': json.loads((out / 'summary.json').read_text()), 'start': tiny_start['checkpoint']}


def test_adapt_writes_every_output(adapted):
    names = {'model', 'model.pth', 'options.yml', 'report.md', 'summary.json', 'predictions.csv', 'split.csv',
             'curves.png', 'scatter.png'}
    assert names <= set(os.listdir(adapted['out']))
    assert set(os.listdir(adapted['out'] / 'model')) == {'model.safetensors', 'config.json', 'README.md'}
    assert Image.open(adapted['out'] / 'curves.png').format == 'PNG'
    assert Image.open(adapted['out'] / 'scatter.png').format == 'PNG'


def test_adapt_prints_and_stores_the_split(adapted):
    assert 'split (seed 0): 24 shots, 8 validation carve-out, 42 held-out test, 134 unused' in adapted['output']
    roles = pd.read_csv(adapted['out'] / 'split.csv')['role'].value_counts().to_dict()
    assert roles == {'shots': 24, 'val': 8, 'test': 42, 'unused': 134} == adapted['summary']['split']
    assert '| 24 | 8 | 42 | 134 |' in (adapted['out'] / 'report.md').read_text()


def test_options_yml_is_the_training_yaml_that_ran(adapted):
    options = yaml.safe_load((adapted['out'] / 'options.yml').read_text())
    assert options['datasets']['train']['num_shots'] == 24 and options['datasets']['val']['num_val'] == 8
    assert options['train']['total_epoch'] == 3 and options['network']['backbone'] == TINY_BACKBONE
    assert options['network']['pretrained_model_path'] == adapted['start']
    held_out = pd.read_csv(adapted['out'] / 'predictions.csv')['image']
    shots = pd.read_csv(adapted['out'] / 'split.csv').query('role != "test"')['image']
    assert len(held_out) == 42 and not set(held_out) & set(shots)


def test_report_numbers_are_recomputed_from_the_saved_predictions(adapted):
    predictions = pd.read_csv(adapted['out'] / 'predictions.csv')
    results = adapted['summary']['results']
    report = (adapted['out'] / 'report.md').read_text()
    resamples = bootstrap_indices(len(predictions), BOOTSTRAP_RESAMPLES, seed=0)
    for key, column in (('before', 'score_before'), ('after', 'score_after')):
        values = correlation_values(predictions[column], predictions['mos'])
        intervals = bootstrap_intervals(predictions[column], predictions['mos'], resamples)
        for metric in ('srcc', 'plcc', 'krcc'):
            assert results[key][metric] == pytest.approx(values[metric], abs=1e-6)
            assert results[key][f'{metric}_ci'] == pytest.approx(list(intervals[metric]), abs=1e-6)
            low, high = intervals[metric]
            assert f'{values[metric]:.4f} [{low:.4f}, {high:.4f}]' in report


def test_report_compares_against_the_starting_model_on_the_same_images(adapted):
    predictions = pd.read_csv(adapted['out'] / 'predictions.csv')
    start = build_network({'type': 'GRMPIQA', **TINY_NETWORK, 'pretrained_model_path': adapted['start'],
                           'precision': adapted['summary']['settings']['precision']}).eval()  # the run's
    first = np.asarray(Image.open(predictions['image'][0]).convert('RGB').resize((244, 244), Image.BICUBIC))
    with torch.no_grad():
        score = start(torch.from_numpy(first).permute(2, 0, 1)[None].float() / 255).item()
    # uint8 storage vs. float resize; bf16 moves single scores by a few 1e-3 (the held-out scores spread over ~0.5)
    tolerance = 1e-3 if adapted['summary']['settings']['precision'] == 'fp32' else 1e-2
    assert score == pytest.approx(predictions['score_before'][0], abs=tolerance)
    assert not np.allclose(predictions['score_before'], predictions['score_after'])


def test_printed_python_line_loads_the_adapted_model(adapted):
    line = next(l for l in adapted['output'].splitlines() if l.startswith('metric = pyiqa.create_metric('))
    namespace = {'pyiqa': pyiqa}
    exec(line, namespace)  # the line the user copies
    reference = build_network({'type': 'GRMPIQA', **TINY_NETWORK,
                               'pretrained_model_path': str(adapted['out'] / 'model.pth')}).eval()
    images = torch.rand(2, 3, 244, 244)
    with torch.no_grad():
        assert torch.equal(namespace['metric'](images), reference(images))
    saved = torch.load(adapted['out'] / 'model.pth', weights_only=True)['params']
    start = torch.load(adapted['start'], weights_only=True)['params']
    assert any(not torch.equal(saved[k], start[k]) for k in saved)  # fine-tuned, not the start copied


def test_model_folder_loads_with_its_path_alone_and_gives_the_scores_of_predictions_csv(adapted):
    from pyiqa_grmp.evaluation import predict_checkpoint

    options = yaml.safe_load((adapted['out'] / 'options.yml').read_text())
    test_opt = dict(options['datasets']['val'], name='test', phase='test', cache_images=False)
    precision = adapted['summary']['settings']['precision']  # the run's, which the card names (bf16 on a bf16 CPU)
    network = {'type': 'GRMPIQA'} if precision == 'fp32' else {'type': 'GRMPIQA', 'precision': precision}
    _, result = predict_checkpoint(network, str(adapted['out'] / 'model'), test_opt)
    predictions = pd.read_csv(adapted['out'] / 'predictions.csv')
    assert result['pred'] == pytest.approx(predictions['score_after'].to_numpy(), abs=1e-6)


def test_model_card_reports_the_data_split_and_held_out_results(adapted):
    card = (adapted['out'] / 'model' / 'README.md').read_text()
    after = adapted['summary']['results']['after']
    assert '24 shots for training, 8 validation carve-out' in card and '42 held-out test images' in card
    assert f'{after["srcc"]:.4f} [{after["srcc_ci"][0]:.4f}, {after["srcc_ci"][1]:.4f}]' in card
    config = json.loads((adapted['out'] / 'model' / 'config.json').read_text())
    from pyiqa_grmp.model_folder import sha256_of
    assert config['base_weights']['sha256'] == sha256_of(adapted['start'])


def test_printed_cli_line_scores_images(adapted, tmp_path):
    for name in ('a.png', 'b.png'):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    line = next(l for l in adapted['output'].splitlines() if l.startswith('pyiqa-grmp score grmp_iqa'))
    argv = shlex.split(line.replace('YOUR_IMAGES/', str(tmp_path)))[1:]
    assert argv[argv.index('--csv') + 1] == 'scores.csv'  # every image's score, not only the printed mean
    argv[argv.index('--csv') + 1] = str(tmp_path / 'scores.csv')
    status, output = _run(argv + ['--device', 'cpu'])
    assert status == 0 and 'grmp_iqa' in output
    scores = pd.read_csv(tmp_path / 'scores.csv')
    assert len(scores) == 2 and scores['grmp_iqa'].between(0, 1).all()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def labelled(tmp_path):
    """Write `count` small images and a meta CSV; returns a function taking the rows to write."""
    def write(count=60, mos=None, second_column=None):
        rng = np.random.default_rng(0)
        names = [f'img_{i:03d}.png' for i in range(count)]
        for name in names:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
        scores = list(np.linspace(1, 5, count)) if mos is None else mos
        pd.DataFrame({'image_name': names, 'mos' if second_column is None else 'comment':
                      scores if second_column is None else second_column}).to_csv(tmp_path / 'labels.csv',
                                                                                  index=False)
        return names
    return write


def _adapt_bad(tmp_path, tiny_start, capsys, *extra):
    status = main(['adapt', '--meta-info', str(tmp_path / 'labels.csv'), '--root', str(tmp_path),
                   '--out', str(tmp_path / 'run'), '--from', tiny_start['checkpoint'],
                   '--override', tiny_start['override'], '--device', 'cpu', *extra])
    assert status == 2
    assert not (tmp_path / 'run' / 'experiments').exists()  # refused before training
    return capsys.readouterr().err


def test_too_few_images_for_shots_carve_out_and_test_are_refused(labelled, tmp_path, tiny_start, capsys):
    labelled(count=30)
    error = _adapt_bad(tmp_path, tiny_start, capsys, '--shots', '20')
    assert '30 labelled images are too few: 20 shots + 5 validation carve-out + at least 10 held-out' in error


def test_constant_mos_is_refused(labelled, tmp_path, tiny_start, capsys):
    labelled(count=60, mos=[3.0] * 60)
    assert "every score in column 'mos' is 3" in _adapt_bad(tmp_path, tiny_start, capsys)


def test_missing_image_files_are_named(labelled, tmp_path, tiny_start, capsys):
    names = labelled(count=60)
    for name in names[:2]:
        os.remove(tmp_path / name)
    error = _adapt_bad(tmp_path, tiny_start, capsys, '--shots', 'all')
    assert '2 image file(s) missing' in error
    assert all(str(tmp_path / name) in error for name in names[:2])


def test_unreadable_image_file_is_named(labelled, tmp_path, tiny_start, capsys):
    names = labelled(count=60)
    (tmp_path / names[7]).write_bytes(b'not a png at all')
    error = _adapt_bad(tmp_path, tiny_start, capsys)
    assert '1 image file(s) unreadable' in error and str(tmp_path / names[7]) in error


def test_csv_without_a_score_named_column_is_refused_naming_its_columns(labelled, tmp_path, tiny_start, capsys):
    labelled(count=60, second_column=['nice'] * 60)
    error = _adapt_bad(tmp_path, tiny_start, capsys)
    assert "no column named MOS, DMOS or score (in any case); its columns are ['image_name', 'comment']" in error


def test_a_score_column_given_by_name_must_be_numeric(labelled, tmp_path, tiny_start, capsys):
    labelled(count=60, second_column=['nice'] * 60)
    error = _adapt_bad(tmp_path, tiny_start, capsys, '--score-column', 'comment')
    assert "has no numeric score column: column 2 ('comment')" in error


def test_default_start_offline_says_where_to_put_the_weights(labelled, tmp_path, tiny_start, capsys, monkeypatch):
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, 'DEFAULT_CACHE_DIR', str(tmp_path / 'empty_cache'))
    labelled(count=60)
    status = main(['adapt', '--meta-info', str(tmp_path / 'labels.csv'), '--root', str(tmp_path),
                   '--out', str(tmp_path / 'run'), '--device', 'cpu'])
    error = capsys.readouterr().err
    assert status == 2 and 'clive_50_prompt_lda_5.0.pt' in error and str(tmp_path / 'empty_cache') in error


def test_paper_preset_writes_the_paper_settings_of_presets_paper_yml():
    from pyiqa_grmp.adaptation import SplitPlan, build_options
    from pyiqa_grmp.data.labels import LabelledImages
    from grmp_test_utils import nested_settings, settings_that_differ
    from pyiqa_grmp.presets import paper_settings

    labels = LabelledImages(images=[f'/data/{i}.png' for i in range(300)], mos=np.linspace(1, 5, 300),
                            meta_info='/data/labels.csv', root='/data')
    options = build_options(labels, SplitPlan(num_shots=50, num_val=20, train_ratio=0.8, seed=2024), 'paper',
                            '/weights/start.pth', 'cpu', 2024)

    settings = paper_settings('finetune')
    differing = settings_that_differ(options, settings)
    assert len(nested_settings(settings)) >= 15 and not differing, differing


@pytest.mark.parametrize('shots, batch', [(8, 8), (50, 50), (59, 29), (101, 33)])
def test_batch_is_all_shots_up_to_the_preset_limit_then_equal_parts(shots, batch):
    from pyiqa_grmp.adaptation import batch_size

    assert batch_size(shots, 50) == batch


# --------------------------------------------------------------------------------- what the run shows and says
def test_adapt_console_shows_the_trainable_count_and_one_line_per_validation(adapted):
    errors = adapted['errors']
    assert len(re.findall(r'^trainable: [\d,]+ of [\d,]+ parameters \(.*prompt_learner.*\)$', errors, re.M)) == 1
    assert 'will not be optimized' not in errors and 'Network:' not in errors and '-1 day' not in errors
    records = read_metrics(os.path.join(os.path.dirname(adapted['summary']['log_file']), 'metrics.jsonl'))
    validations = [r['iter'] for r in records if r['kind'] == 'val']
    lines = re.findall(r'^adapt: iter (\d+)/\d+  elapsed .* val srcc -?\d\.\d{4}', errors, re.M)
    assert [int(i) for i in lines] == validations


def test_adapt_run_log_holds_the_options_architecture_and_frozen_parameters(adapted):
    log = open(adapted['summary']['log_file']).read()
    assert 'Network: GRMPIQA' in log and 'will not be optimized' in log and 'num_shots: 24' in log


def test_small_carve_out_is_warned_on_the_console_and_in_the_report(adapted):
    warning = next(w for w in adapted['summary']['warnings'] if 'carve-out' in w)
    assert 'chosen on 8 carve-out images (under 10)' in warning
    assert f'warning: {warning}' in adapted['errors']
    report = (adapted['out'] / 'report.md').read_text()
    assert '## Warnings' in report and warning[1:] in report


def test_report_lists_each_setting_that_override_and_set_changed(adapted):
    report = (adapted['out'] / 'report.md').read_text()
    assert '**changed** by `--override ' in report and '`--set train:total_epoch=3`' in report
    assert '  - `train.total_epoch: 12 -> 3`' in report and '  - `network.num_visual_prompts: 100 -> 5`' in report
    assert adapted['summary']['settings']['changed'][-1] == 'train.total_epoch: 12 -> 3'


def test_adapt_trains_in_the_precision_its_preset_chooses_for_this_cpu(adapted):
    from pyiqa_grmp.precision import cpu_bf16_flag

    options = yaml.safe_load((adapted['out'] / 'options.yml').read_text())
    expected = 'bf16' if cpu_bf16_flag() else 'fp32'
    assert (options['train']['amp'] or 'fp32') == adapted['summary']['settings']['precision'] == expected
    assert f'precision: {expected} for training, validation and the held-out scores' in adapted['errors']
    assert f'Precision: {expected} for training, validation and the held-out scores' in \
        (adapted['out'] / 'model' / 'README.md').read_text()


@pytest.mark.parametrize('predictions, losses, expected', [
    (np.linspace(0.4972, 0.4989, 42), [0.75, 0.70, 0.65, 0.60, 0.58], 'learned nothing that ranks images'),
    (np.linspace(0.2, 0.8, 42), [0.72, 0.6933, 0.6929, 0.6935, 0.6931, 0.6930], 'within 0.005 of ln 2'),
    (np.linspace(0.2, 0.8, 42), [0.75, 0.70, 0.65, 0.60, 0.58], None),
])
def test_a_model_that_learned_nothing_is_warned(predictions, losses, expected):
    from pyiqa_grmp.adaptation import run_warnings

    records = [{'kind': 'train', 'iter': i, 'l_quality': loss} for i, loss in enumerate(losses, 1)]
    found = run_warnings(predictions, records, num_val=20)
    assert [expected in w for w in found] == ([True] if expected else [])


@pytest.mark.parametrize('asked, preset, device, flag, expected', [
    (None, 'paper', 'cpu', 'avx512_bf16', 'fp32'), (None, 'cpu', 'cpu', None, 'fp32'),
    (None, 'cpu', 'cuda', 'amx_bf16', 'fp32'), (None, 'cpu', 'cpu', 'amx_bf16', 'bf16'),
    ('bf16', 'paper', 'cpu', None, 'bf16'), ('fp32', 'cpu', 'cpu', 'avx512_bf16', 'fp32'),
])
def test_training_is_fp32_unless_bf16_is_asked_for_or_the_cpu_preset_finds_bf16(asked, preset, device, flag, expected,
                                                                                 monkeypatch):
    from pyiqa_grmp import precision
    from pyiqa_grmp.adaptation import choose_precision

    monkeypatch.setattr(precision, 'cpu_bf16_flag', lambda: flag)
    assert choose_precision(asked, preset, device)[0] == expected


def test_cpu_bf16_flag_reads_the_flags_of_cpuinfo_where_torch_cannot_probe(tmp_path, monkeypatch):
    import torch

    from pyiqa_grmp.precision import cpu_bf16_flag

    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported', raising=False)
    (tmp_path / 'with').write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n')
    (tmp_path / 'without').write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f\n')
    assert cpu_bf16_flag(str(tmp_path / 'with')) == 'avx512_bf16'
    assert cpu_bf16_flag(str(tmp_path / 'without')) is None and cpu_bf16_flag(str(tmp_path / 'absent')) is None

"""pyiqa-grmp compare: the same images and labels for every metric, correlations, failures, outputs, splits."""
import argparse
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyiqa
import pytest
import yaml
from PIL import Image
from pyiqa.utils import download_util
from scipy import stats

from grmp_test_utils import TINY_BACKBONE, TINY_NUM_PROMPTS
from pyiqa_grmp.commands import compare as compare_command
from pyiqa_grmp.comparison import compare, correlations
from pyiqa_grmp.data.fewshot_dataset import FewShotNRDataset
from pyiqa_grmp.data.synthetic import make_synthetic_dataset
from pyiqa_grmp.stats import fit_logistic, logistic_4

OUTPUTS = ('results.csv', 'results.md', 'per_image.csv', 'scatter.png')


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """The synthetic dataset (208 images) and two smaller meta CSVs over the same folder."""
    root = tmp_path_factory.mktemp('compare') / 'synthetic'
    meta = make_synthetic_dataset(str(root), seed=0, size=128)
    table = pd.read_csv(meta)
    table.iloc[::5].to_csv(root / 'meta_small.csv', index=False)  # 42 rows: every distortion and level
    table.iloc[::17].to_csv(root / 'meta_tiny.csv', index=False)  # 13 rows, for the tests of failures
    return SimpleNamespace(root=str(root), meta=meta, small=str(root / 'meta_small.csv'),
                           tiny=str(root / 'meta_tiny.csv'))


def _tiny_grmp(checkpoint, **extra):
    return {'pretrained_model_path': checkpoint, 'backbone': TINY_BACKBONE, 'num_visual_prompts': TINY_NUM_PROMPTS,
            **extra}


def _parse(argv):
    parser = argparse.ArgumentParser(prog='pyiqa-grmp')
    compare_command.add_parser(parser.add_subparsers(dest='command', required=True))
    return parser.parse_args(argv)


def _results(out_dir):
    return pd.read_csv(Path(out_dir) / 'results.csv', keep_default_na=False, na_values=['']).set_index('metric')


def test_outputs_are_written_and_correlations_match_the_per_image_scores(synthetic, tiny_checkpoint, tmp_path):
    out = tmp_path / 'out'
    compare(['grmp_iqa', 'piqe', 'entropy'], meta_info=synthetic.small, root=synthetic.root, device='cpu',
            metric_options={'grmp_iqa': _tiny_grmp(tiny_checkpoint)}, out_dir=str(out), progress=False)
    assert all((out / name).is_file() for name in OUTPUTS)
    results, per_image = _results(out), pd.read_csv(out / 'per_image.csv')
    assert per_image.columns.tolist()[:2] == ['image', 'mos'] and len(per_image) == 42
    for metric, row in results.iterrows():
        assert (row.scored, row.failed) == (42, 0), metric
        predicted = -per_image[metric] if row.lower_better else per_image[metric]
        assert row.srcc == pytest.approx(stats.spearmanr(predicted, per_image.mos)[0], abs=1e-9)
        assert row.krcc == pytest.approx(stats.kendalltau(predicted, per_image.mos)[0], abs=1e-9)
        assert row.plcc == pytest.approx(stats.pearsonr(predicted, per_image.mos)[0], abs=1e-9)
    # piqe is lower-better: its raw scores stay in per_image.csv, its correlations use the negated scores
    assert results.loc['piqe', 'lower_better'] and not results.loc['entropy', 'lower_better']
    assert results.loc['piqe', 'srcc'] == pytest.approx(stats.spearmanr(-per_image.piqe, per_image.mos)[0])
    assert results.loc['piqe', 'srcc'] > 0.3 and (per_image.piqe > 1).all()
    assert (out / 'scatter.png').read_bytes().startswith(b'\x89PNG\r\n\x1a\n')
    with Image.open(out / 'scatter.png') as image:
        image.verify()
    markdown = (out / 'results.md').read_text()
    assert '42 images' in markdown and 'split all' in markdown
    assert all(f'| {metric} |' in markdown for metric in results.index)


def test_unreadable_image_is_reported_for_every_metric_and_the_rest_is_scored(synthetic, tmp_path):
    broken = tmp_path / 'broken.png'
    broken.write_bytes((Path(synthetic.root) / 'images' / 'astronaut_jpeg_3.png').read_bytes()[:600])
    meta = pd.read_csv(synthetic.tiny)
    rows = pd.concat([meta, pd.DataFrame([{'image_name': str(broken), 'mos': 50.0}])])  # absolute path: joins as is
    rows.to_csv(tmp_path / 'meta.csv', index=False)
    table = compare(['piqe', 'entropy'], meta_info=str(tmp_path / 'meta.csv'), root=synthetic.root, device='cpu',
                    out_dir=str(tmp_path / 'out'), progress=False).set_index('metric')
    assert table.scored.tolist() == [13, 13] and table.failed.tolist() == [1, 1]
    assert all('broken.png' in error and 'cannot read image' in error for error in table.error)
    assert table.srcc.notna().all()
    per_image = pd.read_csv(tmp_path / 'out' / 'per_image.csv', keep_default_na=False)
    last = per_image.iloc[-1]
    assert last.image == str(broken) and last.piqe == '' and last.entropy == '' and 'broken.png' in last.errors


def test_image_a_metric_fails_on_fails_for_that_metric_only(synthetic, tmp_path):
    Image.new('RGB', (1, 1), (90, 120, 200)).save(tmp_path / 'dot.png')  # piqe needs 16x16 blocks
    meta = pd.read_csv(synthetic.tiny)
    rows = pd.concat([meta, pd.DataFrame([{'image_name': str(tmp_path / 'dot.png'), 'mos': 50.0}])])
    rows.to_csv(tmp_path / 'meta.csv', index=False)
    table = compare(['piqe', 'entropy'], meta_info=str(tmp_path / 'meta.csv'), root=synthetic.root, device='cpu',
                    progress=False).set_index('metric')
    assert (table.loc['piqe', 'failed'], table.loc['entropy', 'failed']) == (1, 0)
    assert 'dot.png' in table.loc['piqe', 'error'] and table.loc['entropy', 'error'] == ''


def test_unavailable_metric_is_reported_with_its_reason_and_the_others_still_run(synthetic, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(download_util, 'DEFAULT_CACHE_DIR', str(tmp_path / 'empty_cache'))

    local_connect = socket.socket.connect

    def no_network(self, address):  # local (unix) sockets still work: decoding workers pass images through them
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError('network disabled by the test')
        return local_connect(self, address)

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    out = tmp_path / 'out'
    args = _parse(['compare', 'niqe', 'entropy', '--meta-info', synthetic.tiny, '--root', synthetic.root,
                   '--device', 'cpu', '--out', str(out)])
    assert compare_command.run(args) == 1
    results = _results(out)
    assert (results.loc['niqe', 'scored'], results.loc['niqe', 'failed']) == (0, 13)
    assert results.loc['niqe', 'error'].startswith('cannot create metric:')
    assert math.isnan(results.loc['niqe', 'srcc'])
    assert (results.loc['entropy', 'scored'], results.loc['entropy', 'failed']) == (13, 0)
    assert math.isfinite(results.loc['entropy', 'srcc'])
    assert 'FAILED [niqe] cannot create metric' in capsys.readouterr().err


def test_full_reference_metric_without_references_is_reported(synthetic):
    table = compare(['psnr'], meta_info=synthetic.tiny, root=synthetic.root, device='cpu', progress=False)
    assert (table.scored[0], table.failed[0]) == (0, 13) and 'full-reference metric' in table.error[0]


def test_test_split_is_exactly_the_fewshot_test_split(synthetic, tmp_path):
    compare(['entropy'], meta_info=synthetic.meta, root=synthetic.root, split='test', split_seed=7, num_shots=20,
            train_ratio=0.9, device='cpu', out_dir=str(tmp_path), progress=False)
    dataset = FewShotNRDataset({'name': 'synthetic_test', 'type': 'FewShotNRDataset', 'dataroot_target': synthetic.root,
                                'meta_info_file': synthetic.meta, 'num_shots': 20, 'split_seed': 7, 'train_ratio': 0.9,
                                'phase': 'test', 'resize': 64})
    per_image = pd.read_csv(tmp_path / 'per_image.csv')
    assert per_image.image.tolist() == [path for path, _ in dataset.paths_mos] and len(per_image) == 21
    assert np.array_equal(per_image.mos.to_numpy(), dataset.raw_mos)
    assert 'split_seed 7, num_shots 20, train_ratio 0.9' in (tmp_path / 'results.md').read_text()


def test_variants_of_one_metric_give_one_row_each(synthetic, tiny_checkpoint, tmp_path):
    options = {'grmp_iqa@a': _tiny_grmp(tiny_checkpoint), 'grmp_iqa@b': _tiny_grmp(tiny_checkpoint, resize=256)}
    table = compare(['grmp_iqa@a', 'grmp_iqa@b'], meta_info=synthetic.tiny, root=synthetic.root, device='cpu',
                    metric_options=options, out_dir=str(tmp_path), progress=False)
    assert table.metric.tolist() == ['grmp_iqa@a', 'grmp_iqa@b'] and table.scored.tolist() == [13, 13]
    per_image = pd.read_csv(tmp_path / 'per_image.csv')
    assert not np.allclose(per_image['grmp_iqa@a'], per_image['grmp_iqa@b'])


def test_decoding_workers_give_the_scores_of_decoding_in_the_main_process(synthetic, tiny_checkpoint, tmp_path):
    per_image = {}
    for workers in (0, 2):
        compare(['grmp_iqa', 'entropy'], meta_info=synthetic.tiny, root=synthetic.root, device='cpu',
                metric_options={'grmp_iqa': _tiny_grmp(tiny_checkpoint)}, out_dir=str(tmp_path / str(workers)),
                progress=False, workers=workers)
        per_image[workers] = pd.read_csv(tmp_path / str(workers) / 'per_image.csv')
    assert per_image[0].image.tolist() == per_image[2].image.tolist() and len(per_image[0]) == 13
    for metric in ('grmp_iqa', 'entropy'):
        assert np.abs(per_image[0][metric] - per_image[2][metric]).max() <= 1e-6


def test_command_line_end_to_end_with_yaml_metric_options(synthetic, tiny_checkpoint, tmp_path, capsys):
    backbone = yaml.safe_dump(TINY_BACKBONE, default_flow_style=True).strip()  # a flow-style dict
    out = tmp_path / 'out'
    args = _parse(['compare', 'grmp_iqa', 'entropy', '--meta-info', synthetic.tiny, '--root', synthetic.root,
                   '--metric-opt', f'grmp_iqa:pretrained_model_path={tiny_checkpoint}',
                   '--metric-opt', f'grmp_iqa:backbone={backbone}',
                   '--metric-opt', f'grmp_iqa:num_visual_prompts={TINY_NUM_PROMPTS}',
                   '--device', 'cpu', '--batch-size', '4', '--out', str(out)])
    assert compare_command.run(args) == 0  # the tiny checkpoint only loads into the tiny backbone given as YAML
    assert all((out / name).is_file() for name in OUTPUTS)
    assert _results(out).scored.tolist() == [13, 13]
    printed = capsys.readouterr().out
    assert '| grmp_iqa |' in printed and '| entropy |' in printed and '13 images' in printed


def test_logistic_fit_recovers_a_logistic_and_degenerate_input_gives_nan_with_a_reason():
    scores = np.random.default_rng(0).uniform(-40, 60, 80)  # any scale: the fit standardises
    mos = logistic_4(scores, 90.0, 10.0, 10.0, 8.0)
    result = correlations(scores, mos)
    assert result['plcc_logistic'] == pytest.approx(1.0, abs=1e-6) and result['plcc'] < 0.97
    assert result['srcc'] == pytest.approx(1.0) and result['error'] == ''
    assert correlations(-scores, mos, lower_better=True)['plcc_logistic'] == pytest.approx(1.0, abs=1e-6)

    constant = correlations(np.full(20, 0.5), np.linspace(0, 100, 20))
    assert all(math.isnan(constant[key]) for key in ('srcc', 'krcc', 'plcc', 'plcc_logistic'))
    assert 'constant' in constant['error']
    with pytest.raises(ValueError, match='constant'):
        fit_logistic(np.full(20, 0.5), np.linspace(0, 100, 20))


def test_pyiqa_dataset_is_rerooted_and_full_reference_metrics_get_references(synthetic, tmp_path, monkeypatch):
    meta = pd.read_csv(synthetic.meta)
    noisy = meta[meta.distortion == 'gaussian_noise'].iloc[::2]  # 20 rows; PSNR falls with the noise level
    pd.DataFrame({'ref_name': 'images/' + noisy.reference + '_pristine_0.png', 'dist_name': noisy.image_name,
                  'dmos': 100 - noisy.mos}).to_csv(Path(synthetic.root) / 'meta_fr.csv', index=False)
    info = {'name': 'SyntheticFR', 'type': 'GeneralFRDataset', 'dataroot_target': './datasets/synthetic',
            'dataroot_ref': './datasets/synthetic', 'meta_info_file': './datasets/synthetic/meta_fr.csv',
            'lower_better': True}
    monkeypatch.setattr(pyiqa, 'get_dataset_info', lambda name=None: info)
    data_root = os.path.dirname(synthetic.root)
    table = compare(['psnr', 'entropy'], dataset='synthetic_fr', data_root=data_root, device='cpu',
                    out_dir=str(tmp_path), progress=False).set_index('metric')
    per_image = pd.read_csv(tmp_path / 'per_image.csv')
    assert per_image.image.tolist() == [os.path.join(data_root, 'synthetic', n) for n in noisy.image_name]
    assert per_image.reference.str.endswith('_pristine_0.png').all()
    assert table.scored.tolist() == [20, 20]
    assert table.loc['psnr', 'srcc'] > 0.8  # DMOS are negated: high PSNR, low DMOS is agreement
    assert 'lower-better labels' in (tmp_path / 'results.md').read_text()


@pytest.mark.parametrize('kwargs, message', [
    ({'split': 'test'}, 'needs split_seed and num_shots'),
    ({'split': 'test', 'split_seed': 0}, 'needs split_seed and num_shots'),
    ({'split_seed': 0, 'num_shots': 5}, "need split='test'"),
    ({'split': 'val'}, "split must be 'all' or 'test'"),
    ({'dataset': 'livec'}, 'not both or neither'),
    ({'root': None}, 'needs root='),
    ({'metric_options': {'entropy@x': {}}}, 'not compared'),
    ({'metrics': ['entropy', 'entropy']}, 'must be unique'),
    ({'metrics': ['@x']}, 'NAME@TAG'),
    ({'batch_size': 0}, 'batch_size'),
])
def test_bad_arguments_raise_clear_value_errors(synthetic, kwargs, message):
    arguments = {'metrics': ['entropy'], 'meta_info': synthetic.tiny, 'root': synthetic.root, **kwargs}
    with pytest.raises(ValueError, match=message):
        compare(arguments.pop('metrics'), **arguments)

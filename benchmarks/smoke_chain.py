"""How reliably the offline smoke chain shows what the two GRMP stages learn, over several seeds (not a test).

Per seed (applied to every config with ``--force_yml manual_seed=S``), in its own working directory:
configs/smoke/backbone_synthetic.yml (the stand-in for CLIP), meta_pretrain_synthetic.yml (stage 1, Gaussian
blur and the pristine images held out) and finetune_from_meta_synthetic.yml (stage 2 on the held-out images),
the latter also from untrained prompts at the same budget. Printed per seed: zero-shot SRCC on the held-out
images of the meta-prompts and of 8 untrained prompt initialisations, and the test SRCC of fine-tuning from
either start. About 2.5 minutes per seed on 2 CPU threads.

    python benchmarks/smoke_chain.py [--seeds 1 2 3] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd
import torch
import yaml
from pyiqa.archs import build_network
from pyiqa.utils import set_random_seed

from pyiqa_grmp.cli import main
from pyiqa_grmp.comparison import compare
from pyiqa_grmp.data.synthetic import make_synthetic_dataset
from pyiqa_grmp.training import evaluate_checkpoint

SMOKE = Path(__file__).resolve().parent.parent / 'configs' / 'smoke'
HELD_OUT_TYPES = ('gaussian_blur', 'pristine')


def _train(config: str, *overrides: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(['train', '-opt', str(SMOKE / config), '--force_yml', *overrides])
    if code != 0:
        raise RuntimeError(f'training {config} failed (exit {code})')


def _zero_shot(workdir: Path, untrained_seeds: range) -> Dict[str, object]:
    network = yaml.safe_load((SMOKE / 'meta_pretrain_synthetic.yml').read_text())['network']
    network['backbone_pretrained'] = str(workdir / 'experiments/smoke_backbone_synthetic/models/net_best.pth')
    options = {k: v for k, v in network.items() if k not in ('type', 'pretrained')}
    metric_options = {'meta': dict(options, pretrained_model_path=str(
        workdir / 'experiments/smoke_meta_pretrain_synthetic/models/net_best.pth'))}
    for seed in untrained_seeds:
        set_random_seed(seed)
        path = workdir / f'untrained_{seed}.pth'
        torch.save({'params': build_network(copy.deepcopy(network)).state_dict()}, path)
        metric_options[f'untrained_{seed}'] = dict(options, pretrained_model_path=str(path))
    data = workdir / 'datasets' / 'synthetic'
    table = pd.read_csv(data / 'meta_info_synthetic.csv')
    table[table.distortion.isin(HELD_OUT_TYPES)].to_csv(workdir / 'held_out.csv', index=False)
    names = [f'grmp_iqa@{key}' for key in metric_options]
    result = compare(names, meta_info=str(workdir / 'held_out.csv'), root=str(data), progress=False,
                     metric_options=dict(zip(names, metric_options.values())))
    srcc = dict(zip(result['metric'], result['srcc']))
    return {'meta': srcc.pop('grmp_iqa@meta'), 'untrained': np.array(list(srcc.values()))}


def _finetune_test_srcc(workdir: Path, name: str) -> float:
    config = yaml.safe_load((SMOKE / 'finetune_from_meta_synthetic.yml').read_text())
    data = workdir / 'datasets' / 'synthetic'
    test_split = dict(config['datasets']['train'], phase='test', name='held_out_test', dataroot_target=str(data),
                      meta_info_file=str(data / 'meta_info_synthetic.csv'))
    network = dict(config['network'], backbone_pretrained=None)  # the checkpoint carries the whole backbone
    best = workdir / 'experiments' / name / 'models' / 'net_best.pth'
    return evaluate_checkpoint(network, str(best), test_split)['srcc']


def run_chain(workdir: Path, seed: int, untrained_finetune_seeds: List[int]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if not (workdir / 'datasets' / 'synthetic').is_dir():
        make_synthetic_dataset('datasets/synthetic', seed=0, size=128)
    _train('backbone_synthetic.yml', f'manual_seed={seed}')
    _train('meta_pretrain_synthetic.yml', f'manual_seed={seed}')
    _train('finetune_from_meta_synthetic.yml', f'manual_seed={seed}')
    for other in untrained_finetune_seeds:
        _train('finetune_from_meta_synthetic.yml', 'path:pretrain_network=~', f'manual_seed={other}',
               f'name=smoke_finetune_from_untrained_{other}')
    zero_shot = _zero_shot(workdir, range(8))
    from_meta = _finetune_test_srcc(workdir, 'smoke_finetune_from_meta_synthetic')
    from_untrained = np.array([_finetune_test_srcc(workdir, f'smoke_finetune_from_untrained_{s}')
                               for s in untrained_finetune_seeds])
    untrained = zero_shot['untrained']
    print(f'seed {seed}: zero-shot SRCC (blur + pristine, held out of stage 1): meta-prompts {zero_shot["meta"]:.3f}'
          f' | untrained mean {untrained.mean():.3f} std {untrained.std():.3f} {np.round(untrained, 2).tolist()}',
          flush=True)
    print(f'seed {seed}: fine-tuning test SRCC: from meta-prompts {from_meta:.3f} | from untrained mean '
          f'{from_untrained.mean():.3f} {np.round(from_untrained, 2).tolist()}', flush=True)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--untrained-finetune-seeds', type=int, nargs='+', default=[1, 2, 3, 4])
    parser.add_argument('--workdir', default=None, help='default: a temporary folder')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix='smoke_chain_')).resolve()
    print(f'smoke chain, {args.threads} threads, work folders under {root}', flush=True)
    for seed in args.seeds:
        run_chain(root / f'seed{seed}', seed, args.untrained_finetune_seeds)


if __name__ == '__main__':
    main_cli()

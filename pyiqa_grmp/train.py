"""Training entry points: pyiqa's ``train_pipeline`` with the plugin loaded, and the paper's few-shot protocol.

Experiments land under the current directory (``experiments/<name>``), not in site-packages. Resuming works on
CPU as on GPU: pyiqa's own ``load_resume_state`` maps the state to CUDA unconditionally, so while our pipeline
runs it is replaced by :func:`load_resume_state_anywhere`.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence

import torch

import pyiqa_grmp  # noqa: F401  (registers our types)


def load_resume_state_anywhere(opt: dict) -> Optional[dict]:
    """Find the training state to resume from (``--auto_resume`` or ``path.resume_state``), loaded on CPU."""
    path = None
    if opt.get('auto_resume'):
        states = glob.glob(os.path.join(opt['path']['training_states'], '*.state'))
        if states:
            path = max(states, key=lambda p: float(os.path.basename(p)[:-len('.state')]))
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f'resume state {path} not found')
    opt['path']['resume_state'] = path
    return torch.load(path, map_location='cpu', weights_only=True)


@contextlib.contextmanager
def _cpu_capable_resume() -> Iterator[None]:
    import pyiqa.train as pyiqa_train

    original = pyiqa_train.load_resume_state
    pyiqa_train.load_resume_state = load_resume_state_anywhere
    try:
        yield
    finally:
        pyiqa_train.load_resume_state = original


def parse_training_options(argv: Sequence[str], root_path: str) -> tuple:
    """pyiqa's option parsing (``-opt``, ``--auto_resume``, ``--force_yml``, ...) on ``argv``, then our checks.

    pyiqa seeds the random generators before applying ``--force_yml``, so ``--force_yml manual_seed=N`` would
    be recorded but not used; the generators are seeded again here with the final value.
    """
    from pyiqa.utils import set_random_seed
    from pyiqa.utils.options import parse_options

    saved = sys.argv
    sys.argv = ['pyiqa-grmp', *argv]
    try:
        opt, args = parse_options(root_path, is_train=True)
    finally:
        sys.argv = saved
    set_random_seed(opt['manual_seed'] + opt['rank'])
    check_training_options(opt)
    return opt, args


def check_training_options(opt: dict) -> None:
    """Fail before training on a malformed configuration, naming the problem."""
    from pyiqa.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

    problems = [f'missing option {key!r}' for key in ('name', 'model_type', 'network', 'datasets', 'train', 'path')
                if opt.get(key) is None]
    if problems:
        raise ValueError('invalid training config: ' + '; '.join(problems))
    if opt['model_type'] not in MODEL_REGISTRY:
        problems.append(f'model_type {opt["model_type"]!r} is not registered')
    if 'train' not in opt['datasets']:
        problems.append('datasets.train is missing')
    for phase, dataset in opt['datasets'].items():
        if dataset.get('type') not in DATASET_REGISTRY:
            problems.append(f'datasets.{phase}.type {dataset.get("type")!r} is not registered')
    optim = opt['train'].get('optim') or {}
    if 'type' not in optim or 'lr' not in optim:
        problems.append('train.optim needs type and lr')
    elif not hasattr(torch.optim, optim['type']):
        problems.append(f'train.optim.type {optim["type"]!r} is not a torch.optim optimizer')
    if opt.get('val') is not None and not opt['val'].get('metrics'):
        problems.append('val.metrics is required when val is given')
    if problems:
        raise ValueError('invalid training config: ' + '; '.join(problems))
    fit_batch_to_shots(opt['datasets']['train'])


def fit_batch_to_shots(dataset: dict) -> None:
    """Lower a few-shot train set's ``batch_size_per_gpu`` to its number of shots (x enlarge ratio) when larger.

    pyiqa's train loader drops incomplete batches, so a batch larger than the training set would run no step at
    all; one batch of all shots per step is what the official code does. Changes the options in place.
    """
    if dataset.get('type') != 'FewShotNRDataset' or dataset.get('num_shots') is None:
        return
    available = int(dataset['num_shots']) * int(dataset.get('dataset_enlarge_ratio', 1))
    batch = dataset.get('batch_size_per_gpu')
    if batch is not None and batch > available:
        print(f'datasets.train: batch_size_per_gpu {batch} > {available} training images; using {available} '
              f'(all shots per step)', flush=True)
        dataset['batch_size_per_gpu'] = available


def train(argv: Sequence[str], root_path: Optional[str] = None) -> dict:
    """Run pyiqa's train_pipeline on a YAML (``-opt``), with the plugin loaded; returns the best metrics."""
    from pyiqa.train import train_pipeline

    from .reporting import plot_run_curves

    root_path = root_path or os.getcwd()
    opt, args = parse_training_options(argv, root_path)
    with _cpu_capable_resume():
        best = train_pipeline(root_path, opt, args)
    plot_run_curves(opt)
    return best


# -------------------------------------------------------------------------------------------------- protocol
def _fewshot_datasets(opt: dict) -> List[dict]:
    return [d for d in opt['datasets'].values() if d.get('type') == 'FewShotNRDataset']


def evaluate_checkpoint(network_opt: dict, checkpoint: str, dataset_opt: dict, device: str = 'cpu',
                        batch_size: int = 16) -> Dict[str, float]:
    """SRCC, PLCC (plain Pearson, as the paper's code) and KRCC of a checkpoint on one dataset split."""
    from pyiqa.archs import build_network
    from pyiqa.data import build_dataset
    from scipy import stats

    from .models.base_model import predict_loader

    network_opt = copy.deepcopy(network_opt)
    network_opt.update(pretrained=True, pretrained_model_path=checkpoint)
    net = build_network(network_opt).to(device).eval()
    dataset = build_dataset(copy.deepcopy(dataset_opt))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    result = predict_loader(net, loader, device)
    pred, mos = result['pred'], result['mos']
    return {'srcc': float(stats.spearmanr(pred, mos)[0]), 'plcc': float(stats.pearsonr(pred, mos)[0]),
            'krcc': float(stats.kendalltau(pred, mos)[0]), 'num_test': int(len(mos))}


def run_protocol(argv: Sequence[str], runs: int = 10, select: str = 'val', out_dir: Optional[str] = None,
                 root_path: Optional[str] = None) -> List[dict]:
    """The paper's protocol: per run a new random split and N-shot sample, train, evaluate on that run's test split.

    ``select='val'`` picks each run's checkpoint on the validation carve-out of the pool; ``select='test'``
    reproduces the official code, which picks the best epoch on the test split itself (optimistic).
    """
    import pandas as pd
    from pyiqa.train import train_pipeline
    from pyiqa.utils import set_random_seed
    from pyiqa.utils.options import make_paths

    if select not in ('val', 'test'):
        raise ValueError(f'select must be val or test, got {select!r}')
    root_path = root_path or os.getcwd()
    base_opt, args = parse_training_options(argv, root_path)
    if not _fewshot_datasets(base_opt):
        raise ValueError('the protocol needs FewShotNRDataset datasets (num_shots, split_seed) in the config')
    val_sets = [d for phase, d in base_opt['datasets'].items() if phase.startswith('val')]
    if not val_sets:
        raise ValueError('the protocol needs a val dataset to choose the checkpoint')
    if select == 'val' and any(int(d.get('num_val', 0)) == 0 for d in val_sets):
        raise ValueError('--select val needs num_val > 0 on the val dataset (a carve-out of the training pool)')
    first_seed = int(_fewshot_datasets(base_opt)[0].get('split_seed', 0))
    device = 'cuda' if base_opt.get('num_gpu', 0) != 0 and torch.cuda.is_available() else 'cpu'
    rows = []
    for run in range(runs):
        opt = copy.deepcopy(base_opt)
        seed = first_seed + run
        for dataset in _fewshot_datasets(opt):
            dataset['split_seed'] = seed
        for dataset in (d for phase, d in opt['datasets'].items() if phase.startswith('val')):
            dataset['override_phase'] = 'test' if select == 'test' else None
        opt['name'] = f'{base_opt["name"]}_run{run:02d}'
        opt['manual_seed'] = int(base_opt.get('manual_seed', 0)) + run
        make_paths(opt, root_path)
        set_random_seed(opt['manual_seed'])
        with _cpu_capable_resume():
            train_pipeline(root_path, opt, args)
        test_opt = copy.deepcopy(_fewshot_datasets(opt)[0])
        test_opt.update(phase='test', override_phase='test', name=f'{test_opt.get("name", "data")}_test')
        best = os.path.join(opt['path']['models'], 'net_best.pth')
        result = evaluate_checkpoint(opt['network'], best, test_opt, device=device)
        rows.append({'run': run, 'split_seed': seed, **result, 'checkpoint': best})
        print(f'run {run}: split_seed {seed}  test SRCC {result["srcc"]:.4f}  PLCC {result["plcc"]:.4f}', flush=True)

    table = pd.DataFrame(rows)
    metrics = ['srcc', 'plcc', 'krcc']
    summary = pd.DataFrame([{'run': stat, **{m: getattr(table[m], stat)() for m in metrics}}
                            for stat in ('mean', 'median', 'std')])
    out_dir = out_dir or os.path.join(root_path, 'experiments', f'{base_opt["name"]}_protocol')
    os.makedirs(out_dir, exist_ok=True)
    pd.concat([table, summary], ignore_index=True).to_csv(os.path.join(out_dir, 'protocol.csv'), index=False)
    selection = ('checkpoint chosen on the validation carve-out of the training pool' if select == 'val' else
                 'checkpoint chosen on the TEST split, as the official code does: optimistic')
    lines = [f'# {base_opt["name"]}: {runs} runs, {selection}', '', '| run | split_seed | test images | SRCC | PLCC |',
             '|---|---|---|---|---|']
    lines += [f'| {r["run"]} | {r["split_seed"]} | {r["num_test"]} | {r["srcc"]:.4f} | {r["plcc"]:.4f} |' for r in rows]
    for _, s in summary.iterrows():
        lines.append(f'| **{s["run"]}** | | | {s["srcc"]:.4f} | {s["plcc"]:.4f} |')
    with open(os.path.join(out_dir, 'protocol.md'), 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    print(f'\n{selection}')
    print(f'SRCC mean {table.srcc.mean():.4f} median {table.srcc.median():.4f} | '
          f'PLCC mean {table.plcc.mean():.4f} median {table.plcc.median():.4f}')
    print(f'wrote {out_dir}/protocol.csv and protocol.md')
    return rows

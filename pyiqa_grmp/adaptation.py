"""Fine-tune GRMP-IQA on your own labelled images in one call (``pyiqa_grmp.adapt``, ``pyiqa-grmp adapt``), and get
a report.

It checks the data (before any training), splits the labelled images into shots / validation carve-out /
held-out test, writes the full training YAML (``RUN_DIR/options.yml``, rerunnable with ``pyiqa-grmp train -opt``),
scores the held-out images with the starting model (zero-shot), fine-tunes with :func:`pyiqa_grmp.train`
(checkpoint chosen on the carve-out), scores the held-out images again, and writes into ``RUN_DIR``:

- ``model/``: the chosen model as a model folder (``model.safetensors``, ``config.json``, ``README.md``, the model
  card; see :mod:`pyiqa_grmp.model_folder`), for ``pyiqa.create_metric('grmp_iqa', pretrained_model_path=...)``
  with no other option; ``model.pth``: the same weights as a checkpoint, which also loads with its path alone;
- ``report.md`` and ``summary.json``: data, split sizes, settings, held-out SRCC / PLCC / KRCC with bootstrap 95 %
  intervals against the starting model, and the lines that use the model;
- ``predictions.csv`` (every held-out image: MOS, score before, score after), ``split.csv`` (every labelled image
  and its role), ``curves.png`` (losses, validation SRCC / PLCC, learning rate per iteration), ``scatter.png``;
- ``experiments/adapt/``: the training run itself (pyiqa's log, ``metrics.jsonl``, checkpoints, states).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .data.fewshot_dataset import few_shot_split
from .data.labels import LabelledImages, label_source, read_labels
from .errors import InvalidArgument
from .metrics_log import METRICS_FILE, read_metrics
from .options import check_option_values
from .presets import paper_settings
from .checkpointing import write_atomically
from .reporting import CURVES_FILE, copy_atomically, plot_curves, scatter_before_after
from .stats import bootstrap_gain_intervals, bootstrap_indices, bootstrap_intervals, correlation_values

#: Fewest held-out test images for correlations worth reporting, and fewest carve-out images to choose on.
MIN_TEST_IMAGES = 10
MIN_VAL_IMAGES = 3
#: Warnings of the report (:func:`run_warnings`). A carve-out under FEW_VAL_IMAGES gives a noisy checkpoint
#: choice. The adapted model "learned nothing" when its held-out scores span less than FLAT_SCORE_SPREAD of the
#: (0, 1) score range (e.g. 0.4972-0.4989), or when the median of its last STUCK_LOSS_STEPS quality losses is
#: within STUCK_LOSS_TOLERANCE of ln 2 = 0.6931, the cross-entropy of a model that says 0.5 to every image
#: whatever its label (the targets spread over [0, 1], so a model that ranks them gets below it).
FEW_VAL_IMAGES = 10
FLAT_SCORE_SPREAD = 0.01
STUCK_LOSS_STEPS = 5
STUCK_LOSS_TOLERANCE = 0.005
#: Experiment name of the training run inside RUN_DIR (``RUN_DIR/experiments/adapt``, unless overridden).
RUN_NAME = 'adapt'
BOOTSTRAP_RESAMPLES = 2000

#: The paper's fine-tuning settings (``presets/paper.yml``): SGD, the official gradient rule at lambda 5, the last 4
#: blocks of both towers trainable, the official plateau schedule, up to 2000 epochs, validation every 5
#: iterations, at most 50 images per batch (one batch of all shots for up to 50 shots).
_PAPER = paper_settings('finetune')
PAPER_TRAIN = _PAPER['train']
PRESETS: Dict[str, dict] = {
    'paper': {'train': PAPER_TRAIN, 'val_freq': _PAPER['val']['val_freq'],
              'max_batch': _PAPER['datasets']['train']['batch_size_per_gpu'], 'save_checkpoint_freq': 500},
    # Same rule, optimiser, trainable parts and batch; 12 epochs instead of up to 2000, validation every 2
    # iterations instead of 5, and the plateau rule's patience 2 validations instead of 6 so it can act.
    # It also trains (and validates) in bf16 on a CPU with bf16 instructions (see choose_precision).
    'cpu': {'train': dict(PAPER_TRAIN, total_epoch=12,
                          lr_plateau=dict(PAPER_TRAIN['lr_plateau'], patience=2, min_iter=4)),
            'val_freq': 2, 'max_batch': _PAPER['datasets']['train']['batch_size_per_gpu'], 'save_checkpoint_freq': 6,
            'bf16_on_cpu': True},
}
PRESET_HELP = {
    'paper': 'the paper\'s settings: SGD lr 1e-3, gradient rule "official" at lambda 5, last 4 blocks trainable, '
             'lr x0.3 after 6 validations without a new best, up to 2000 epochs, validation every 5 iterations',
    'cpu': 'the paper\'s rule, optimiser, trainable parts and batch, but 12 epochs, validation every 2 iterations '
           'and plateau patience 2, in bf16 on a CPU with bf16 instructions: minutes on a laptop CPU at ViT-B/16 '
           'for about 50 shots',
}


@dataclass
class SplitPlan:
    """Row indices of the shots, the validation carve-out, the held-out test images and the unused rest."""

    num_shots: int
    num_val: int
    train_ratio: float
    seed: int
    indices: Dict[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        return {role: int(len(rows)) for role, rows in self.indices.items()}


@dataclass
class AdaptResult:
    """What :func:`adapt` wrote: the run folder, the adapted checkpoint, the report, and the report as data."""

    out_dir: str
    model_path: str  # OUT_DIR/model.pth, for pyiqa.create_metric('grmp_iqa', pretrained_model_path=...)
    report_path: str  # OUT_DIR/report.md
    experiment_dir: str  # the training run (pyiqa's log, metrics.jsonl, checkpoints, states)
    summary: dict  # summary.json: data, split counts, settings, held-out results with intervals, usage lines

    @property
    def usage(self) -> Dict[str, str]:
        """The Python and command lines that score images with the adapted model (``'python'``, ``'cli'``)."""
        return self.summary['usage']


def describe_split(counts: Mapping[str, int], seed: int) -> str:
    """The split in one line: shots, carve-out, held-out test and unused images."""
    return (f'split (seed {seed}): {counts["shots"]} shots, {counts["val"]} validation carve-out, {counts["test"]} '
            f'held-out test, {counts["unused"]} unused')


# ------------------------------------------------------------------------------------------------- the data
def load_labels(meta_info: Optional[str] = None, root: Optional[str] = None, dataset: Optional[str] = None,
                data_root: str = './datasets', lower_better: Optional[bool] = None,
                image_column: Optional[str] = None, score_column: Optional[str] = None) -> LabelledImages:
    """Read and check the labels: the image paths (relative to the image folder) and the scores. A meta CSV's
    columns are ``image_column`` / ``score_column`` or found by name (see
    :func:`~pyiqa_grmp.data.labels.read_label_table`); a pyiqa dataset's are its layout's.

    Raises ValueError / FileNotFoundError naming the file and the problem: unreadable CSV, no numeric score
    column, missing or non-numeric scores, a constant score column.
    """
    source = label_source(dataset, data_root, meta_info, root)
    if source.reference_root is not None:
        raise ValueError(f'pyiqa dataset {dataset!r} has a full-reference layout (reference, image, score); '
                         'adapt needs (image, score) rows: pass meta_info= and root= instead')
    source = replace(source, meta_info=os.path.abspath(source.meta_info), root=os.path.abspath(source.root))
    labels = read_labels(source, lower_better, require_varying=True, image_column=image_column,
                         score_column=score_column)
    if not os.path.isdir(source.root):
        raise FileNotFoundError(f'image folder {source.root} not found')
    return labels


def plan_split(labels: LabelledImages, shots: str = 'all', test_ratio: float = 0.2, num_val: Optional[int] = None,
               seed: int = 0) -> SplitPlan:
    """The shots / carve-out / held-out split of ``FewShotNRDataset`` for these options, checked for size and for
    MOS that vary within each part (``shots`` is a number or 'all': every pool image not in the carve-out)."""
    total = len(labels.images)
    if not 0 < test_ratio < 1:
        raise InvalidArgument('test_ratio', f'must be between 0 and 1, got {test_ratio}')
    train_ratio = 1.0 - test_ratio
    pool = int(math.floor(train_ratio * total))
    num_test = total - pool
    if num_val is None:
        num_val = max(5, round(0.1 * total))
    if num_val < MIN_VAL_IMAGES:
        raise InvalidArgument('num_val', f'must be at least {MIN_VAL_IMAGES} (the checkpoint is chosen on their '
                                         f'correlations), got {num_val}')
    if shots == 'all':
        num_shots = pool - num_val
    else:
        try:
            num_shots = int(shots)
        except ValueError:
            raise InvalidArgument('shots', f'must be a number or "all", got {shots!r}') from None
        if num_shots < 2:
            raise InvalidArgument('shots', f'must be at least 2, got {num_shots}')
    needed = max(num_shots, 2) + num_val
    if num_test < MIN_TEST_IMAGES or needed > pool:
        raise ValueError(
            f'{total} labelled images are too few: {max(num_shots, 2)} shots + {num_val} validation carve-out + at '
            f'least {MIN_TEST_IMAGES} held-out test images are needed, and a test ratio of {test_ratio} holds out '
            f'{num_test} and leaves a pool of {pool} for shots and carve-out. Label more images, or use fewer shots '
            f'or a smaller carve-out, or another test ratio.')
    indices = few_shot_split(total, num_shots, seed, train_ratio, num_val)
    used = np.zeros(total, dtype=bool)
    for rows in indices.values():
        used[rows] = True
    plan = SplitPlan(num_shots=num_shots, num_val=num_val, train_ratio=train_ratio, seed=seed,
                     indices={'shots': indices['train'], 'val': indices['val'], 'test': indices['test'],
                              'unused': np.flatnonzero(~used)})
    for role in ('shots', 'val', 'test'):
        values = labels.mos[plan.indices[role]]
        if np.ptp(values) == 0:
            raise ValueError(f'every {role} image of split seed {seed} has the score {values[0]:g}; labels must vary '
                             f'within each part (min-max normalisation, correlations): try another seed')
    return plan


def check_images(paths: Sequence[str]) -> None:
    """Decode every image the run will read; FileNotFoundError / ValueError naming every missing or unreadable
    file (all of them are listed, not only the first)."""
    from PIL import Image
    from tqdm import tqdm

    missing, unreadable = [], []
    for path in tqdm(paths, desc='checking images', unit='img', file=sys.stderr, disable=len(paths) < 200):
        if not os.path.isfile(path):
            missing.append(path)
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # PIL raises many types for broken files
            unreadable.append(f'{path} ({type(error).__name__}: {error})')
    problems = []
    if missing:
        problems.append(f'{len(missing)} image file(s) missing: ' + ', '.join(missing[:20]) +
                        (' ...' if len(missing) > 20 else ''))
    if unreadable:
        problems.append(f'{len(unreadable)} image file(s) unreadable: ' + '; '.join(unreadable[:20]) +
                        (' ...' if len(unreadable) > 20 else ''))
    if problems:
        error_type = FileNotFoundError if missing and not unreadable else ValueError
        raise error_type('; '.join(problems))


# ---------------------------------------------------------------------------------------------- the options
def set_option(options: dict, assignment: str) -> None:
    """Apply ``--set KEY:SUB=VALUE`` (the value parsed as bounded, safe YAML) to the generated options.

    The rule is ``pyiqa-grmp train --force_yml``'s (:func:`pyiqa_grmp.options.apply_override`): the key must exist
    in its section, or be an option the loop or a model reads with a default. The generated options hold every
    option of the presets with its value (``train.amp: ~``, ``train.total_epoch``, ``val.val_freq``, ...), so
    ``train:amp=bf16`` or ``train:total_epoch=30`` are accepted and a typo such as ``train:optim:lrr=5`` is a
    :class:`~pyiqa_grmp.options.ConfigError` naming the keys of ``train.optim``.
    """
    from .options import apply_override

    apply_override(options, assignment, flag='--set')


def merge_options(base: dict, override: Mapping) -> dict:
    """``base`` with ``override`` merged in, mapping by mapping (other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_options(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_override(path: str) -> dict:
    """A YAML mapping of training options, read as the training configs are (:func:`pyiqa_grmp.options.load_yaml`:
    safe, bounded, data only). Its keys may add options, e.g. a network's ``resize``: it is a file the user wrote
    for this purpose, merged as it is (:func:`merge_options`); the merged options are checked before training."""
    from .options import load_yaml

    if not os.path.isfile(path):
        raise InvalidArgument('override_file', f'{path} not found')
    return load_yaml(path)


def batch_size(num_shots: int, max_batch: int) -> int:
    """One batch of all shots when they fit in ``max_batch`` (the official choice), else the fewest equal batches:
    pyiqa drops an incomplete last batch, so equal ones leave at most a few shots out of each epoch."""
    return num_shots // math.ceil(num_shots / max_batch)


def build_options(labels: LabelledImages, plan: SplitPlan, preset: str, start: str, device: Optional[str],
                  seed: int) -> dict:
    """The full training options of an adapt run (before ``override_file`` and ``overrides``)."""
    if preset not in PRESETS:
        raise InvalidArgument('preset', f'must be one of {sorted(PRESETS)}, got {preset!r}')
    settings = PRESETS[preset]
    split = {'type': 'FewShotNRDataset', 'dataroot_target': labels.root, 'meta_info_file': labels.meta_info,
             'num_shots': plan.num_shots, 'split_seed': seed, 'train_ratio': plan.train_ratio,
             'num_val': plan.num_val, 'label_norm': 'minmax_per_subset', 'lower_better': labels.lower_better,
             'resize': 244, **{f'{role}_column': labels.columns[role] for role in ('image', 'score')
                               if role in labels.columns}}  # the columns the labels were read from, if named
    num_gpu = {'cpu': 0, 'cuda': 1, None: 'auto'}[device]
    return {
        'name': RUN_NAME,
        'model_type': 'GRMPFinetuneModel',
        'num_gpu': num_gpu,
        'manual_seed': seed,
        'datasets': {
            'train': {'name': 'shots', **split, 'batch_size_per_gpu': batch_size(plan.num_shots, settings['max_batch']),
                      'num_worker_per_gpu': 0, 'use_shuffle': True, 'dataset_enlarge_ratio': 1,
                      'prefetch_mode': None},
            'val': {'name': 'val', **split, 'batch_size_per_gpu': 32, 'cache_images': True},
        },
        'network': {'type': 'GRMPIQA', 'pretrained': True, 'pretrained_model_path': os.path.abspath(start),
                    'backbone': 'ViT-B-16-quickgelu', 'backbone_pretrained': 'openai', 'num_visual_prompts': 100,
                    'n_ctx': 4},
        'path': {'pretrain_network': None, 'resume_state': None},
        'train': copy.deepcopy(settings['train']),
        'val': {'val_freq': settings['val_freq'], 'save_img': False, 'pbar': False, 'key_metric': 'srcc',
                'select_by': ['srcc', 'plcc'],
                'metrics': {'srcc': {'type': 'calculate_srcc'}, 'plcc': {'type': 'calculate_plcc'}}},
        'logger': {'print_freq': 10, 'save_latest_freq': 1e9, 'save_checkpoint_freq': settings['save_checkpoint_freq'],
                   'use_tb_logger': False, 'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }


def choose_precision(precision: Optional[str], preset: str, device_type: str) -> Tuple[str, str]:
    """The training precision of an adapt run and why, in words: ``precision`` when given (fp32, bf16, or fp16 on
    CUDA); else the ``cpu`` preset's bf16 on a CPU with bf16 instructions
    (:func:`~pyiqa_grmp.precision.cpu_bf16_flag`: about 3x faster there, at a score deviation
    ``benchmarks/adapt_laptop.py`` measures), and fp32 everywhere else (exact; bf16 without those instructions is
    emulated, slower than fp32)."""
    from .precision import check_precision, check_precision_device, cpu_bf16_flag

    if precision is not None:
        try:
            check_precision(precision)
            check_precision_device(precision, device_type)
        except ValueError as error:  # their message starts with the word 'precision'
            raise InvalidArgument('precision', str(error).split(' ', 1)[1]) from None
        if precision == 'bf16' and device_type == 'cpu' and cpu_bf16_flag() is None:
            return precision, ('asked for; this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so it runs '
                               'emulated, slower than fp32')
        return precision, 'asked for'
    if PRESETS[preset].get('bf16_on_cpu') and device_type == 'cpu':
        flag = cpu_bf16_flag()
        if flag is not None:
            return 'bf16', f'the {preset} preset on a CPU with {flag}'
        return 'fp32', f'the {preset} preset; this CPU has no bf16 instructions (avx512_bf16, amx_bf16)'
    return 'fp32', f'the {preset} preset'


_UNSET = object()  # a setting one side of changed_settings does not have


def _setting_text(value: object, limit: int = 60) -> str:
    import yaml

    text = '(not set)' if value is _UNSET else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text[:-len('...')].strip() if text.endswith('...') else text  # safe_dump's end of a plain scalar
    return text if len(text) <= limit else text[:limit - 3] + '...'


def changed_settings(before: Mapping, after: Mapping, prefix: str = '') -> List[str]:
    """``section.key: old -> new`` for every setting of ``after`` that differs from ``before`` (mapping by mapping;
    a setting only one side has reads ``(not set)`` on the other), in the order of the options."""
    changes = []
    for key in list(before) + [k for k in after if k not in before]:
        old, new = before.get(key, _UNSET), after.get(key, _UNSET)
        name = f'{prefix}{key}'
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += changed_settings(old, new, f'{name}.')
        elif old is _UNSET or new is _UNSET or old != new:
            changes.append(f'{name}: {_setting_text(old)} -> {_setting_text(new)}')
    return changes


def usage_lines(model_path: str) -> Dict[str, str]:
    """The Python and CLI lines that score images with the adapted model (its path alone says what it is); the CLI
    line writes every image's score to ``scores.csv`` (without ``--csv`` it prints only their mean)."""
    python = f"metric = pyiqa.create_metric('grmp_iqa', pretrained_model_path={model_path!r})"
    option = shlex.quote(f'grmp_iqa:pretrained_model_path={model_path}')
    cli = f'pyiqa-grmp score grmp_iqa -t YOUR_IMAGES/ --metric-opt {option} --csv scores.csv'
    return {'python': f'import pyiqa, pyiqa_grmp\n{python}\nscore = metric("photo.jpg")  # higher is better',
            'python_create': python, 'cli': cli}


# ----------------------------------------------------------------------------------------------- predicting
def predict_test_split(options: dict, checkpoint: str, device: str, precision: str = 'fp32'
                       ) -> Dict[str, np.ndarray]:
    """Scores of ``checkpoint`` in ``precision`` on the held-out test split of ``options``: paths, raw MOS and
    predictions."""
    from .evaluation import predict_checkpoint

    test_opt = dict(copy.deepcopy(options['datasets']['val']), name='test', phase='test', cache_images=False)
    network = dict(options['network'], precision=precision)
    dataset, result = predict_checkpoint(network, checkpoint, test_opt, device, batch_size=32)
    return {'paths': np.array([path for path, _ in dataset.paths_mos]), 'mos': dataset.raw_mos,
            'pred': result['pred'].astype(float)}


# ---------------------------------------------------------------------------------------------------- report
def interval_text(value: float, interval: Sequence[float]) -> str:
    """``value [low, high]`` with 4 decimals."""
    return f'{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]'


def run_warnings(predictions: np.ndarray, records: Sequence[dict], num_val: int) -> List[str]:
    """What the report must say about the run: an adapted model that learned nothing (held-out scores with a
    spread under :data:`FLAT_SCORE_SPREAD`, or a quality loss stuck at ln 2) and a checkpoint chosen on fewer
    than :data:`FEW_VAL_IMAGES` carve-out images. ``records``: the run's ``metrics.jsonl``."""
    found = []
    low, high = float(np.min(predictions)), float(np.max(predictions))
    if high - low < FLAT_SCORE_SPREAD:
        found.append(f'the adapted model learned nothing that ranks images: its held-out scores span only '
                     f'{low:.4f}-{high:.4f} (a spread under {FLAT_SCORE_SPREAD}); check the starting checkpoint '
                     '(--from), the learning rate and the number of iterations')
    losses = [float(r['l_quality']) for r in records if r.get('kind') == 'train'
              and isinstance(r.get('l_quality'), (int, float)) and not isinstance(r.get('l_quality'), bool)]
    if losses:
        last = float(np.median(losses[-STUCK_LOSS_STEPS:]))
        if abs(last - math.log(2)) < STUCK_LOSS_TOLERANCE:
            found.append(f'the quality loss ended at {last:.4f}, within {STUCK_LOSS_TOLERANCE} of ln 2 = 0.6931 '
                         '(median of its last steps): the loss of a model that says 0.5 to every image, so it has '
                         'learned nothing from the shots')
    if num_val < FEW_VAL_IMAGES:
        found.append(f'the checkpoint was chosen on {num_val} carve-out images (under {FEW_VAL_IMAGES}): on so few '
                     'the validation SRCC is mostly noise and the chosen iteration may be chance; use --num-val '
                     f'{FEW_VAL_IMAGES} or more')
    return found


def _settings_lines(settings: dict) -> List[str]:
    """The preset, as run: untouched, or with each setting the override file and ``--set`` changed; the precision."""
    from .model_folder import precision_text

    preset, help_text = settings['preset'], PRESET_HELP[settings['preset']]
    lines = [f'- Preset `{preset}`: {help_text}.']
    if settings.get('changed'):
        sources = ', '.join(f'`{source}`' for source in settings.get('changed_by') or [])
        lines = [f'- Preset `{preset}` ({help_text}), **changed** by {sources}:',
                 *[f'  - `{change}`' for change in settings['changed']]]
    elif settings.get('changed_by'):
        lines.append(f'- {", ".join(f"`{source}`" for source in settings["changed_by"])} changed no setting.')
    lines.append(f'- Precision: {precision_text(settings)}.')
    return lines


def _report_markdown(summary: dict, lines: Dict[str, str]) -> str:
    counts, data, results = summary['split'], summary['data'], summary['results']
    direction = 'lower is better (DMOS); correlations use the negated labels' if data['lower_better'] else \
        'higher is better'
    table = ['| model | SRCC [95 % CI] | PLCC [95 % CI] | KRCC [95 % CI] |', '|---|---|---|---|']
    for key, label in (('before', 'starting model, zero-shot'), ('after', 'adapted (model.pth)')):
        row = results[key]
        table.append(f'| {label} | ' + ' | '.join(interval_text(row[m], row[f'{m}_ci'])
                                                  for m in ('srcc', 'plcc', 'krcc')) + ' |')
    gain = results['gain']
    table.append('| gain (paired) | ' + ' | '.join(interval_text(gain[m], gain[f'{m}_ci'])
                                                for m in ('srcc', 'plcc', 'krcc')) + ' |')
    settings = summary['settings']
    best = summary['training'].get('best')
    best_text = (f'iteration {best["iter"]} (carve-out SRCC {best["srcc"]:.4f}, PLCC {best["plcc"]:.4f})'
                 if best else 'not logged')
    warnings = summary.get('warnings') or []
    text = [
        '# GRMP-IQA adapted to your images', '',
        *(['## Warnings', '', *[f'- **{w[0].upper()}{w[1:]}.**' for w in warnings], ''] if warnings else []),
        '## Data', '',
        f'- Labels: {data["description"]}; {data["num_images"]} labelled images; scores from {data["mos_min"]:g} to '
        f'{data["mos_max"]:g}, {direction}.',
        f'- Split (seed {settings["seed"]}, `split.csv` lists every image and its role):', '',
        '| shots (training) | validation carve-out (checkpoint choice) | held-out test (this report) | unused |',
        '|---|---|---|---|',
        f'| {counts["shots"]} | {counts["val"]} | {counts["test"]} | {counts["unused"]} |', '',
        '## Settings', '',
        *_settings_lines(settings),
        f'- Started from `{settings["start"]}`.',
        f'- Device: {settings["device"]}; {summary["training"]["iterations"]} training iterations; checkpoint '
        f'chosen on the carve-out at {best_text}.',
        '- Full training options: `options.yml` (rerun or edit it: `pyiqa-grmp train -opt options.yml`); the '
        'training log: `experiments/adapt/`.', '',
        f'## Held-out results ({counts["test"]} images never used for training or for choosing the checkpoint)', '',
        *table, '',
        f'Intervals: percentile bootstrap over {summary["bootstrap"]["resamples"]} resamples of the held-out images '
        f'(seed {summary["bootstrap"]["seed"]}); the gain row resamples both models together. PLCC is plain Pearson. '
        'Per-image scores: `predictions.csv`.', '',
        '![training curves](curves.png)', '', '![held-out predictions before and after](scatter.png)', '',
        '## Use the model', '', '```python', lines['python'], '```', '', '```bash', lines['cli'], '```', '']
    return '\n'.join(text)


# ----------------------------------------------------------------------------------------------------- adapt
def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def adapt(out_dir: str, *, meta_info: Optional[str] = None, root: Optional[str] = None,
          dataset: Optional[str] = None, data_root: str = './datasets', shots: str = 'all', test_ratio: float = 0.2,
          num_val: Optional[int] = None, start: Optional[str] = None, preset: str = 'paper',
          device: Optional[str] = None, seed: int = 0, mos_lower_better: Optional[bool] = None,
          override_file: Optional[str] = None, overrides: Sequence[str] = (), image_column: Optional[str] = None,
          score_column: Optional[str] = None, precision: Optional[str] = None, progress: bool = True) -> AdaptResult:
    """Fine-tune GRMP-IQA on labelled images and write model, report and figures into ``out_dir``.

    Data: ``meta_info`` a label table (CSV, TSV or .xlsx with a header) with ``root`` its image folder, or
    ``dataset`` a pyiqa NR dataset name in pyiqa's layout under ``data_root``. The columns of ``meta_info`` are
    ``image_column`` and ``score_column``, by default the one column named like an image (image_name, image,
    filename, ...; else the first) and the one named MOS, DMOS or score (any case; a DMOS name means lower-better).
    ``mos_lower_better``: the scores are DMOS (default: the dataset info's, else False). Split (seeded by
    ``seed``, as ``FewShotNRDataset``): ``test_ratio`` of the images held out for the report, ``num_val`` (default
    10 %, at least 5) carved out of the rest to choose the checkpoint on, ``shots`` (a number, or 'all': every
    remaining image) to train on. ``start``: the checkpoint to start from (default: ``grmp_iqa``'s default
    weights). ``preset``: 'paper' or 'cpu' (:data:`PRESETS`); ``override_file`` (a YAML mapping) and
    ``overrides`` (``KEY:SUB=VALUE`` strings, values as YAML) change the generated training options.
    ``device``: 'cpu' or 'cuda' (default: cuda when available). ``precision``: of training, validation and the
    held-out scores, 'fp32', 'bf16' or 'fp16' (CUDA); default the preset's (:func:`choose_precision`: bf16 for the
    cpu preset on a CPU with bf16 instructions, else fp32). ``progress`` prints the
    steps, the training progress and the warnings (:func:`run_warnings`, also in the report) on stderr.

    Every check on the data and options runs before training (ValueError / FileNotFoundError naming the problem).
    Writes model/ (model.safetensors, config.json, README.md), model.pth, report.md, summary.json,
    predictions.csv, split.csv, options.yml, curves.png, scatter.png and the training run under ``experiments/``;
    returns where they are and the summary.
    """
    import torch
    import yaml

    from .model_folder import export_checkpoint
    from .pretrained import DEFAULT_VARIANT, resolve_weights
    from .training import train

    if preset not in PRESETS:
        raise InvalidArgument('preset', f'must be one of {sorted(PRESETS)}, got {preset!r}')
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, 'model.pth')):
        raise InvalidArgument('out_dir', f'{out_dir} already holds an adapted model.pth; choose another folder or '
                                         'remove it')
    labels = load_labels(meta_info, root, dataset, data_root, mos_lower_better, image_column, score_column)
    plan = plan_split(labels, shots, test_ratio, num_val, seed)
    used = np.concatenate([plan.indices[r] for r in ('shots', 'val', 'test')])
    check_images([labels.images[i] for i in sorted(used)])
    if start is None:
        start = resolve_weights(DEFAULT_VARIANT)  # the metric's default weights; offline: says where to put them
    elif not os.path.isfile(start):
        raise FileNotFoundError(f'start checkpoint {start} not found')
    run_device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    options = build_options(labels, plan, preset, start, device, seed)
    chosen, precision_reason = choose_precision(precision, preset, run_device)
    options['train']['amp'] = None if chosen == 'fp32' else chosen
    preset_options = copy.deepcopy(options)
    changed_by = []
    if override_file is not None:
        options = merge_options(options, read_override(override_file))
        changed_by.append(f'--override {override_file}')
    for assignment in overrides:
        set_option(options, assignment)
        changed_by.append(f'--set {assignment}')
    check_option_values(options, 'the training options of adapt (after the override file and overrides)')
    resize = options['network'].get('resize', 244)
    for phase in ('train', 'val'):  # images are stored at the network's resize, whatever it is
        options['datasets'][phase]['resize'] = resize
    changed = changed_settings(preset_options, options)
    trained_precision = options['train'].get('amp') or 'fp32'
    if trained_precision != chosen:
        precision_reason = 'set by the changes to the preset'

    counts = plan.counts()
    _say(progress, f'data: {labels.description}: {len(labels.images)} labelled images; {labels.column_choice}')
    _say(progress, describe_split(counts, seed))
    _say(progress, f'precision: {trained_precision} for training, validation and the held-out scores '
                   f'({precision_reason})')
    os.makedirs(out_dir, exist_ok=True)
    roles = np.empty(len(labels.images), dtype=object)
    for role, rows in plan.indices.items():
        roles[rows] = role
    split_table = pd.DataFrame({'image': labels.images, 'mos': labels.mos, 'role': roles})
    write_atomically(os.path.join(out_dir, 'split.csv'), split_table.to_csv(index=False))
    options_path = os.path.join(out_dir, 'options.yml')
    write_atomically(options_path, yaml.safe_dump(options, sort_keys=False))
    _say(progress, f'wrote {options_path}')

    _say(progress, f'scoring the {counts["test"]} held-out images with the starting model (zero-shot)')
    before = predict_test_split(options, start, run_device, trained_precision)
    trained = train(options_path, root_path=out_dir, progress=progress)
    experiment = trained.experiment_dir
    if trained.best_checkpoint is None:
        raise FileNotFoundError(f'training wrote no net_best.pth: no validation ran (see {experiment})')
    model_path = os.path.join(out_dir, 'model.pth')
    copy_atomically(trained.best_checkpoint, model_path)
    _say(progress, f'scoring the {counts["test"]} held-out images with the adapted model')
    after = predict_test_split(options, model_path, run_device, trained_precision)
    if not np.array_equal(before['paths'], after['paths']):
        raise RuntimeError('the held-out images differ between the two evaluations')

    signed_mos = -before['mos'] if labels.lower_better else before['mos']
    predictions = pd.DataFrame({'image': before['paths'], 'mos': before['mos'], 'score_before': before['pred'],
                                'score_after': after['pred']})
    write_atomically(os.path.join(out_dir, 'predictions.csv'), predictions.to_csv(index=False))
    resamples = bootstrap_indices(len(signed_mos), BOOTSTRAP_RESAMPLES, seed)
    results = {}
    for key, scores in (('before', before['pred']), ('after', after['pred'])):
        values = correlation_values(scores, signed_mos)
        intervals = bootstrap_intervals(scores, signed_mos, resamples)
        results[key] = {**values, **{f'{m}_ci': list(intervals[m]) for m in values}}
    gains = bootstrap_gain_intervals(before['pred'], after['pred'], signed_mos, resamples)
    results['gain'] = {**{m: results['after'][m] - results['before'][m] for m in gains},
                       **{f'{m}_ci': list(gains[m]) for m in gains}}

    records = read_metrics(os.path.join(experiment, METRICS_FILE))
    improved = [r for r in records if r['kind'] == 'val' and r.get('improved')]
    model_folder = os.path.join(out_dir, 'model')
    lines = usage_lines(model_folder)
    summary = {
        'data': {'description': labels.description, 'meta_info': labels.meta_info, 'root': labels.root,
                 'num_images': len(labels.images), 'mos_min': float(labels.mos.min()),
                 'mos_max': float(labels.mos.max()), 'lower_better': labels.lower_better},
        'split': counts,
        'settings': {'preset': preset, 'start': os.path.abspath(start), 'device': run_device, 'seed': seed,
                     'precision': trained_precision, 'precision_reason': precision_reason,
                     'changed': changed, 'changed_by': changed_by},
        'training': {'iterations': max((r['iter'] for r in records if r['kind'] == 'train'), default=0),
                     'best': {k: improved[-1].get(k) for k in ('iter', 'srcc', 'plcc')} if improved else None},
        'results': results,
        'bootstrap': {'resamples': BOOTSTRAP_RESAMPLES, 'seed': seed, 'confidence': 0.95},
        'usage': {'python': lines['python'], 'cli': lines['cli']},
        'warnings': run_warnings(after['pred'], records, counts['val']),
        'log_file': trained.log_file,
    }
    write_atomically(os.path.join(out_dir, 'summary.json'), json.dumps(summary, indent=2))
    export_checkpoint(model_path, model_folder, summary=summary)
    plot_curves(os.path.join(experiment, METRICS_FILE), os.path.join(out_dir, CURVES_FILE), title='adapt')
    mos_label = 'MOS' + (' (lower is better)' if labels.lower_better else '')
    scatter_before_after(before['mos'], before['pred'], after['pred'], os.path.join(out_dir, 'scatter.png'),
                         mos_label=mos_label, titles=('starting model (zero-shot)', 'adapted'))
    report_path = os.path.join(out_dir, 'report.md')
    write_atomically(report_path, _report_markdown(summary, lines))
    for warning in summary['warnings']:
        _say(progress, f'warning: {warning} (also in {report_path})')
    return AdaptResult(out_dir=out_dir, model_path=model_path, report_path=report_path, experiment_dir=experiment,
                       summary=summary)

"""Training: our loop over pyiqa's parts, and the paper's few-shot protocol.

pyiqa's ``train_pipeline`` cannot resume a run exactly: it replays the saved epoch from its first batch, saves no
random generators, writes checkpoints in place, validates after saving (so a state misses that validation), and
fails at the end of a run without validation. :func:`run_training` keeps pyiqa's parts (options, registries,
``build_model``, ``build_dataset``, ``EnlargedSampler``, prefetchers, ``MessageLogger``, TensorBoard) and every
YAML option its users know, and owns the loop state: the epoch, the position in it, every generator, the
model's own state, written atomically at each ``save_checkpoint_freq`` and when SIGTERM/SIGINT ask to stop.
Experiments land under the current directory (``experiments/<name>``), not in site-packages.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import pyiqa_grmp  # noqa: F401  (registers our types)

from .checkpointing import (capture_rng, check_resume_fingerprint, find_resume_state, load_state,
                            remove_stale_temporaries, restore_rng, resume_fingerprint, write_atomically)
from .cpu_memory import keep_freed_memory
from .data.samplers import ResumableSampler, SeededItems
from .distributed import (all_gather_objects, any_rank, barrier, broadcast_object, check_ranks_hold_the_same,
                          get_world_size, init_distributed, launch_environment)
from .errors import InvalidArgument
from .progress import MessageLogger, TrainingProgress, run_log, trainable_line, write_line
from .options import (ConfigError, apply_override, build_argument_parser, dump_yaml, parse_training_argv,
                      prepare_options)
from .trusted_loading import trusted_loading

_log = logging.getLogger(__name__)

#: ``--launcher`` values (pyiqa's names) -> the launchers of :mod:`pyiqa_grmp.distributed`.
LAUNCHERS = {'none': None, 'pytorch': 'torchrun', 'slurm': 'slurm'}
#: Where the checkpoint choice of the protocol is made (``select``), and what it means.
SELECTIONS = {'val': 'checkpoint chosen on the validation carve-out of the training pool',
              'test': 'checkpoint chosen on the TEST split, as the official code does: optimistic'}

#: Training options: a mapping (as a YAML would hold them) or the path of a YAML file.
Options = Union[Mapping[str, Any], str, 'os.PathLike[str]']


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a step; a training state was written at that iteration."""

    def __init__(self, signum: int, iteration: int, state_path: str) -> None:
        self.signum, self.iteration, self.state_path = signum, iteration, state_path
        super().__init__(self.worded('auto_resume=True'))

    def worded(self, resume: str) -> str:
        """What stopped, where the state is, and how to continue: ``resume`` (the command line: its flag)."""
        return (f'training stopped by {signal.Signals(self.signum).name} after iteration {self.iteration}; training '
                f'state written to {self.state_path}; continue with {resume}')

    def __reduce__(self):
        return type(self), (self.signum, self.iteration, self.state_path)


def parse_training_options(argv: Sequence[str], root_path: str) -> Tuple[dict, Any]:
    """``argv`` (``-opt``, ``--auto_resume``, ``--force_yml``, ...) -> checked options, seeded generators.

    The YAML is read as plain data and overrides are applied without ``exec`` (see :mod:`pyiqa_grmp.options`);
    generators are seeded with the final ``manual_seed``, after the overrides.
    """
    opt, args = parse_training_argv(argv)
    return _prepared(opt, args, root_path)


def _prepared(opt: dict, args, root_path: str) -> Tuple[dict, Any]:
    found = launch_environment(LAUNCHERS[args.launcher]) if LAUNCHERS[args.launcher] else None
    if found is not None and 'train' in (opt.get('datasets') or {}):
        check_shots_cover_ranks(opt['datasets']['train'], found.world_size)  # on every rank, before the rendezvous
    rank, world_size = join_launch(opt, args.launcher)
    opt = prepare_options(opt, args, root_path, rank=rank, world_size=world_size)
    check_training_options(opt)
    return opt, args


def read_training_options(options: Options, overrides: Sequence[str] = (), launcher: str = 'none',
                          auto_resume: bool = False, debug: bool = False) -> Tuple[dict, Any]:
    """Options (a mapping, copied, or a YAML path, read as plain data) with ``overrides`` applied, and the
    arguments pyiqa's training scripts would have parsed for them (``-opt``, ``--launcher``, ...)."""
    if launcher not in LAUNCHERS:
        raise InvalidArgument('launcher', f'must be one of {", ".join(LAUNCHERS)}, got {launcher!r}')
    mapping = isinstance(options, Mapping)
    source = f'{options.get("name", "options")}.yml' if mapping else os.fspath(options)  # a mapping's copy: NAME.yml
    argv = ['-opt', source, '--launcher', launcher, *(['--auto_resume'] if auto_resume else []),
            *(['--debug'] if debug else []), *(['--force_yml', *overrides] if overrides else [])]
    if not mapping:
        return parse_training_argv(argv)
    opt = copy.deepcopy(dict(options))
    for entry in overrides:
        apply_override(opt, entry)
    return opt, build_argument_parser().parse_args(argv)


def join_launch(opt: dict, launcher: str) -> Tuple[int, int]:
    """(rank, world size) of this process: joins the process group of ``--launcher pytorch|slurm``.

    The backend is NCCL when the config trains on CUDA (``num_gpu`` not 0) and gloo on the CPU;
    ``dist_params.backend`` overrides. Each rank trains on ``cuda:LOCAL_RANK``. A launcher without its
    environment, more ranks than GPUs on a machine, or NCCL on the CPU fail here, before anything else.
    """
    num_gpu = opt.get('num_gpu', 0)
    wants_cuda = torch.cuda.is_available() if num_gpu == 'auto' else num_gpu not in (0, None)
    if wants_cuda and not torch.cuda.is_available():
        raise ConfigError(f'num_gpu is {opt.get("num_gpu")!r} but CUDA is not available; set num_gpu: 0 for the CPU')
    if LAUNCHERS[launcher] is None:
        return 0, 1
    backend = (opt.get('dist_params') or {}).get('backend')
    context = init_distributed(LAUNCHERS[launcher], device='cuda' if wants_cuda else 'cpu', backend=backend)
    return context.rank, context.world_size


def check_training_options(opt: dict) -> None:
    """Fail before training on a malformed configuration, naming the problem. A few-shot batch lowered to the
    shots (:func:`fit_batch_to_shots`) is logged as a warning of this module's logger (the command prints it)."""
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
        if phase != 'train' and not phase.startswith('val'):
            problems.append(f'datasets.{phase}: phases are train and val* (val_1, val_2, ...)')
    optim = opt['train'].get('optim') or {}
    if 'type' not in optim or 'lr' not in optim:
        problems.append('train.optim needs type and lr')
    elif not hasattr(torch.optim, optim['type']):
        problems.append(f'train.optim.type {optim["type"]!r} is not a torch.optim optimizer')
    if opt['train'].get('total_epoch') is None and opt['train'].get('total_iter') is None:
        problems.append('train needs total_epoch or total_iter')
    if opt.get('val') is not None and not opt['val'].get('metrics'):
        problems.append('val.metrics is required when val is given')
    if opt.get('val') is not None and not opt['val'].get('val_freq'):
        problems.append('val.val_freq is required when val is given')
    if problems:
        raise ValueError('invalid training config: ' + '; '.join(problems))
    logger_opt = opt.setdefault('logger', {})
    logger_opt.setdefault('print_freq', 100)
    logger_opt.setdefault('use_tb_logger', False)
    note = fit_batch_to_shots(opt['datasets']['train'], opt.get('world_size', 1))
    if note:
        _log.warning(note)


def check_shots_cover_ranks(dataset: dict, world_size: int) -> int:
    """A few-shot train set's images (shots x enlarge ratio); a :class:`ConfigError` when fewer than the ranks."""
    if dataset.get('type') != 'FewShotNRDataset' or dataset.get('num_shots') is None:
        return 0
    total = int(dataset['num_shots']) * int(dataset.get('dataset_enlarge_ratio', 1))
    if total < world_size:
        raise ConfigError(f'datasets.train: {total} training images (num_shots x dataset_enlarge_ratio) cannot be '
                          f'shared by {world_size} processes: use at most {total} processes')
    return total


def fit_batch_to_shots(dataset: dict, world_size: int = 1) -> Optional[str]:
    """Lower a few-shot train set's ``batch_size_per_gpu`` to its shots per process (x enlarge ratio); returns a
    note saying so (None when the batch fits).

    pyiqa's train loader drops incomplete batches, so a batch larger than a process's share of the training set
    would run no step at all; one batch of all shots per step is what the official code does. Each of
    ``world_size`` processes takes its share of the shots. Changes the options in place.
    """
    if dataset.get('type') != 'FewShotNRDataset' or dataset.get('num_shots') is None:
        return None
    total = check_shots_cover_ranks(dataset, world_size)
    available = total // world_size
    batch = dataset.get('batch_size_per_gpu')
    if batch is None or batch <= available:
        return None
    share = f'{available} per process of {world_size}' if world_size > 1 else f'{available}'
    dataset['batch_size_per_gpu'] = available
    return (f'datasets.train: batch_size_per_gpu {batch} > {share} training images; using {available} '
            '(all shots per step)')


# ------------------------------------------------------------------------------------------ the train data
def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which finishes the step and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_train_loader(opt: dict, dataset_opt: dict):
    """The train set, its resumable sampler and loader, iterations per epoch (pyiqa's formula), epochs, iters."""
    from pyiqa.data import build_dataset
    from pyiqa.data.prefetch_dataloader import PrefetchDataLoader

    with trusted_loading():
        train_set = build_dataset(dataset_opt)
    ratio = int(dataset_opt.get('dataset_enlarge_ratio', 1))
    shuffle, seed = dataset_opt.get('use_shuffle', True), int(opt['manual_seed'])
    if hasattr(train_set, 'round_sampler'):  # meta-training: every task once per round, whatever the ranks
        sampler = train_set.round_sampler(opt['world_size'], opt['rank'], seed, shuffle)
    else:
        sampler = ResumableSampler(train_set, opt['world_size'], opt['rank'], ratio, shuffle, seed)
    per_process = 1 if opt['dist'] or opt['num_gpu'] == 0 else opt['num_gpu']  # pyiqa: DataParallel multiplies
    batch_size = dataset_opt['batch_size_per_gpu'] * per_process
    num_workers = int(dataset_opt.get('num_worker_per_gpu', 0)) * per_process
    loader_args = dict(dataset=SeededItems(train_set), batch_size=batch_size, sampler=sampler, drop_last=True,
                       num_workers=num_workers, pin_memory=dataset_opt.get('pin_memory', False),
                       persistent_workers=bool(dataset_opt.get('persistent_workers', False)) and num_workers > 0,
                       worker_init_fn=_quiet_worker if num_workers > 0 else None,
                       generator=torch.Generator().manual_seed(int(opt['manual_seed'])))  # keeps the global one
    if dataset_opt.get('prefetch_mode') == 'cpu':
        loader = PrefetchDataLoader(num_prefetch_queue=dataset_opt.get('num_prefetch_queue', 1), **loader_args)
    else:
        loader = torch.utils.data.DataLoader(**loader_args)
    if isinstance(sampler, ResumableSampler):  # pyiqa's count, which its users' total_epoch settings assume
        iters_per_epoch = math.ceil(len(train_set) * ratio / (dataset_opt['batch_size_per_gpu'] * opt['world_size']))
    else:
        iters_per_epoch = len(sampler) // batch_size
    if opt['train'].get('total_epoch') is not None:
        total_epochs = int(opt['train']['total_epoch'])
        opt['train']['total_iter'] = total_epochs * iters_per_epoch
    else:
        total_epochs = math.ceil(int(opt['train']['total_iter']) / iters_per_epoch)
    return train_set, sampler, loader, total_epochs, int(opt['train']['total_iter'])


def _prefetcher(loader, opt: dict):
    from pyiqa.data.prefetch_dataloader import CPUPrefetcher, CUDAPrefetcher

    mode = opt['datasets']['train'].get('prefetch_mode')
    if mode in (None, 'cpu'):
        return CPUPrefetcher(loader)
    if mode == 'cuda':
        if opt['datasets']['train'].get('pin_memory') is not True:
            raise ConfigError('datasets.train.prefetch_mode cuda needs pin_memory: true')
        return CUDAPrefetcher(loader, opt)
    raise ConfigError(f'datasets.train.prefetch_mode must be ~, cpu or cuda, got {mode!r}')


# --------------------------------------------------------------------------------------------- stop signals
@contextlib.contextmanager
def stop_requests() -> Iterator[Dict[str, Optional[int]]]:
    """While training, SIGTERM and SIGINT only record that a stop was asked. A second Ctrl-C acts as usual;
    SIGTERM stays recorded (launchers such as torchrun forward the one a scheduler sent, so it comes twice)."""
    request: Dict[str, Optional[int]] = {'signal': None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def record(signum, frame) -> None:
        request['signal'] = request['signal'] or signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, previous['SIGINT'])

    previous = {name: signal.getsignal(getattr(signal, name)) for name in ('SIGTERM', 'SIGINT')}
    for name in previous:
        signal.signal(getattr(signal, name), record)
    try:
        yield request
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


# ------------------------------------------------------------------------------------------------ the loop
def _resume_state(opt: dict) -> Tuple[Optional[str], Optional[dict]]:
    """The state to continue from: rank 0 picks it (naming what it skips), every rank reads that file."""
    models = opt['path']['models']
    path = opt['path'].get('resume_state')
    if opt.get('auto_resume'):
        path = None
        if opt['rank'] == 0:
            path, _ = find_resume_state(opt['path']['training_states'],
                                        lambda it: os.path.join(models, f'net_{it}.pth'))
        if opt['dist']:
            path = broadcast_object(path)
    return (path, load_state(path)) if path else (None, None)


def _start_experiment(opt: dict, args, resumed: bool) -> Optional[str]:
    """Create the experiment folders on rank 0 and copy the options there; returns where an existing
    experiment folder of the same name was moved (pyiqa's ``mkdir_and_rename``), None when there was none. A move
    is said on stderr, naming both folders: checkpoint paths into the old folder now point into the new run."""
    from pyiqa.utils import make_exp_dirs, mkdir_and_rename

    if opt['rank'] != 0:
        return None
    archived = None
    if not resumed:
        root = opt['path']['experiments_root']
        existing = os.path.exists(root)
        before = set(glob.glob(glob.escape(root) + '_archived_*'))
        with contextlib.redirect_stdout(io.StringIO()):  # pyiqa prints its own line; ours names both folders
            make_exp_dirs(opt)
            if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name']:
                os.makedirs(os.path.join(opt['root_path'], 'tb_logger_archived'), exist_ok=True)
                mkdir_and_rename(os.path.join(opt['root_path'], 'tb_logger', opt['name']))
        moved = sorted(set(glob.glob(glob.escape(root) + '_archived_*')) - before)
        if existing and moved:
            archived = moved[-1]
            print(f'an experiment named {opt["name"]!r} existed: moved {root} to {archived}; this run writes '
                  f'{root}', file=sys.stderr, flush=True)
    for key in ('models', 'training_states'):
        os.makedirs(opt['path'][key], exist_ok=True)
        remove_stale_temporaries(opt['path'][key])
    header = (f'# written {time.asctime()} by pyiqa-grmp train -opt {args.opt}\n'
              '# the options as run, overrides applied\n')
    write_atomically(os.path.join(opt['path']['experiments_root'], os.path.basename(args.opt)),
                     header + dump_yaml({k: v for k, v in opt.items() if k not in ('dist', 'rank', 'world_size')}))
    return archived


def _tb_logger(opt: dict):
    """pyiqa's TensorBoard logger (and wandb, which syncs it) on rank 0, as its ``logger`` options ask."""
    from pyiqa.utils import init_tb_logger, init_wandb_logger

    if opt['rank'] != 0 or not opt['logger'].get('use_tb_logger') or 'debug' in opt['name']:
        return None
    if (opt['logger'].get('wandb') or {}).get('project') is not None:
        init_wandb_logger(opt)
    return init_tb_logger(log_dir=os.path.join(opt['root_path'], 'tb_logger', opt['name']))


def run_training(opt: dict, args, root_path: str, progress: bool = True) -> Dict[str, Any]:
    """Train ``opt`` (parsed by :func:`parse_training_options`); returns the best validation results.

    Logs into ``experiments/<name>/train_<name>_<time>.log`` (rank 0; the path is left in ``opt['log_file']``);
    ``progress`` shows the run on stderr (:class:`~pyiqa_grmp.progress.TrainingProgress`, rank 0).

    With ``--auto_resume`` (or ``path.resume_state``) the run continues from a training state exactly as if it
    had not stopped. Raises :class:`TrainingInterrupted` after writing a state when SIGTERM/SIGINT asked to stop.
    """
    from pyiqa.utils import get_time_str

    opt['root_path'] = root_path
    torch.backends.cudnn.benchmark = True
    if opt.get('num_gpu') in (0, None) or not torch.cuda.is_available():
        keep_freed_memory()
    state_path, state = _resume_state(opt)
    if state is not None:
        check_resume_fingerprint(state.get('fingerprint'), resume_fingerprint(opt), state_path)
    opt['archived_experiment'] = _start_experiment(opt, args, resumed=state is not None)
    log_file = os.path.join(opt['path']['log'], f'train_{opt["name"]}_{get_time_str()}.log')
    opt['log_file'] = log_file if opt['rank'] == 0 else None
    with run_log(log_file, opt['rank']) as logger:
        return _train_loop(opt, state_path, state, logger, progress)


def _train_loop(opt: dict, state_path: Optional[str], state: Optional[dict], logger, show: bool) -> Dict[str, Any]:
    from pyiqa.data import build_dataloader, build_dataset
    from pyiqa.models import build_model
    from pyiqa.utils import AvgTimer, get_env_info
    from pyiqa.utils.options import dict2str

    logger.info(get_env_info())
    logger.info(dict2str(opt))
    tb_logger = _tb_logger(opt)

    train_opt = opt['datasets']['train']
    train_set, sampler, train_loader, total_epochs, total_iters = build_train_loader(opt, train_opt)
    with trusted_loading():
        val_loaders = [build_dataloader(build_dataset(d), d, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                        sampler=None, seed=opt['manual_seed'])
                       for phase, d in opt['datasets'].items() if phase.startswith('val')]
    plan = (f'training: {len(train_set)} items x {train_opt.get("dataset_enlarge_ratio", 1)}, batch '
            f'{train_opt["batch_size_per_gpu"]} per process x {opt["world_size"]}; {total_epochs} epochs, '
            f'{total_iters} iterations')
    with trusted_loading():
        model = build_model(opt)
    model.resume_fingerprint = resume_fingerprint(opt)
    start_epoch, current_iter, position = 0, 0, 0
    if state is not None:
        model.resume_training(state)
        start_epoch, current_iter = int(state['epoch']), int(state['iter'])
        position = int(state.get('loop', {}).get('epoch_position', 0))
    log_opt, val_opt = opt['logger'], opt.get('val')
    progress = TrainingProgress(opt['name'], total_iters, current_iter, key_metric=(val_opt or {}).get(
        'key_metric', 'srcc'), print_freq=log_opt['print_freq'], validates=val_opt is not None,
        enabled=show and opt['rank'] == 0)
    def say(text: str) -> None:  # in the log, and on the console of rank 0
        logger.info(text)
        progress.note(text)

    try:
        say(plan)
        say(trainable_line(model.get_bare_model(model.net)))
        if state is not None:
            say(f'resuming from {state_path}: epoch {start_epoch}, iteration {current_iter}, {position} batches '
                'into the epoch')
        progress.note(f'log: {opt["log_file"]}')
        msg_logger = MessageLogger(opt, current_iter + 1, total_iters, tb_logger)
        prefetcher = _prefetcher(train_loader, opt)
        batch = train_loader.batch_size
        data_timer, iter_timer = AvgTimer(), AvgTimer()
        finished, validated_at = False, None

        def save_state(epoch: int) -> str:
            generators = all_gather_objects(capture_rng()) if opt['dist'] else [capture_rng()]  # one per rank
            model.save(epoch, current_iter, loop_state={'epoch_position': position, 'rng': generators})
            return os.path.join(opt['path']['training_states'], f'{current_iter}.state')

        def validate() -> None:
            results = {}
            for val_loader in val_loaders:
                model.validation(val_loader, current_iter, tb_logger, val_opt.get('save_img', False))
                results[val_loader.dataset.opt['name']] = dict(getattr(model, 'metric_results', {}) or {})
            progress.validated(current_iter, results, getattr(model, 'best_metric_results', {}) or {})

        with stop_requests() as stop:
            if state is not None and state.get('loop'):
                restore_rng(state['loop']['rng'][opt['rank']])
            epoch = start_epoch
            for epoch in range(start_epoch, total_epochs + 1):
                sampler.set_epoch(epoch, start=position * batch if epoch == start_epoch else 0)
                if epoch != start_epoch:
                    position = 0
                prefetcher.reset()
                train_data = prefetcher.next()
                while train_data is not None:
                    data_timer.record()
                    if current_iter >= total_iters:
                        break
                    current_iter += 1
                    model.feed_data(train_data)
                    model.optimize_parameters(current_iter)
                    position += 1
                    iter_timer.record()
                    current_log = model.get_current_log()
                    lrs = model.get_current_learning_rate()
                    progress.step(current_iter, current_log, max(lrs) if lrs else None)
                    if current_iter % log_opt['print_freq'] == 0:
                        msg_logger({'epoch': epoch, 'iter': current_iter, 'lrs': lrs,
                                    'time': iter_timer.get_avg_time(), 'data_time': data_timer.get_avg_time(),
                                    **current_log})
                    if val_opt is not None and current_iter % val_opt['val_freq'] == 0:
                        validate()
                        validated_at = current_iter
                    finished, stopping = model.training_finished(), stop['signal']
                    if opt['dist'] and any_rank(bool(stopping), model.device) and not stopping:
                        stopping = signal.SIGTERM  # another rank was asked to stop: all stop at this iteration
                    if current_iter % log_opt.get('save_checkpoint_freq', math.inf) == 0 or stopping or finished:
                        logger.info(f'saving the network and training state of iteration {current_iter}')
                        saved = save_state(epoch)
                    if current_iter % log_opt.get('save_latest_freq', math.inf) == 0:
                        model.save_network(model.net, 'net', -1)
                    if stopping:
                        if opt['dist']:
                            barrier()  # rank 0 has written the state before any rank exits
                        raise TrainingInterrupted(stopping, current_iter, saved)
                    if finished or ('debug' in opt['name'] and current_iter >= 8):
                        break
                    data_timer.start()
                    iter_timer.start()
                    train_data = prefetcher.next()
                if finished:
                    break
                model.update_learning_rate(epoch + 2, warmup_iter=opt['train'].get('warmup_iter', -1))
                if 'debug' in opt['name'] and epoch >= 2:
                    break

        if opt['dist']:
            say(_ranks_agree(model))
        logger.info('end of training; saving net_latest.pth')
        model.save_network(model.net, 'net', -1)
        if val_opt is not None and validated_at != current_iter:  # the weights changed since the last validation
            validate()
        return model.best_metric_results
    finally:
        progress.close()
        if tb_logger:
            tb_logger.close()


def _ranks_agree(model) -> str:
    """Fail loudly if the ranks ended with different weights (a synchronisation bug would be silent otherwise):
    every tensor the model declares synchronised is compared bit for bit, by its sha256 on each rank; returns
    what was compared, in words."""
    compared = check_ranks_hold_the_same(model.synchronised_state())
    return f'weights identical on all {get_world_size()} ranks ({compared} tensors compared by sha256)'


@dataclass
class TrainResult:
    """What a training run left: its experiment folder, checkpoints, best validation results and curves."""

    experiment_dir: str
    best_checkpoint: Optional[str]  # models/net_best.pth; None when no validation ran
    latest_checkpoint: str  # models/net_latest.pth, the weights at the end
    best: Dict[str, Any] = field(default_factory=dict)  # per validation set and metric: {'val': ..., 'iter': ...}
    curves: Optional[str] = None  # curves.png, drawn from metrics.jsonl (rank 0 only)
    log_file: Optional[str] = None  # the run's log (options, architecture, every step); rank 0 only
    archived: Optional[str] = None  # where an experiment folder of the same name was moved, if there was one
    key_metric: str = 'srcc'  # val.key_metric

    def best_text(self) -> Optional[str]:
        """``best: PATH (srcc 0.8123 at iteration 40)``; None when no validation ran."""
        if self.best_checkpoint is None:
            return None
        found = next((metrics[self.key_metric] for metrics in self.best.values() if self.key_metric in metrics),
                     None)
        if found is None:
            return f'best: {self.best_checkpoint}'
        return f'best: {self.best_checkpoint} ({self.key_metric} {found["val"]:.4f} at iteration {found["iter"]})'


def train(options: Options, overrides: Sequence[str] = (), *, auto_resume: bool = False, launcher: str = 'none',
          debug: bool = False, root_path: Optional[str] = None, progress: bool = True) -> TrainResult:
    """Train GRMP-IQA (or any model of pyiqa's registries) from pyiqa-style training options.

    ``options``: a mapping as a training YAML holds it (``name``, ``model_type``, ``network``, ``datasets``,
    ``train``, ``val``, ``path``, ``logger``; see ``configs/``) or the path of such a YAML, read as plain data.
    ``overrides``: ``KEY:SUB=VALUE`` strings, values as YAML (``--force_yml``), e.g. ``'train:total_epoch=5'``.
    The experiment lands in ``root_path`` (default: the current folder) under ``experiments/<name>``; an existing
    folder of that name is moved aside (``<name>_archived_<time>``), which is said on stderr.
    ``auto_resume`` continues from the newest usable training state, exactly as if the run had not stopped.
    ``launcher``: 'none', or 'pytorch' / 'slurm' to join the process group of torchrun / srun. ``debug`` is
    pyiqa's debug mode (a few iterations). SIGTERM / SIGINT write a training state and raise
    :class:`TrainingInterrupted`; a malformed configuration raises ValueError before anything runs. ``progress``
    shows the run on stderr (a bar on a terminal, a line per validation otherwise); everything is logged to the
    run's log file (:attr:`TrainResult.log_file`).
    """
    from .reporting import plot_run_curves

    root_path = root_path or os.getcwd()
    opt, args = _prepared(*read_training_options(options, overrides, launcher, auto_resume, debug), root_path)
    best = run_training(opt, args, root_path, progress)
    models = opt['path']['models']
    best_checkpoint = os.path.join(models, 'net_best.pth')
    return TrainResult(experiment_dir=opt['path']['experiments_root'],
                       best_checkpoint=best_checkpoint if os.path.isfile(best_checkpoint) else None,
                       latest_checkpoint=os.path.join(models, 'net_latest.pth'), best=best,
                       curves=plot_run_curves(opt), log_file=opt.get('log_file'),
                       archived=opt.get('archived_experiment'),
                       key_metric=(opt.get('val') or {}).get('key_metric', 'srcc'))


# -------------------------------------------------------------------------------------------------- protocol
def _fewshot_datasets(opt: dict) -> List[dict]:
    return [d for d in opt['datasets'].values() if d.get('type') == 'FewShotNRDataset']


@dataclass
class ProtocolResult:
    """Every run of the protocol (split seed, test SRCC / PLCC / KRCC, checkpoint) and their mean, median and std."""

    runs: List[dict]
    summary: Dict[str, Dict[str, float]]  # 'mean' / 'median' / 'std' -> {'srcc': ..., 'plcc': ..., 'krcc': ...}
    select: str
    out_dir: Optional[str]  # protocol.csv and protocol.md; None on ranks > 0, which write nothing

    @property
    def selection(self) -> str:
        """How each run's checkpoint was chosen, in words."""
        return SELECTIONS[self.select]


def run_protocol(options: Options, overrides: Sequence[str] = (), *, runs: int = 10, select: str = 'val',
                 launcher: str = 'none', out_dir: Optional[str] = None,
                 root_path: Optional[str] = None) -> ProtocolResult:
    """The paper's protocol: per run a new random split and N-shot sample, train, evaluate on that run's test split.

    ``options`` / ``overrides`` as for :func:`train`, with ``FewShotNRDataset`` datasets; run ``k`` uses split seed
    and manual seed ``+ k``. ``select='val'`` picks each run's checkpoint on the validation carve-out of the pool;
    ``select='test'`` reproduces the official code, which picks the best epoch on the test split itself
    (optimistic). Under ``launcher='pytorch'`` the runs are spread over the ranks, each trained by one rank alone;
    rank 0 writes ``protocol.csv`` and ``protocol.md`` into ``out_dir`` (default
    ``experiments/<name>_protocol``), the same as one process's. Every rank gets every run.
    """
    import pandas as pd
    from pyiqa.utils.options import make_paths

    from .distributed import all_gather_objects, shard
    from .evaluation import evaluate_checkpoint
    from .options import seed_everything

    if select not in SELECTIONS:
        raise InvalidArgument('select', f'must be val or test, got {select!r}')
    if runs < 1:
        raise InvalidArgument('runs', f'must be at least 1, got {runs}')
    root_path = root_path or os.getcwd()
    base_opt, args = read_training_options(options, overrides, launcher)
    rank, world_size = join_launch(base_opt, args.launcher)
    base_opt = prepare_options(base_opt, args, root_path)  # each run is one process: rank 0 of 1
    check_training_options(base_opt)
    if not _fewshot_datasets(base_opt):
        raise ValueError('the protocol needs FewShotNRDataset datasets (num_shots, split_seed) in the config')
    val_sets = [d for phase, d in base_opt['datasets'].items() if phase.startswith('val')]
    if not val_sets:
        raise ValueError('the protocol needs a val dataset to choose the checkpoint')
    if select == 'val' and any(int(d.get('num_val', 0)) == 0 for d in val_sets):
        raise InvalidArgument('select', "'val' needs num_val > 0 on the val dataset (a carve-out of the training pool)")
    first_seed = int(_fewshot_datasets(base_opt)[0].get('split_seed', 0))
    device = 'cuda' if base_opt.get('num_gpu', 0) != 0 and torch.cuda.is_available() else 'cpu'
    rows = []
    for run in shard(list(range(runs)), rank, world_size):
        opt = copy.deepcopy(base_opt)
        seed = first_seed + run
        for dataset in _fewshot_datasets(opt):
            dataset['split_seed'] = seed
        for dataset in (d for phase, d in opt['datasets'].items() if phase.startswith('val')):
            dataset['override_phase'] = 'test' if select == 'test' else None
        opt['name'] = f'{base_opt["name"]}_run{run:02d}'
        opt['manual_seed'] = int(base_opt.get('manual_seed', 0)) + run
        make_paths(opt, root_path)
        seed_everything(opt['manual_seed'])
        run_training(opt, args, root_path)
        test_opt = copy.deepcopy(_fewshot_datasets(opt)[0])
        test_opt.update(phase='test', override_phase='test', name=f'{test_opt.get("name", "data")}_test')
        best = os.path.join(opt['path']['models'], 'net_best.pth')
        result = evaluate_checkpoint(opt['network'], best, test_opt, device=device)
        rows.append({'run': run, 'split_seed': seed, **result, 'checkpoint': best})
        write_line(f'protocol run {run}: split_seed {seed}  test SRCC {result["srcc"]:.4f}  PLCC '
                   f'{result["plcc"]:.4f}')
    if world_size > 1:
        rows = sorted((row for part in all_gather_objects(rows) for row in part), key=lambda row: row['run'])
    table = pd.DataFrame(rows)
    metrics = ['srcc', 'plcc', 'krcc']
    summary = pd.DataFrame([{'run': stat, **{m: getattr(table[m], stat)() for m in metrics}}
                            for stat in ('mean', 'median', 'std')])
    result = ProtocolResult(runs=rows, summary={s['run']: {m: float(s[m]) for m in metrics}
                                                 for _, s in summary.iterrows()}, select=select, out_dir=None)
    if rank != 0:
        return result
    out_dir = out_dir or os.path.join(root_path, 'experiments', f'{base_opt["name"]}_protocol')
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, 'protocol.csv'),
                     pd.concat([table, summary], ignore_index=True).to_csv(index=False))
    lines = [f'# {base_opt["name"]}: {runs} runs, {SELECTIONS[select]}', '',
             '| run | split_seed | test images | SRCC | PLCC |', '|---|---|---|---|---|']
    lines += [f'| {r["run"]} | {r["split_seed"]} | {r["num_test"]} | {r["srcc"]:.4f} | {r["plcc"]:.4f} |' for r in rows]
    for _, s in summary.iterrows():
        lines.append(f'| **{s["run"]}** | | | {s["srcc"]:.4f} | {s["plcc"]:.4f} |')
    write_atomically(os.path.join(out_dir, 'protocol.md'), '\n'.join(lines) + '\n')
    result.out_dir = out_dir
    return result

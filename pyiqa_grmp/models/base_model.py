"""What both GRMP-IQA training models share on top of pyiqa's GeneralIQAModel: checkpoint loading (ours and
official), whole-loader prediction, checkpoint selection on the sum of validation metrics, compact checkpoints,
a resume that restores the network weights and each model's own state, and the metrics log (``metrics.jsonl``
next to pyiqa's log: every training step and validation, whichever loop drives the model).

Compact checkpoints: ``net_*.pth`` holds only the tensors training can change (the parameters that require
gradients: in fine-tuning the text context and the unfrozen blocks, in meta-training the prompts) and, under
``applies_to``, the base they apply to: the digest of every other tensor and where those come from (the weight
options that rebuild them, or, for tensors initialised at random, ``base-<digest>.safetensors`` written once
beside the checkpoints)."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from pyiqa.losses import build_loss
from pyiqa.metrics import calculate_metric
from pyiqa.models.general_iqa_model import GeneralIQAModel
from pyiqa.utils import get_root_logger
from torch import nn

from ..archs.checkpoint import COMPACT_FORMAT, tensor_digest
from ..checkpointing import STATE_FORMAT, ResumeError, atomic_torch_save
from ..cpu_memory import keep_freed_memory
from ..distributed import broadcast_object, broadcast_tensors_, get_rank
from ..metrics_log import METRICS_FILE, MetricsLog
from ..model_folder import checkpoint_description, write_safetensors


class TrainingConfigError(ValueError):
    """A training option is invalid; raised while building the model, before any training step."""


def plain(value):
    """Nested dicts with numpy scalars -> builtin types, so ``torch.load(weights_only=True)`` can read them."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def merged_options(defaults: dict, given: Optional[dict], what: str) -> dict:
    """``defaults`` updated with ``given``; unknown keys are a config error naming them."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainingConfigError(f'unknown option(s) {unknown} in train.{what}; known: {sorted(defaults)}')
    return {**defaults, **given}


def predict_loader(net: nn.Module, dataloader, device) -> Dict[str, np.ndarray]:
    """Scores ('pred') and labels ('mos') of every batch of an NR loader, in eval mode; the mode is restored. On the
    CPU this process keeps freed memory for reuse (:func:`~pyiqa_grmp.cpu_memory.keep_freed_memory`)."""
    if torch.device(device).type == 'cpu':
        keep_freed_memory()
    was_training = net.training
    net.eval()
    predicted, labels = [], []
    with torch.no_grad():
        for batch in dataloader:
            predicted.append(net(batch['img'].to(device)).float().cpu().flatten())
            labels.append(batch['mos_label'].float().flatten())
    net.train(was_training)
    return {'pred': torch.cat(predicted).numpy(), 'mos': torch.cat(labels).numpy()}


class GRMPBaseModel(GeneralIQAModel):
    """Base of the GRMP-IQA training models (not registered itself)."""

    def __init__(self, opt: dict) -> None:
        if opt['network'].get('type') != 'GRMPIQA':
            raise TrainingConfigError(f'{type(self).__name__} needs network type GRMPIQA, '
                                      f'got {opt["network"].get("type")}')
        val_opt = opt.get('val') or {}
        self.select_by = list(val_opt.get('select_by') or [val_opt.get('key_metric', 'srcc')])
        unknown = [m for m in self.select_by if m not in (val_opt.get('metrics') or {})]
        if val_opt.get('metrics') and unknown:
            raise TrainingConfigError(f'val.select_by names {unknown}, which are not in val.metrics '
                                      f'{list(val_opt["metrics"])}')
        self.best_monitor = -math.inf
        self.best_metric_results: dict = {}  # pyiqa's record of the best validation results; empty without val
        self.current_epoch = 0
        log_folder = (opt.get('path') or {}).get('log')
        writes_log = opt.get('is_train') and opt.get('rank', 0) == 0 and log_folder
        self.metrics_log = MetricsLog(os.path.join(log_folder, METRICS_FILE)) if writes_log else None
        super().__init__(opt)
        # The base of this run's checkpoints: the network as training starts (pretrain_network loaded, the
        # trainable set chosen), before any resume replaces its weights.
        self.base_source = self.get_bare_model(self.net).weights_source()
        self.applies_to: Optional[dict] = None

    def __init_subclass__(cls, **kwargs) -> None:
        """Log every training step of every GRMP model: a subclass's own ``optimize_parameters`` is wrapped so
        that, after it returns, :meth:`log_training_step` records the step. A call that took no step (e.g. after
        the plateau rule stopped training) leaves ``log_dict`` as it was and is not recorded."""
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get('optimize_parameters')
        if step is None:
            return

        @functools.wraps(step)
        def optimize_and_log(self, current_iter: int) -> None:
            previous = getattr(self, 'log_dict', None)
            step(self, current_iter)
            if getattr(self, 'log_dict', None) is not previous:
                self.log_training_step(current_iter)

        cls.optimize_parameters = optimize_and_log

    def log_training_step(self, current_iter: int) -> None:
        """Append the step's ``log_dict`` (losses, batch metrics) and learning rate to ``metrics.jsonl``."""
        if self.metrics_log is None:
            return
        lr = max(self.get_current_learning_rate()) if self.optimizers else None
        self.metrics_log.log({'kind': 'train', 'iter': current_iter, 'epoch': self.current_epoch, 'lr': lr,
                              **self.log_dict})

    def update_learning_rate(self, current_iter: int, warmup_iter: int = -1) -> None:
        """pyiqa's loop calls this at the end of each epoch with ``epoch + 2``; the log's epoch follows it."""
        super().update_learning_rate(current_iter, warmup_iter)
        self.current_epoch = current_iter - 1

    def load_network(self, net: nn.Module, load_path: str, strict: bool = True, param_key: str = 'params') -> None:
        """Load ours or an official checkpoint (converted), always strictly; pyiqa's loader knows neither."""
        get_root_logger().info(f'Loading GRMP-IQA weights from {load_path}')
        self.get_bare_model(net).load_checkpoint(load_path)

    def build_quality_loss(self) -> nn.Module:
        """``train.quality_loss_opt`` (default ``GRMPQualityLoss``), through pyiqa's LOSS_REGISTRY."""
        loss_opt = dict(self.opt['train'].get('quality_loss_opt') or {'type': 'GRMPQualityLoss'})
        return build_loss(loss_opt).to(self.device)

    def setup_optimizers(self) -> None:
        """pyiqa's optimizer over the parameters that require gradients, from a copy of ``train.optim`` (pyiqa
        pops keys from it, and the protocol builds one model per run from the same options)."""
        self.opt['train']['optim'] = dict(self.opt['train']['optim'])
        super().setup_optimizers()

    def setup_schedulers(self, scheduler_name: str = 'scheduler') -> None:
        """A pyiqa scheduler is optional for these models."""
        if self.opt['train'].get(scheduler_name):
            super().setup_schedulers(scheduler_name)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The autocast of ``train.amp`` (bf16 or fp16) for a training forward; a no-op without it. Losses and
        gradient rules are computed outside it, in fp32."""
        from ..precision import PRECISION_DTYPES

        if getattr(self, 'amp', None) is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISION_DTYPES[self.amp])

    def predict(self, dataloader) -> Dict[str, np.ndarray]:
        """Scores and labels of a whole loader, in eval mode, in the precision the model trains in: a ``train.amp:
        bf16`` run validates with the network's bf16 scoring (:mod:`pyiqa_grmp.precision`), which is most of the
        speed-up on a CPU with bf16 instructions; fp16 off CUDA, which scoring refuses, validates in fp32. The
        vision blocks that nothing trains run once per validation batch over the whole run
        (:meth:`~pyiqa_grmp.archs.grmp_arch.GRMPIQA.remember_frozen_front`)."""
        from ..precision import check_precision_device

        net = self.get_bare_model(self.net)
        precision = getattr(self, 'amp', None) or 'fp32'
        try:
            check_precision_device(precision, self.device.type)
        except ValueError:
            precision = 'fp32'
        previous, net.precision = net.precision, precision
        net.remember_frozen_front()  # every round scores the same images: the untrained front runs once
        try:
            return predict_loader(net, dataloader, self.device)
        finally:
            net.precision = previous

    # -------------------------------------------------------------------------------------- several ranks
    def model_to_device(self, net: nn.Module) -> nn.Module:
        """The network on this rank's device, never wrapped: DDP synchronises gradients only through
        ``backward()``, and the models here take theirs with ``autograd.grad`` (fine-tuning) or train each rank on
        its own tasks (meta-training); each model synchronises exactly what its rule needs instead."""
        return net.to(self.device)

    def broadcast_initial_weights(self) -> None:
        """Every rank starts from rank 0's weights (pyiqa seeds each rank differently)."""
        if self.opt.get('dist'):
            net = self.get_bare_model(self.net)
            broadcast_tensors_([*net.parameters(), *net.buffers()])

    def synchronised_state(self) -> Dict[str, torch.Tensor]:
        """The tensors every rank must hold identically, by name (here: the whole network)."""
        return dict(self.get_bare_model(self.net).state_dict(keep_vars=True))

    def validation_decisions(self) -> dict:
        """What a validation decides and every rank must share: the best so far, learning rates."""
        return {'best_monitor': self.best_monitor, 'best_metric_results': self.best_metric_results,
                'lrs': [[group['lr'] for group in o.param_groups] for o in self.optimizers]}

    def apply_validation_decisions(self, decisions: dict) -> None:
        """Inverse of :meth:`validation_decisions`, on the ranks that did not validate."""
        self.best_monitor, self.best_metric_results = decisions['best_monitor'], decisions['best_metric_results']
        for optimizer, lrs in zip(self.optimizers, decisions['lrs']):
            for group, lr in zip(optimizer.param_groups, lrs):
                group['lr'] = lr

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Rank 0 validates and decides (best checkpoint, plateau rule); the decisions are broadcast, so every
        rank continues with the same learning rates and stops at the same iteration."""
        if get_rank() == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)
        decisions = broadcast_object(self.validation_decisions() if get_rank() == 0 else None)
        if get_rank() != 0:
            self.apply_validation_decisions(decisions)

    def validate_and_select(self, dataloader, current_iter: int, tb_logger) -> bool:
        """Compute ``val.metrics``; save ``net_best.pth`` when the sum of ``select_by`` beats the best so far."""
        dataset_name = dataloader.dataset.opt['name']
        self._initialize_best_metric_results(dataset_name)
        result = self.predict(dataloader)
        self.metric_results = {name: calculate_metric([result['pred'], result['mos']], metric_opt)
                               for name, metric_opt in self.opt['val']['metrics'].items()}
        monitor = float(sum(self.metric_results[m] for m in self.select_by))
        improved = monitor > self.best_monitor
        if improved:
            self.best_monitor = monitor
            for name, value in self.metric_results.items():
                self._update_metric_result(dataset_name, name, value, current_iter)
            self.save_network(self.net, 'net_best')
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        if self.metrics_log is not None:
            lr = max(self.get_current_learning_rate()) if self.optimizers else None
            self.metrics_log.log({'kind': 'val', 'iter': current_iter, 'epoch': self.current_epoch, 'lr': lr,
                                  'dataset': dataset_name, **self.metric_results, 'improved': improved})
        return improved

    # -------------------------------------------------------------------------------------- saving, resume
    def training_finished(self) -> bool:
        """True once the model's own rule (e.g. the lr plateau) ended training; the loop then stops."""
        return False

    @staticmethod
    def trainable_keys(net: nn.Module) -> List[str]:
        """The state-dict keys of ``net`` that training can change: its parameters that require gradients (a
        shared parameter under every name). Nothing else changes in training (no buffer is persistent)."""
        return [key for key, value in net.state_dict(keep_vars=True).items()
                if isinstance(value, nn.Parameter) and value.requires_grad]

    def compact_reference(self, net: nn.Module) -> dict:
        """The ``applies_to`` entry of this run's checkpoints (computed at the first save, then kept): the digest
        of the tensors training does not change and where they come from. Those initialised at random are
        written once to ``models/base-<digest>.safetensors``, as nothing else could rebuild them."""
        if self.applies_to is None:
            trainable = set(self.trainable_keys(net))
            frozen = {key: value for key, value in net.state_dict().items() if key not in trainable}
            digest = tensor_digest(frozen)
            recipe, random_keys = self.base_source
            if random_keys & frozen.keys():
                name = f'base-{digest[len("sha256:"):][:16]}.safetensors'
                path = os.path.abspath(os.path.join(self.opt['path']['models'], name))
                if not os.path.isfile(path):
                    write_safetensors(path, frozen)
                recipe = {'file': name, 'path': path}
            self.applies_to = {'format': COMPACT_FORMAT, 'digest': digest, 'tensors': len(frozen), 'base': recipe}
        return self.applies_to

    def save_network(self, net: nn.Module, net_label: str, current_iter: Optional[int] = None,
                     param_key: str = 'params') -> None:
        """``models/<label>[_<iter>|_latest].pth`` as ``{param_key: trainable tensors, 'network': ...,
        'base': ..., 'applies_to': ...}`` (compact: the network options, starting weights and the base the tensors
        apply to, so that the path alone loads it), written atomically by rank 0."""
        if self.opt.get('rank', 0) != 0:
            return
        suffix = '' if current_iter is None else '_latest' if current_iter == -1 else f'_{current_iter}'
        bare = self.get_bare_model(net)
        state = bare.state_dict()
        weights = {key: state[key].detach().cpu() for key in self.trainable_keys(bare)}
        described = checkpoint_description(bare, self.opt['network'].get('pretrained_model_path'))
        atomic_torch_save({param_key: weights, **described, 'applies_to': self.compact_reference(bare)},
                          os.path.join(self.opt['path']['models'], f'{net_label}{suffix}.pth'))

    def save(self, epoch: int, current_iter: int, loop_state: Optional[dict] = None) -> None:
        """The network, then (for a real iteration) the training state that refers to it."""
        self.save_network(self.net, 'net', current_iter)
        if current_iter != -1:
            self.save_training_state(epoch, current_iter, loop_state)

    def extra_training_state(self) -> dict:
        """Model-specific state to resume with (builtin types and tensors only)."""
        return {}

    def restore_extra_training_state(self, state: dict) -> None:
        """Inverse of :meth:`extra_training_state`."""

    def save_training_state(self, epoch: int, current_iter: int, loop_state: Optional[dict] = None) -> None:
        """``training_states/<iter>.state`` in one atomic write: optimizers, schedulers, the best results so far,
        the model's own state, the loop's (position in the epoch, generators) and the options it depends on.
        The weights are in ``models/net_<iter>.pth``, written before it by :meth:`save`."""
        if current_iter == -1 or self.opt.get('rank', 0) != 0:
            return
        state = {'format': STATE_FORMAT, 'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers],
                 'grmp': plain({'best_monitor': self.best_monitor, 'best_metric_results': self.best_metric_results,
                                'model': self.extra_training_state()}),
                 'loop': loop_state or {}, 'fingerprint': plain(getattr(self, 'resume_fingerprint', None))}
        atomic_torch_save(state, os.path.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state: dict) -> None:
        """Restore the network weights of the state's iteration, optimizers, schedulers, best results and the
        model's own state (pyiqa restores only optimizers and schedulers). The model's own state is restored
        (and checked) before the optimizers, so a state of another model is a :class:`ResumeError` naming what
        differs, not an optimizer's error."""
        weights = os.path.join(self.opt['path']['models'], f'net_{resume_state["iter"]}.pth')
        if not os.path.isfile(weights):
            raise FileNotFoundError(f'cannot resume: network weights {weights} of iteration {resume_state["iter"]} '
                                    'are missing')
        self.get_bare_model(self.net).load_checkpoint(weights)
        where = f'cannot resume from the training state of iteration {resume_state["iter"]}'
        extra = resume_state.get('grmp', {})
        try:
            self.restore_extra_training_state(extra.get('model', {}))
        except ResumeError as error:
            raise ResumeError(f'{where}: {error}') from None
        for what, held, ours in (('optimizers', resume_state.get('optimizers'), self.optimizers),
                                 ('schedulers', resume_state.get('schedulers'), self.schedulers)):
            if not isinstance(held, list) or len(held) != len(ours):
                count = len(held) if isinstance(held, list) else 'no list of'
                raise ResumeError(f'{where}: it holds {count} {what}, this model has {len(ours)}')
        super().resume_training(resume_state)
        self.current_epoch = int(resume_state.get('epoch', 0))
        self.best_monitor = extra.get('best_monitor', self.best_monitor)
        self.best_metric_results = extra.get('best_metric_results') or {}

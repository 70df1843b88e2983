"""Meta-prompt pre-training of GRMP-IQA over distortion tasks, as a pyiqa model (Reptile-style).

Each pyiqa iteration is one task (one distortion type of one source, from ``DistortionTaskDataset``). The
network itself is the inner model: its prompt tensors take Adam steps alternating a support batch and a query
batch of the task. The meta-parameters theta (prompt tensors only) move after each source's pass over its
tasks: theta <- theta + beta * (mean of the task snapshots - theta). Only prompt tensors are ever copied: theta
and a running sum of the snapshots, never the backbone.

``train.meta.mode``: ``reptile`` (default, the paper's bi-level description) resets the inner model to theta
before every task; ``official`` never resets it, so the inner model trains on across tasks and theta follows
it as a slow average (what the released code does).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, Iterator, List

import torch
from pyiqa.utils import get_root_logger

from ..archs.grmp_arch import PROMPT_PREFIXES
from ..checkpointing import ResumeError
from ..data.labels import minmax_normalise
from ..data.samplers import item_seed
from ..data.transforms import random_crop_and_flip, square_resize
from ..distributed import all_reduce_sum_
from ..presets import paper_settings
from .base_model import GRMPBaseModel, TrainingConfigError, merged_options

#: The paper's meta-training settings (``presets/paper.yml``).
DEFAULT_META = paper_settings('meta_pretrain')['train']['meta']
META_MODES = ('reptile', 'official')


class GRMPMetaPromptModel(GRMPBaseModel):
    """pyiqa model for meta-prompt pre-training (``model_type: GRMPMetaPromptModel``).

    YAML: ``train.optim`` is the inner optimiser (the paper: Adam, lr 1e-4; its state starts fresh for every
    task); ``train.meta: {mode, outer_step, support_ratio, support_batch, query_batch, seed}``; ``train.amp:
    null | bf16`` (bf16 autocast of the towers in the inner steps and validation, the loss in fp32). Training data:
    a ``DistortionTaskDataset`` with ``batch_size_per_gpu: 1``; validation: any NR dataset.
    """

    def __init__(self, opt: dict) -> None:
        self.meta = merged_options(DEFAULT_META, (opt.get('train') or {}).get('meta'), 'meta')
        self.amp = (opt.get('train') or {}).get('amp')
        if self.amp not in (None, 'bf16'):  # fp16 would need a gradient scaler for every inner step
            raise TrainingConfigError(f'train.amp of meta-training must be null or bf16, got {self.amp!r}')
        if self.meta['mode'] not in META_MODES:
            raise TrainingConfigError(f'train.meta.mode must be one of {META_MODES}, got {self.meta["mode"]!r}')
        if not 0 < self.meta['outer_step'] <= 1:
            raise TrainingConfigError(f'train.meta.outer_step must be in (0, 1], got {self.meta["outer_step"]}')
        if not 0 < self.meta['support_ratio'] < 1:
            raise TrainingConfigError(f'train.meta.support_ratio must be in (0, 1), got {self.meta["support_ratio"]}')
        super().__init__(opt)

    def init_training_settings(self) -> None:
        if self.opt.get('dist') and self.meta['mode'] != 'reptile':
            raise TrainingConfigError(
                f'train.meta.mode {self.meta["mode"]!r} trains one inner model across tasks in sequence, which cannot '
                'run on several processes; use mode reptile (parallel Reptile) or launch one process')
        self.broadcast_initial_weights()
        net = self.get_bare_model(self.net)
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith(PROMPT_PREFIXES))
        self.prompt_names = [n for n, _ in net.named_parameters() if n.startswith(PROMPT_PREFIXES)]
        self.prompt_params = [p for n, p in net.named_parameters() if n.startswith(PROMPT_PREFIXES)]
        self.theta = [p.detach().clone() for p in self.prompt_params]
        self.snapshot_sums: Dict[int, List[torch.Tensor]] = {}
        self.snapshot_counts: Dict[int, int] = {}
        self.log_dict: Dict[str, float] = {}
        self.cri_quality = self.build_quality_loss()
        net.train()
        self.setup_optimizers()  # over the prompt tensors, the only parameters that require gradients
        self.setup_schedulers()
        count = sum(p.numel() for p in self.prompt_params)
        get_root_logger().info(f'GRMP meta-prompt pre-training ({self.meta["mode"]}): {len(self.prompt_params)} '
                               f'prompt tensors, {count:,} parameters; backbone frozen')

    # -------------------------------------------------------------------------------------------- data
    def feed_data(self, data: dict) -> None:
        if 'images' not in data:  # validation batches are ordinary NR items
            super().feed_data(data)
            return
        if data['images'].shape[0] != 1:
            raise TrainingConfigError('meta-training takes one task per iteration: set batch_size_per_gpu: 1')
        self.task_idle = bool(data['idle'][0])
        self.task_seed = int(data['item_seed'][0])
        self.task_images = data['images'][0].to(self.device)
        self.task_mos = data['mos'][0].float().to(self.device)
        self.task_source = int(data['source'][0])
        self.source_size = int(data['num_source_tasks'][0])

    def _pixels(self, indices: torch.Tensor, support: bool) -> torch.Tensor:
        """Support: random crop + flip (the official 224 from 256); query: resized to the crop size."""
        net = self.get_bare_model(self.net)
        images = self.task_images[indices].float() / 255
        crops = random_crop_and_flip(images, net.crop) if support else square_resize(images, net.crop)
        return net.normalize(crops)

    # ---------------------------------------------------------------------------------------- training
    def optimize_parameters(self, current_iter: int) -> None:
        """One task (none on an idle slot), then its snapshot summed over the ranks (see :meth:`_add_snapshot`)."""
        if not self.task_idle:
            devices = [self.device] if self.device.type == 'cuda' else []
            with torch.random.fork_rng(devices=devices):  # the task's own randomness, whichever rank runs it
                torch.manual_seed(item_seed(int(self.meta['seed']), self.task_seed))
                self.log_dict = self._train_task()
        self._add_snapshot()

    def _train_task(self) -> Dict[str, float]:
        """Inner steps from theta (reptile) or from where the inner model is (official); the last losses."""
        net = self.get_bare_model(self.net)
        if self.meta['mode'] == 'reptile':
            with torch.no_grad():
                for param, meta_value in zip(self.prompt_params, self.theta):
                    param.copy_(meta_value)
        self.optimizer.state.clear()  # a fresh inner optimiser for every task
        count = self.task_images.shape[0]
        order = torch.randperm(count).to(self.device)
        num_support = min(count - 1, max(1, round(self.meta['support_ratio'] * count)))
        support, query = order[:num_support], order[num_support:]
        # min-max within each part, as the official code, where a constant part maps to 0.5
        support_labels, query_labels = (minmax_normalise(self.task_mos[part], constant='half')
                                        for part in (support, query))
        query_batch = int(self.meta['query_batch'])
        query_starts = range(0, len(query), query_batch)
        losses = OrderedDict()
        for step, start in enumerate(range(0, num_support, int(self.meta['support_batch']))):
            batch = slice(start, start + int(self.meta['support_batch']))
            losses['l_support'] = self._inner_step(net, self._pixels(support[batch], True), support_labels[batch])
            query_start = query_starts[step % len(query_starts)]  # the query batches cycle
            batch = slice(query_start, query_start + query_batch)
            losses['l_query'] = self._inner_step(net, self._pixels(query[batch], False), query_labels[batch])
        return OrderedDict((name, float(value)) for name, value in losses.items())

    def _inner_step(self, net, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            score = net.score_pixels(pixels)
        loss = self.cri_quality(score, labels)  # in fp32
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _add_snapshot(self) -> None:
        """Add this iteration's task snapshots, summed over the ranks (an idle rank adds zeros), to its source's
        sum; once every task of the source is in, the outer update (the same on every rank)."""
        source = self.task_source
        with torch.no_grad():
            snapshot = [torch.zeros_like(p) if self.task_idle else p.detach().clone() for p in self.prompt_params]
            count = torch.tensor([0.0 if self.task_idle else 1.0], device=self.device)
            if self.opt.get('dist'):
                all_reduce_sum_([*snapshot, count])
            if source not in self.snapshot_sums:
                self.snapshot_sums[source] = [torch.zeros_like(p) for p in self.prompt_params]
                self.snapshot_counts[source] = 0
            for total, part in zip(self.snapshot_sums[source], snapshot):
                total.add_(part)
            self.snapshot_counts[source] += int(round(count.item()))
        if self.snapshot_counts[source] >= self.source_size:
            self.outer_update(source)

    def outer_update(self, source: int) -> None:
        """theta <- theta + beta * (mean of the source's task snapshots - theta); clears that source's sum."""
        sums, count = self.snapshot_sums.pop(source), self.snapshot_counts.pop(source)
        beta = float(self.meta['outer_step'])
        with torch.no_grad():
            for meta_value, total in zip(self.theta, sums):
                meta_value.add_(total / count - meta_value, alpha=beta)

    # ------------------------------------------------------------------------- theta is what is kept
    @contextlib.contextmanager
    def theta_in_network(self) -> Iterator[None]:
        """Temporarily put theta into the network (for validation and saving); the inner values come back."""
        with torch.no_grad():
            inner = [p.detach().clone() for p in self.prompt_params]
            for param, meta_value in zip(self.prompt_params, self.theta):
                param.copy_(meta_value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.prompt_params, inner):
                    param.copy_(value)

    def synchronised_state(self) -> Dict[str, torch.Tensor]:
        """Theta and the frozen backbone, by name; the inner prompts are each rank's own last task."""
        net = self.get_bare_model(self.net)
        backbone = {n: p for n, p in net.state_dict(keep_vars=True).items() if not n.startswith(PROMPT_PREFIXES)}
        return {**{f'theta.{n}': t for n, t in zip(self.prompt_names, self.theta)}, **backbone}

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        with self.theta_in_network():
            self.validate_and_select(dataloader, current_iter, tb_logger)

    def save_network(self, net, net_label: str, current_iter=None, param_key: str = 'params') -> None:
        """Checkpoints hold theta, never the inner model's prompts."""
        with self.theta_in_network():
            super().save_network(net, net_label, current_iter, param_key)

    def extra_training_state(self) -> dict:
        return {'theta': [t.cpu() for t in self.theta], 'inner': [p.detach().cpu() for p in self.prompt_params],
                'snapshot_sums': {str(s): [t.cpu() for t in v] for s, v in self.snapshot_sums.items()},
                'snapshot_counts': {str(s): c for s, c in self.snapshot_counts.items()}}

    def _check_prompt_tensors(self, what: str, tensors) -> None:
        """``tensors`` (a part of a training state) must match the prompt tensors one to one, in shape."""
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(self.prompt_params):
            held = f'{len(tensors)} tensors' if isinstance(tensors, (list, tuple)) else type(tensors).__name__
            raise ResumeError(f'its {what} holds {held}, this model has {len(self.prompt_params)} prompt tensors')
        differ = [f'{name}: {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__} in the state, '
                  f'{tuple(p.shape)} in the model'
                  for name, p, t in zip(self.prompt_names, self.prompt_params, tensors)
                  if not isinstance(t, torch.Tensor) or t.shape != p.shape]
        if differ:
            raise ResumeError(f'its {what} differs from the prompt tensors of this model ({len(differ)} of '
                              f'{len(tensors)}): ' + '; '.join(differ[:5]) + (' ...' if len(differ) > 5 else ''))

    def restore_extra_training_state(self, state: dict) -> None:
        """The saved network holds theta; the inner prompts and snapshot sums come from the state, each checked
        against the model's prompt tensors first (:class:`ResumeError` naming what differs)."""
        if not state:
            return
        missing = [key for key in ('theta', 'inner', 'snapshot_sums', 'snapshot_counts') if key not in state]
        if missing:
            raise ResumeError(f'it is no meta-training state: {missing} missing')
        self._check_prompt_tensors('theta', state['theta'])
        self._check_prompt_tensors('inner', state['inner'])
        sums, counts = state['snapshot_sums'], state['snapshot_counts']
        if not isinstance(sums, dict) or not isinstance(counts, dict) or set(sums) != set(counts) or not all(
                isinstance(s, str) and s.isdigit() and isinstance(c, int) for s, c in counts.items()):
            raise ResumeError('its snapshot_sums and snapshot_counts must name the same sources (source index: '
                              'tensors, source index: count)')
        for source, tensors in sums.items():
            self._check_prompt_tensors(f'snapshot_sums of source {source}', tensors)
        with torch.no_grad():
            self.theta = [t.to(self.device).clone() for t in state['theta']]
            for param, value in zip(self.prompt_params, state['inner']):
                param.copy_(value)
        self.snapshot_sums = {int(s): [t.to(self.device) for t in v] for s, v in sums.items()}
        self.snapshot_counts = {int(s): c for s, c in counts.items()}

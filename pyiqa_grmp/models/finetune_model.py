"""Few-shot fine-tuning of GRMP-IQA with quality-aware gradient regularization, as a pyiqa model.

One training step: one student forward gives the quality probability and the scene logits; the quality loss
gives g_d and the scene-consistency loss against a frozen teacher gives g_g (two ``autograd.grad`` calls on the
same graph); :func:`~pyiqa_grmp.gradreg.regularize_gradients` combines them tensor by tensor; SGD steps.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List

import torch
import torch.nn.functional as F
from pyiqa.losses import build_loss
from pyiqa.metrics import calculate_metric
from pyiqa.utils import get_root_logger
from torch import nn

from ..archs.grmp_arch import GRMPIQA, vit_features
from ..distributed import average_gradients
from ..gradreg import MODES, regularize_gradients
from ..presets import paper_settings
from .base_model import GRMPBaseModel, TrainingConfigError, merged_options

#: Defaults from the paper (``presets/paper.yml``): trainable are the text context, the last 4 blocks of both
#: encoders and the final LayerNorms of both (visual prompts stay frozen but are used, with their dropout); the
#: official gradient rule at lambda 5; the official schedule: lr x0.3 after 6 evaluations (30 epochs) without a
#: new best, not before iteration 10, stop once lr < 5e-7.
_PAPER_TRAIN = paper_settings('finetune')['train']
DEFAULT_TRAINABLE = _PAPER_TRAIN['trainable']
DEFAULT_GRAD_REG = _PAPER_TRAIN['grad_reg']
DEFAULT_LR_PLATEAU = _PAPER_TRAIN['lr_plateau']


class SceneTeacher(nn.Module):
    """The frozen zero-shot teacher: the initial CLIP image tower, no prompts, against the nine scene prompts.

    Built from the student's weights as loaded, before any fine-tuning step (official: plain OpenAI CLIP; the
    same weights whenever fine-tuning starts from a meta-pretrained checkpoint, whose CLIP is frozen). It lives
    outside the student, so it is never saved in checkpoints.
    """

    def __init__(self, student: GRMPIQA) -> None:
        super().__init__()
        self.visual = copy.deepcopy(student.clip.visual).requires_grad_(False).eval()
        with torch.no_grad():
            embeddings = student.clip.token_embedding(student.scene_token_ids)
            text = student._encode_text_embeddings(embeddings, student.scene_token_ids)
        self.register_buffer('scene_text', text.detach().clone())
        self.register_buffer('logit_scale', student.clip.logit_scale.detach().exp().clone())

    def train(self, mode: bool = True) -> 'SceneTeacher':
        return super().train(False)  # always frozen, dropout-free

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = F.normalize(vit_features(self.visual, pixels.to(self.scene_text.dtype)), dim=-1)
        return self.logit_scale * features @ self.scene_text.t()


class GRMPFinetuneModel(GRMPBaseModel):
    """pyiqa model for GRMP-IQA few-shot fine-tuning (``model_type: GRMPFinetuneModel``).

    YAML (under ``train``): ``trainable: {last_blocks, names}``, ``grad_reg: {lam, mode, temperature}``,
    ``lr_plateau: {factor, patience, min_iter, min_lr}``, ``amp: null | bf16 | fp16``, the usual ``optim``
    (SGD lr 1e-3, weight decay 1e-4 in the paper configs) and an optional pyiqa ``scheduler``. Under ``val``,
    ``select_by`` lists the metrics whose sum picks ``net_best.pth`` (default ``[key_metric]``; the official
    code uses ``[srcc, plcc]``).
    """

    def __init__(self, opt: dict) -> None:
        train_opt = opt.get('train') or {}
        self.trainable_opt = merged_options(DEFAULT_TRAINABLE, train_opt.get('trainable'), 'trainable')
        self.grad_reg = merged_options(DEFAULT_GRAD_REG, train_opt.get('grad_reg'), 'grad_reg')
        self.lr_plateau = merged_options(DEFAULT_LR_PLATEAU, train_opt.get('lr_plateau'), 'lr_plateau')
        self.amp = train_opt.get('amp')
        if self.grad_reg['mode'] not in MODES:
            raise TrainingConfigError(f'train.grad_reg.mode must be one of {MODES}, got {self.grad_reg["mode"]!r}')
        if self.amp not in (None, 'bf16', 'fp16'):
            raise TrainingConfigError(f'train.amp must be null, bf16 or fp16, got {self.amp!r}')
        super().__init__(opt)

    # ----------------------------------------------------------------------------------------- set-up
    def init_training_settings(self) -> None:
        self.broadcast_initial_weights()  # before the teacher is built from them
        net = self.get_bare_model(self.net)
        self.trainable_params = self._set_trainable(net)
        net.train()
        self.teacher = SceneTeacher(net).to(self.device)
        self.cri_quality = self.build_quality_loss()
        self.cri_scene = build_loss({'type': 'GRMPSceneLoss', 'temperature': self.grad_reg['temperature']})
        self.setup_optimizers()
        self.setup_schedulers()
        use_scaler = self.amp == 'fp16'
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.plateau_state = {'bad_evals': 0, 'stopped': False, 'validated_since_stop': False}

    def _set_trainable(self, net: GRMPIQA) -> List[nn.Parameter]:
        last = int(self.trainable_opt['last_blocks'])
        visual_depth = len(net.clip.visual.transformer.resblocks)
        text_depth = len(net.clip.transformer.resblocks)
        prefixes = list(self.trainable_opt['names'] or [])
        prefixes += [f'clip.visual.transformer.resblocks.{i}.' for i in range(max(0, visual_depth - last),
                                                                               visual_depth)]
        prefixes += [f'clip.transformer.resblocks.{i}.' for i in range(max(0, text_depth - last), text_depth)]
        names = [n for n, _ in net.named_parameters()]
        unmatched = [p for p in self.trainable_opt['names'] or [] if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise TrainingConfigError(f'train.trainable.names {unmatched} match no parameter of the network')
        trainable = []
        for name, param in net.named_parameters():
            param.requires_grad_(any(name.startswith(p) for p in prefixes))
            if param.requires_grad:
                trainable.append(param)
        if not trainable:
            raise TrainingConfigError('train.trainable selects no parameter')
        count = sum(p.numel() for p in trainable)
        get_root_logger().info(f'GRMP fine-tuning: {len(trainable)} trainable tensors, {count:,} parameters')
        return trainable

    # ---------------------------------------------------------------------------------------- training
    def optimize_parameters(self, current_iter: int) -> None:
        if self.plateau_state['stopped']:
            return  # finished by the plateau rule: the remaining iterations of pyiqa's loop do nothing
        net = self.get_bare_model(self.net)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            pixels = net.preprocess(self.img_input, random_crop=net.augment)
            score, scene_logits = net.score_pixels(pixels, return_scene_logits=True)
            teacher_logits = self.teacher(pixels)
        l_quality = self.cri_quality(score, self.gt_mos)
        l_scene = self.cri_scene(scene_logits, teacher_logits)
        params = self.trainable_params
        need_semantic = self.grad_reg['mode'] != 'none' and self.grad_reg['lam'] != 0
        if self.scaler is not None:
            l_quality_scaled, l_scene_scaled = self.scaler.scale(l_quality), self.scaler.scale(l_scene)
            scale = self.scaler.get_scale()
        else:
            l_quality_scaled, l_scene_scaled, scale = l_quality, l_scene, 1.0
        g_d = torch.autograd.grad(l_quality_scaled, params, retain_graph=need_semantic, allow_unused=True)
        g_g = (torch.autograd.grad(l_scene_scaled, params, allow_unused=True) if need_semantic
               else [None] * len(params))
        if self.opt.get('dist'):  # the mean over all ranks' shots, before the (non-linear) projection
            g_d, g_g = average_gradients(g_d), average_gradients(g_g)
        if self.scaler is not None:
            # fp16: unscale both before projecting. The scaler unscales g_d (held in .grad) and records overflow;
            # an overflowing g_g only gives no direction this step.
            for param, grad in zip(params, g_d):
                param.grad = grad
            self.scaler.unscale_(self.optimizer)
            g_d = [param.grad for param in params]
            g_g = [None if g is None else g / scale for g in g_g]
            if not all(g is None or bool(torch.isfinite(g).all()) for g in g_g):
                get_root_logger().warning(f'iter {current_iter}: semantic gradient overflowed in fp16; not projected')
                g_g = [None] * len(params)
        grads = regularize_gradients(g_d, g_g, lam=self.grad_reg['lam'], mode=self.grad_reg['mode'])
        for param, grad in zip(params, grads):
            param.grad = grad
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped by the scaler when g_d overflowed
            self.scaler.update()
        else:
            self.optimizer.step()

        self.output_score = score.detach().float()
        self.log_dict = self.reduce_loss_dict(OrderedDict(l_quality=l_quality.detach(), l_scene=l_scene.detach()))
        predicted = self.output_score.squeeze(1).cpu().numpy()
        labels = self.gt_mos.squeeze(1).cpu().numpy()
        for name, metric_opt in (self.opt.get('val', {}).get('metrics') or {}).items():
            self.log_dict[f'train_metrics/{name}'] = calculate_metric([predicted, labels], metric_opt)

    # -------------------------------------------------------------------------------------- validation
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        state = self.plateau_state
        if state['stopped'] and state['validated_since_stop']:
            return  # nothing changed since the last validation
        if self.validate_and_select(dataloader, current_iter, tb_logger):
            state['bad_evals'] = 0
        else:
            state['bad_evals'] += 1
            self._apply_plateau_rule(current_iter)
        if state['stopped']:
            state['validated_since_stop'] = True

    def _apply_plateau_rule(self, current_iter: int) -> None:
        rule, state = self.lr_plateau, self.plateau_state
        if state['bad_evals'] < rule['patience'] or current_iter <= rule['min_iter']:
            return
        state['bad_evals'] = 0
        for group in self.optimizer.param_groups:
            group['lr'] *= rule['factor']
        lr = max(group['lr'] for group in self.optimizer.param_groups)
        get_root_logger().info(f'iter {current_iter}: no new best in {rule["patience"]} evaluations, lr -> {lr:.3g}')
        if lr < rule['min_lr']:
            state['stopped'] = True
            get_root_logger().info(f'iter {current_iter}: lr {lr:.3g} < {rule["min_lr"]:.3g}, training finished; '
                                   'the remaining iterations of the loop are skipped')

    # ------------------------------------------------------------------------------------------ resume
    def training_finished(self) -> bool:
        return bool(self.plateau_state['stopped'])

    def validation_decisions(self) -> dict:
        return {**super().validation_decisions(), 'plateau': dict(self.plateau_state)}

    def apply_validation_decisions(self, decisions: dict) -> None:
        super().apply_validation_decisions(decisions)
        self.plateau_state.update(decisions['plateau'])

    def extra_training_state(self) -> dict:
        state = {'plateau': dict(self.plateau_state)}
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        return state

    def restore_extra_training_state(self, state: dict) -> None:
        self.plateau_state.update(state.get('plateau', {}))
        if self.scaler is not None and 'scaler' in state:
            self.scaler.load_state_dict(state['scaler'])

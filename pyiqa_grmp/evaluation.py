"""Predicting a GRMP-IQA checkpoint on a dataset split, and its correlations there: the one path by which the
protocol, adapt and the tests score a trained model outside its training loop."""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import numpy as np
import torch

from .models.base_model import predict_loader
from .stats import correlation_values
from .trusted_loading import trusted_loading


def predict_checkpoint(network_opt: dict, checkpoint: str, dataset_opt: dict, device: str = 'cpu',
                       batch_size: int = 16) -> Tuple[torch.utils.data.Dataset, Dict[str, np.ndarray]]:
    """The dataset of ``dataset_opt`` (any registered pyiqa type) and the scores ('pred') and labels ('mos', as
    the dataset hands them out) of the network ``network_opt`` with the weights of ``checkpoint`` on it, in order."""
    from pyiqa.archs import build_network
    from pyiqa.data import build_dataset

    network_opt = dict(copy.deepcopy(network_opt), pretrained=True, pretrained_model_path=checkpoint)
    with trusted_loading(network_opt):
        net = build_network(network_opt).to(device).eval()
        dataset = build_dataset(copy.deepcopy(dataset_opt))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return dataset, predict_loader(net, loader, device)


def evaluate_checkpoint(network_opt: dict, checkpoint: str, dataset_opt: dict, device: str = 'cpu',
                        batch_size: int = 16) -> Dict[str, float]:
    """SRCC, PLCC (plain Pearson, as the paper's code) and KRCC of a checkpoint on one dataset split."""
    _, result = predict_checkpoint(network_opt, checkpoint, dataset_opt, device, batch_size)
    return {**correlation_values(result['pred'], result['mos']), 'num_test': int(len(result['mos']))}

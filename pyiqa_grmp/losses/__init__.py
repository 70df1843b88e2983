"""Losses of GRMP-IQA (registered in pyiqa's LOSS_REGISTRY by ``pyiqa_grmp.registry``)."""

"""Data helpers for pyiqa_grmp: image reading (datasets come with the training issues)."""

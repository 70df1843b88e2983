"""GRMP-IQA network modules (import ``pyiqa_grmp.archs.grmp_arch`` for the arch itself)."""

"""pyiqa_grmp: GRMP-IQA (few-shot IQA by adapting CLIP, ICCV 2025) as a pyiqa plugin.

Importing the package registers its types with pyiqa and does nothing else (no downloads, no environment
changes); afterwards ``pyiqa.create_metric('grmp_iqa')`` works like any built-in metric.
"""
from .gradreg import regularize_gradients
from .registry import register_all

__version__ = '0.1.0'

register_all()

__all__ = ['__version__', 'compare', 'register_all', 'regularize_gradients']


def __getattr__(name: str):
    """``pyiqa_grmp.compare`` is loaded on first use, so that importing the package stays registration only."""
    if name == 'compare':
        from .comparison import compare

        return compare
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

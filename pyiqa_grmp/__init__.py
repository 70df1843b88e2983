"""pyiqa_grmp: GRMP-IQA (few-shot IQA by adapting CLIP, ICCV 2025) as a pyiqa plugin.

Importing the package registers its types with pyiqa and does nothing else (no downloads, no environment
changes); afterwards ``pyiqa.create_metric('grmp_iqa')`` works like any built-in metric.

The Python API has the command line's power, names and defaults, and is loaded on first use:
``score`` (images -> DataFrame, or shards -> parquet files), ``merge`` (those files -> DataFrame), ``compare``
(metrics on labelled images), ``adapt`` (fine-tune on your labelled images, with a report), ``train`` (from a
training YAML or dict), ``run_protocol`` (the paper's protocol) and ``export`` (a checkpoint as a model folder,
or as one file of the whole network).
"""
from .gradreg import regularize_gradients
from .registry import register_all

__version__ = '0.1.0'

register_all()

#: Public name -> the module that defines it, imported on first use.
_LAZY = {
    'score': 'api', 'merge': 'api',
    'compare': 'comparison',
    'adapt': 'adaptation', 'AdaptResult': 'adaptation',
    'train': 'training', 'TrainResult': 'training', 'TrainingInterrupted': 'training',
    'run_protocol': 'training', 'ProtocolResult': 'training',
    'InvalidArgument': 'errors',
    'export': 'model_folder',
}

__all__ = ['__version__', 'register_all', 'regularize_gradients', *_LAZY]


def __getattr__(name: str):
    """The API functions are loaded on first use, so that importing the package stays registration only."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""Data: datasets by name, evaluation preprocessing, SSL augmentations, exact batches.

>>> from qscore_jax.data import eval_batches
>>> batches = eval_batches('synthetic_shapes', 'test', batch_size=64)
>>> for batch in batches:   # image (b, 64, 64, 3) float32, label, id, mask
...   ...

The names of ``__all__`` and the submodules are loaded on first use (PEP 562),
so ``import qscore_jax`` and ``import qscore_jax.data`` import no TensorFlow,
and neither do the plain data (:class:`Preprocessing`, :class:`DatasetError`,
the recipes :class:`Recipe`, :class:`ViewSpec`, :func:`recipe`). TensorFlow
(tf.data, tensorflow-datasets) is imported by the first name that reads or
transforms data (``eval_batches``, ``dataset_info``, ...), always through
``_tensorflow.py``: quietly, and never seeing a GPU/TPU.
"""

import importlib

# name -> the submodule defining it; imported by the first access.
_EXPORTS = {
    'BUILT_IN': 'datasets',
    'Batches': 'pipeline',
    'DatasetError': 'errors',
    'DatasetInfo': 'datasets',
    'Preprocessing': 'preprocessing',
    'Recipe': 'augment',
    'ViewSpec': 'augment',
    'dataset_info': 'datasets',
    'decode_image': 'datasets',
    'ensure_prepared': 'datasets',
    'eval_batches': 'pipeline',
    'imagenet100_wnids': 'imagenet100',
    'iterate_global': 'pipeline',
    'native_preprocessing': 'preprocess',
    'prepare': 'datasets',
    'read_split': 'datasets',
    'recipe': 'augment',
    'shard_bounds': 'pipeline',
    'split_attributes': 'datasets',
    'split_size': 'datasets',
    'ssl_batches': 'pipeline',
}
# Submodules, reachable as attributes (``qscore_jax.data.salient``) without an import.
_SUBMODULES = ('augment', 'datasets', 'digits', 'errors', 'folder', 'imagenet100', 'pipeline',
               'preprocess', 'preprocessing', 'salient', 'synthetic')

__all__ = ['BUILT_IN', 'Batches', 'DatasetError', 'DatasetInfo', 'Preprocessing', 'Recipe',
           'ViewSpec', 'dataset_info', 'decode_image', 'ensure_prepared', 'eval_batches',
           'imagenet100_wnids', 'iterate_global', 'native_preprocessing', 'prepare', 'read_split',
           'recipe', 'shard_bounds', 'split_attributes', 'split_size', 'ssl_batches']


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f'{__name__}.{name}')
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value  # later accesses skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))

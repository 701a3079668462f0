"""Data: datasets by name, evaluation preprocessing, SSL augmentations, exact batches.

>>> from qscore_jax.data import eval_batches
>>> batches = eval_batches('synthetic_shapes', 'test', batch_size=64)
>>> for batch in batches:   # image (b, 64, 64, 3) float32, label, id, mask
...   ...

TensorFlow (tf.data, tensorflow-datasets) is imported with this package, never
by ``import qscore_jax``, and never sees a GPU/TPU (see ``_tensorflow.py``).
"""

from qscore_jax.data import _tensorflow  # first: quiet import, accelerators hidden

# pylint: disable=wrong-import-position

from qscore_jax.data.augment import Recipe, ViewSpec, recipe
from qscore_jax.data.datasets import (BUILT_IN, DatasetError, DatasetInfo, dataset_info,
                                      decode_image, ensure_prepared, prepare, read_split,
                                      split_size)
from qscore_jax.data.imagenet100 import imagenet100_wnids
from qscore_jax.data.preprocess import native_preprocessing
from qscore_jax.data.pipeline import (Batches, eval_batches, iterate_global, shard_bounds,
                                      ssl_batches)

__all__ = ['BUILT_IN', 'Batches', 'DatasetError', 'DatasetInfo', 'Recipe', 'ViewSpec',
           'dataset_info', 'decode_image', 'ensure_prepared', 'eval_batches',
           'imagenet100_wnids', 'iterate_global', 'native_preprocessing', 'prepare', 'read_split', 'recipe',
           'shard_bounds', 'split_size', 'ssl_batches']

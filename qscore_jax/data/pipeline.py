"""Exact, multi-host batches for evaluation and SSL training.

Evaluation (:func:`eval_batches`): process ``p`` of ``P`` reads examples
``[floor(p N / P), floor((p + 1) N / P))`` of the split in canonical order, so
the processes together read every example exactly once. Every process yields
the same number of batches, ``ceil(max shard / local batch)``; the missing
rows are padding with ``mask = False``, ``id = -1`` and ``label = -1``.
Each row carries ``id``, its index in the split, so results written by any
number of processes line up.

Training (:func:`ssl_batches`): each process shuffles its own shard, epoch by
epoch, with a seed derived from ``(seed, epoch, process)``, and yields
``batches_per_epoch`` full batches (the same on every process); the views of
an example are a pure function of ``(seed, epoch, id)`` (see
:mod:`qscore_jax.data.augment`). ``start_step`` resumes the exact stream.

Batches are dicts of numpy arrays whose first dimension is the process's share
of the global batch; :func:`qscore_jax.parallel.global_batch` lays them out on
a device mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax

from qscore_jax import parallel
from qscore_jax.data import augment as augment_lib
from qscore_jax.data import datasets
from qscore_jax.data._tensorflow import tf
from qscore_jax.data.preprocess import eval_transform, mask_transform
from qscore_jax.data.preprocessing import Preprocessing


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous example range ``[start, end)`` of one process.

  Args:
    num_examples: N, examples in the split.
    process_index: the process, in ``0..process_count-1``.
    process_count: number of processes.
  Returns:
    ``(floor(p N / P), floor((p + 1) N / P))``.
  """
  return (num_examples * process_index // process_count,
          num_examples * (process_index + 1) // process_count)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Who reads what: this process's shard of the split and its batch size."""
  info: datasets.DatasetInfo
  size: int
  process_index: int
  process_count: int
  local: int
  start: int
  end: int
  shard_sizes: tuple[int, ...]


def _plan(dataset, split, batch_size, data_dir, process_index, process_count,
          local_device_count) -> _Plan:
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index() if process_count == jax.process_count() else 0
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside 0..{process_count - 1}.')
  local = parallel.check_batch_divisible(
      batch_size, process_count=process_count,
      local_device_count=jax.local_device_count() if local_device_count is None
      else local_device_count)
  info = datasets.dataset_info(dataset, data_dir)
  size = datasets.split_size(dataset, split, data_dir)
  bounds = [shard_bounds(size, p, process_count) for p in range(process_count)]
  start, end = bounds[process_index]
  return _Plan(info, size, process_index, process_count, local, start, end,
               tuple(b - a for a, b in bounds))


@dataclasses.dataclass
class Batches:
  """An iterable of per-process batches with known length.

  Attributes:
    dataset: the underlying ``tf.data.Dataset`` of batches (iterated as NumPy).
    num_batches: batches every process yields (per epoch for training).
    local_batch_size: rows of each batch on this process.
    num_examples: real (unpadded) examples this process reads per pass.
    split_size: examples in the whole split.
    info: the dataset's :class:`~qscore_jax.data.datasets.DatasetInfo`.
  """
  dataset: Any
  num_batches: int
  local_batch_size: int
  num_examples: int
  split_size: int
  info: datasets.DatasetInfo

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self.dataset.as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_batches


def eval_batches(dataset: str, split: str, *, batch_size: int,
                 preprocessing: Preprocessing | None = None, image_size: int | None = None,
                 data_dir: str | None = None, with_masks: bool = False,
                 process_index: int | None = None, process_count: int | None = None,
                 local_device_count: int | None = None, skip_batches: int = 0) -> Batches:
  """Padded, masked, id-carrying evaluation batches of one split.

  Args:
    dataset: a dataset name (see :mod:`qscore_jax.data.datasets`).
    split: e.g. ``'train'``, ``'test'``, ``'validation'``.
    batch_size: the *global* batch size, divisible by the number of devices.
    preprocessing: the model's preprocessing metadata (resize, crop,
      interpolation, mean/std); ``None`` scales a fixed-size dataset to [0, 1].
    image_size: overrides ``preprocessing.image_size``.
    data_dir: tfds data directory (default: ``$QSCORE_JAX_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    with_masks: add ``core_mask``/``spurious_mask`` (float32, S x S, in [0, 1]).
    process_index, process_count, local_device_count: default to JAX's.
    skip_batches: start after this many batches (resuming; every process must
      skip the same number). Skipped examples are not read.

  Returns:
    :class:`Batches` of dicts: ``image`` float32 (b, S, S, 3), ``label``
    int32, ``id`` int64, ``mask`` bool (False on padding rows), masks if asked.
  """
  plan = _plan(dataset, split, batch_size, data_dir, process_index, process_count,
               local_device_count)
  info, size, start, end, local = plan.info, plan.size, plan.start, plan.end, plan.local
  total_batches = max(1, math.ceil(max(plan.shard_sizes) / local))
  if not 0 <= skip_batches <= total_batches:
    raise ValueError(f'skip_batches {skip_batches} is outside 0..{total_batches}.')
  num_batches = total_batches - skip_batches
  start = min(end, start + skip_batches * local)

  image_shape = _output_image_shape(info, preprocessing, image_size)
  transform = eval_transform(preprocessing, image_size=image_size)
  masks = mask_transform(preprocessing, image_size=image_size) if with_masks else None

  def convert(example):
    out = {'image': transform(example['image']), 'label': tf.cast(example['label'], tf.int32),
           'id': example['id'], 'mask': tf.constant(True)}
    if masks is not None:
      for name in datasets.MASK_FEATURES:
        out[name] = masks(example[name])
    return out

  ds = datasets.read_split(dataset, split, data_dir=data_dir, start=start, end=end,
                           with_masks=with_masks)
  ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if num_batches == 0:
    ds = ds.take(0)
  pad = num_batches * local - (end - start)
  if pad:
    blank = {'image': tf.zeros(image_shape, tf.float32), 'label': tf.constant(-1, tf.int32),
             'id': tf.constant(-1, tf.int64), 'mask': tf.constant(False)}
    if masks is not None:
      for name in datasets.MASK_FEATURES:
        blank[name] = tf.zeros(image_shape[:2], tf.float32)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return Batches(ds, num_batches, local, end - start, size, info)


def _output_image_shape(info, preprocessing, image_size):
  if preprocessing is not None:
    size = image_size or preprocessing.image_size
    return (size, size, 3)
  height, width, channels = info.image_shape
  if height is None or width is None:
    raise datasets.DatasetError(
        f'{info.name} has images of varying size: give the model\'s preprocessing '
        '(e.g. get_model_spec(id).preprocessing) so they are resized to one size.')
  return (height, width, 3 if channels in (1, 3) else channels)


def ssl_batches(dataset: str, split: str = 'train', *, recipe: str | augment_lib.Recipe,
                batch_size: int, seed: int = 0, preprocessing: Preprocessing | None = None,
                image_size: int | None = None, data_dir: str | None = None,
                start_step: int = 0, epochs: int | None = None, shuffle_buffer: int = 10_000,
                process_index: int | None = None, process_count: int | None = None,
                local_device_count: int | None = None) -> Batches:
  """Multi-view SSL training batches, deterministic for ``seed`` and step.

  Args:
    dataset: a dataset name (see :mod:`qscore_jax.data.datasets`).
    split: the split to train on (default ``'train'``).
    recipe: a method name (``'simclr'``, ``'byol'``, ``'dino'``, ...) or a
      :class:`qscore_jax.data.augment.Recipe`; ``image_size`` sets its crop size
      (default: ``preprocessing.image_size`` or the dataset's image size).
    batch_size: the global batch size.
    seed: the only source of randomness (shuffling and augmentation).
    preprocessing: its mean/std normalise every view (crop and resize come
      from the recipe).
    image_size: crop size of a recipe given by name (see ``recipe``).
    data_dir: tfds data directory (default: ``$QSCORE_JAX_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    start_step: skip this many batches (resuming), cheaply: nothing is
      decoded or augmented for the skipped examples.
    epochs: passes over the data; ``None`` repeats forever.
    shuffle_buffer: size of each process's shuffle buffer (default 10000).
    process_index, process_count, local_device_count: default to JAX's.

  Returns:
    :class:`Batches` (``num_batches`` per epoch) of dicts: ``views`` a tuple
    of float32 (b, s_v, s_v, 3), ``label`` int32, ``id`` int64, ``epoch``.
  """
  plan = _plan(dataset, split, batch_size, data_dir, process_index, process_count,
               local_device_count)
  info, size, start, end, local = plan.info, plan.size, plan.start, plan.end, plan.local
  per_epoch = min(plan.shard_sizes) // local
  if per_epoch == 0:
    raise ValueError(f'{dataset}/{split} has {size} examples: too few for one batch of '
                     f'{batch_size} on {plan.process_count} process(es).')
  if isinstance(recipe, str):
    default_size = image_size or (preprocessing.image_size if preprocessing else None) or \
        info.image_shape[0]
    if default_size is None:
      raise ValueError('give image_size: the dataset has images of varying size.')
    recipe = augment_lib.recipe(recipe, image_size=default_size)
  mean = None if preprocessing is None or preprocessing.mean is None else tf.constant(
      preprocessing.mean, tf.float32)
  std = None if mean is None else tf.constant(preprocessing.std, tf.float32)

  raw = datasets.read_split(dataset, split, data_dir=data_dir, start=start, end=end,
                            decode=False)
  shard_seed = (seed * 1_000_003 + plan.process_index) % (2 ** 31)

  def epoch_stream(epoch):
    shuffled = raw.shuffle(shuffle_buffer, seed=tf.cast(shard_seed, tf.int64) * 1_000_003 + epoch,
                           reshuffle_each_iteration=False)
    return shuffled.take(per_epoch * local).map(lambda ex: {**ex, 'epoch': epoch})

  epoch_ids = tf.data.Dataset.range(epochs) if epochs is not None else \
      tf.data.Dataset.range(2 ** 62)
  stream = epoch_ids.flat_map(epoch_stream).skip(start_step * local)

  def views(example):
    image = datasets.decode_image(example['image'])
    out = augment_lib.augment_views(image, recipe, augment_lib.example_seed(
        seed, example['epoch'], example['id']))
    if mean is not None:
      out = tuple((v - mean) / std for v in out)
    return {'views': out, 'label': tf.cast(example['label'], tf.int32), 'id': example['id'],
            'epoch': example['epoch']}

  ds = stream.map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return Batches(ds, per_epoch, local, per_epoch * local, size, info)


def iterate_global(batches: Batches, mesh=None) -> Iterator[dict[str, Any]]:
  """The batches as global ``jax.Array``s on a data mesh (all processes together).

  Args:
    batches: per-process :class:`Batches` (every process iterates them).
    mesh: the device mesh (default: every device of every process on ``'data'``).
  """
  for batch in batches:
    yield parallel.global_batch(batch, mesh)


__all__ = ['Batches', 'eval_batches', 'iterate_global', 'shard_bounds', 'ssl_batches']

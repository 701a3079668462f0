"""Datasets by name: one naming scheme for the CLI, configs and the Python API.

==========================  ==================================================
name                        what it is
==========================  ==================================================
``synthetic_shapes[/cfg]``  built-in, generated offline; core + spurious masks
``sklearn_digits[/cfg]``    built-in real images from scikit-learn
``imagenet2012``            tfds, prepared from the manual download
``imagenet100``             the CMC/solo-learn subset, prepared from imagenet2012
``salient_imagenet``        imagenet2012 train images with Salient ImageNet masks
``cifar10``, ``stl10``, …   any other tensorflow-datasets name (``name/config``)
``folder:/path``            a folder of images, one sub-folder per class
==========================  ==================================================

:func:`built_in_configs` lists every config of the built-in datasets (``qscore
datasets`` prints them below this table). :func:`read_split` yields, in canonical
order, dicts with ``image`` (uint8, H x W x 3), ``label`` (int64), ``id`` (int64:
the index of the example in its split) and the dataset's masks where it has them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import os
import pathlib
import re
from typing import Any

from etils import epath
import numpy as np

from qscore_jax._text import did_you_mean
from qscore_jax.data._tensorflow import tf  # before tfds: TF imported quietly, off accelerators

# pylint: disable=wrong-import-order
import tensorflow_datasets as tfds

# Registered with tfds by their import: the built-in builders.
from qscore_jax.data import digits, imagenet100, salient, synthetic  # pylint: disable=unused-import
from qscore_jax.data.errors import DatasetError, manual_download_error
from qscore_jax.data.folder import FolderError, scan_image_folder

BUILT_IN = ('synthetic_shapes', 'sklearn_digits', 'imagenet100', 'salient_imagenet')
# Generated locally: prepared automatically on first use (no network).
GENERATED = ('synthetic_shapes', 'sklearn_digits')
FOLDER_PREFIX = 'folder:'
MASK_FEATURES = ('core_mask', 'spurious_mask')
# Per-example ground truth of synthetic_shapes: the source of a probe's error and its difficulty.
DIFFICULTY_FEATURES = ('misleading', 'object_area', 'occlusion', 'contrast')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset holds: classes and split sizes.

  Attributes:
    name: the dataset name it was asked for.
    class_names: one name per label (empty when the dataset has no labels).
    splits: ``{split: number of examples}``.
    features: the names of the features of an example (``image``, ``label``,
      masks, ...).
    image_shape: ``(H, W, C)``; H and W are None for images of varying size.
    version: what identifies the data's content: the tfds version (``'1.0.0'``), or
      for a folder a hash of its files' names, classes and sizes. Stores record it,
      so a store of an earlier version of the data is not reused.
  """
  name: str
  class_names: tuple[str, ...]
  splits: dict[str, int]
  features: tuple[str, ...]
  image_shape: tuple[int | None, int | None, int]
  version: str | None = None

  @property
  def num_classes(self) -> int:
    """Number of classes (of class names)."""
    return len(self.class_names)

  @property
  def has_masks(self) -> bool:
    """Whether examples carry ``core_mask`` and ``spurious_mask``."""
    return all(f in self.features for f in MASK_FEATURES)


def is_folder(name: str) -> bool:
  """Whether the dataset ``name`` is an image folder (``folder:/path``).

  Args:
    name: a dataset name.
  """
  return name.startswith(FOLDER_PREFIX)


def default_data_dir() -> str | None:
  """``$QSCORE_JAX_DATA_DIR``, else tfds's default (``~/tensorflow_datasets``)."""
  return os.environ.get('QSCORE_JAX_DATA_DIR')


def _split_config(name: str) -> tuple[str, str | None]:
  """``'base/config:version'`` -> ``('base', 'config')``; ``(base, None)`` without a config
  or with tfds keyword arguments (``base/k=v``, which tfds checks itself)."""
  base, sep, rest = name.partition('/')
  config = rest.split('/')[0].split(':')[0] if sep else None
  if config is not None and '=' in config:
    config = None
  if not sep:
    base = re.sub(r':[0-9.*]+$', '', base)  # a version (name:1.0.0), not a namespace
  return base, config


def _builder_class(base: str):
  """The registered tfds builder class ``base``, or None when there is none."""
  try:
    return tfds.builder_cls(base)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):
    return None


def _config_names(builder_class) -> list[str]:
  return [config.name for config in getattr(builder_class, 'BUILDER_CONFIGS', None) or ()]


def _default_config(builder_class) -> str | None:
  """The config a plain name means (tfds: DEFAULT_BUILDER_CONFIG_NAME, else the first)."""
  names = _config_names(builder_class)
  return getattr(builder_class, 'DEFAULT_BUILDER_CONFIG_NAME', None) or (names[0] if names
                                                                         else None)


def _closest_full_name(base: str, config: str) -> str:
  """``base/c`` for the config ``c`` of ``base`` closest to ``config``, else ``base``."""
  match = difflib.get_close_matches(config, _config_names(_builder_class(base)), n=1)
  return f'{base}/{match[0]}' if match else base


def _unknown_name_error(name: str) -> DatasetError:
  base, config = _split_config(name)
  known = dict.fromkeys(list(BUILT_IN) + list(tfds.list_builders()))  # unique, in order
  close = difflib.get_close_matches(base, list(known), n=3)
  if config is not None:  # a typo of the dataset with a config: full names where one fits
    close = [_closest_full_name(b, config) for b in close]
  hint = did_you_mean(base if config is None else name, dict.fromkeys(close))
  return DatasetError(
      f'Unknown dataset {name!r}.{hint} Use a built-in one ({", ".join(BUILT_IN)}; `qscore '
      'datasets` lists their configs), any tensorflow-datasets name (tfds.list_builders()), or '
      'folder:/path/to/images.')


def _unknown_config_error(name: str, base: str, config: str, builder_class) -> DatasetError:
  configs = _config_names(builder_class)
  if not configs:
    return DatasetError(f'Unknown config {config!r} in {name!r}: {base} has no configs; use '
                        f'plain {base!r}.')
  hint = did_you_mean(f'{base}/{config}', [f'{base}/{c}' for c in configs])
  return DatasetError(f'Unknown config {config!r} in {name!r}.{hint} The configs of {base} '
                      f'are: {", ".join(configs)} (plain {base!r} is '
                      f'{base}/{_default_config(builder_class)}).')


def builder(name: str, data_dir: str | None = None):
  """The tfds builder of a dataset name (not for ``folder:`` datasets).

  Args:
    name: a tfds or built-in dataset name (``name/config`` allowed).
    data_dir: tfds data directory (default :func:`default_data_dir`).
  Returns:
    The ``tfds.core.DatasetBuilder`` (not necessarily prepared).
  Raises:
    DatasetError: unknown name (with close matches) or config (with every config
      of that dataset and the closest ones).
  """
  base, config = _split_config(name)
  # Namespaced community datasets (ns:name) are left to tfds: their classes are not local.
  builder_class = _builder_class(base) if config is not None and ':' not in base else None
  if builder_class is not None and config not in _config_names(builder_class):
    raise _unknown_config_error(name, base, config, builder_class)
  try:
    return tfds.builder(name, data_dir=data_dir or default_data_dir())
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_name_error(name) from None
  except ValueError as error:  # e.g. a bad version or keyword argument
    raise DatasetError(f'{name!r}: {error}') from None


def _summary(builder_class) -> str:
  return (builder_class.__doc__ or builder_class.name).strip().splitlines()[0]


def built_in_configs() -> list[tuple[str, str]]:
  """Every built-in dataset and config, with one line saying what it is.

  Returns:
    ``[(name, description)]``: for a dataset with configs one row per config,
    named ``dataset/config`` (the default one, which the plain name means, says
    so); for one without, one row with its plain name.
  """
  rows = []
  for base in BUILT_IN:
    builder_class = tfds.builder_cls(base)
    configs = getattr(builder_class, 'BUILDER_CONFIGS', None) or ()
    if not configs:
      rows.append((base, _summary(builder_class)))
    for config in configs:
      rows.append((f'{base}/{config.name}', config.description
                   + (f' Plain {base!r} is this one.'
                      if config.name == _default_config(builder_class) else '')))
  return rows


def listing() -> str:
  """What ``qscore datasets`` prints without a name: the naming scheme, then every built-in
  dataset (what it is) with each of its configs.

  Returns:
    Multi-line text (no trailing newline).
  """
  table = __doc__.split('\n\n', 1)[1].split('\n\n:func:')[0]
  rows = built_in_configs()
  width = max(len(name) for name, _ in rows)
  lines = [table, '', 'Built-in datasets and their configs (give the full name, e.g. '
           '--dataset synthetic_shapes/small; the generated ones are prepared on first use):']
  for base in BUILT_IN:
    lines.append(f'  {base}: {_summary(tfds.builder_cls(base))}')
    lines += [f'    {name:<{width}}  {text}' for name, text in rows
              if name.split('/')[0] == base and '/' in name]
  return '\n'.join(lines)


def dataset_info(name: str, data_dir: str | None = None, *, prepare: bool = True) -> DatasetInfo:
  """Classes, split sizes and features of a dataset (preparing generated ones).

  Args:
    name: a dataset name (module docstring).
    data_dir: tfds data directory (default :func:`default_data_dir`).
    prepare: prepare the dataset when needed (:func:`ensure_prepared`, default
      True); False only reads the builder's metadata.
  """
  if is_folder(name):
    folder = _scan_folder(name[len(FOLDER_PREFIX):])
    return DatasetInfo(name, folder.class_names, {s: len(v) for s, v in folder.splits.items()},
                       ('image', 'label'), (None, None, 3),
                       _folder_version(name[len(FOLDER_PREFIX):]))
  b = ensure_prepared(name, data_dir) if prepare else builder(name, data_dir)
  label = b.info.features['label'] if 'label' in b.info.features else None
  names = tuple(label.names) if label is not None else ()
  splits = {split: info.num_examples for split, info in b.info.splits.items()}
  image = b.info.features['image'] if 'image' in b.info.features else None
  shape = tuple(image.shape) if image is not None else (None, None, 3)
  return DatasetInfo(name, names, splits, tuple(b.info.features.keys()), shape,
                     str(b.info.version))


@functools.lru_cache(maxsize=16)
def _folder_version(path: str) -> str:
  """``sha256:`` of every split's files (path relative to the root, label, size); once per
  folder and process, like the scan it hashes."""
  folder = _scan_folder(path)
  digest = hashlib.sha256()
  for split, items in sorted(folder.splits.items()):
    for path, label in items:
      path = pathlib.Path(path)
      digest.update(f'{split}\0{path.relative_to(folder.root)}\0{label}\0'
                    f'{path.stat().st_size}\n'.encode())
  return 'sha256:' + digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _scan_folder(path: str):
  try:
    return scan_image_folder(path)
  except FolderError as error:
    raise DatasetError(str(error)) from None


def ensure_prepared(name: str, data_dir: str | None = None, *, download: bool = True):
  """The builder of ``name``, prepared: generated datasets are built on the spot,
  downloadable ones downloaded (``download=True``), manual ones explained.

  Args:
    name: a tfds or built-in dataset name.
    data_dir: tfds data directory (default :func:`default_data_dir`).
    download: download a downloadable dataset that is not prepared (default
      True); otherwise raise.
  Raises:
    DatasetError: with what to run, for datasets that need a manual step.
  """
  b = builder(name, data_dir)
  if b.is_prepared():
    return b
  base = name.split('/')[0]
  if base in GENERATED:
    b.download_and_prepare()
    return b
  if base == 'imagenet100':
    source = builder('imagenet2012', data_dir)
    if not source.is_prepared():
      raise manual_download_error('imagenet2012', source, needed_by='imagenet100')
    raise DatasetError(f'imagenet100 is not prepared in {b.data_dir_root}; imagenet2012 is. Run '
                       f'`qscore prepare imagenet100 --data-dir {b.data_dir_root}` (copies the '
                       '100 classes once).')
  if base == 'salient_imagenet':
    raise DatasetError('salient_imagenet is not prepared: run `qscore prepare salient_imagenet '
                       '--salient-dir DIR --annotations CSV` (see qscore_jax.data.salient).')
  if getattr(b, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    raise manual_download_error(base, b)
  if not download:
    raise DatasetError(f'{name} is not prepared in {b.data_dir_root} and downloads are off.')
  b.download_and_prepare()
  return b


def prepare(name: str, data_dir: str | None = None, **kwargs: Any):
  """Prepares a dataset (the ``qscore prepare`` command).

  Args:
    name: a dataset name; ``folder:`` datasets are only scanned.
    data_dir: tfds data directory (default :func:`default_data_dir`).
    **kwargs: for ``salient_imagenet`` only, the arguments of
      :func:`qscore_jax.data.salient.prepare` (``salient_dir``, ``annotations``,
      ``imagenet_train_dir``).
  Returns:
    The prepared builder (the scanned folder for ``folder:``).
  """
  if is_folder(name):
    return _scan_folder(name[len(FOLDER_PREFIX):])
  b = builder(name, data_dir)
  base = name.split('/')[0]
  if base == 'salient_imagenet':
    return salient.prepare(data_dir=b.data_dir_root, **kwargs)
  if base == 'imagenet100':
    source = builder('imagenet2012', data_dir)
    if not source.is_prepared():
      raise manual_download_error('imagenet2012', source, needed_by='imagenet100')
  elif getattr(b, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) and not b.is_prepared():
    manual = epath.Path(b.data_dir_root) / 'downloads' / 'manual'  # gs:// too
    if not manual.is_dir() or not any(manual.iterdir()):
      raise manual_download_error(base, b)
  b.download_and_prepare()
  return b


def split_size(name: str, split: str, data_dir: str | None = None) -> int:
  """Number of examples of a split.

  Args:
    name: a dataset name.
    split: e.g. ``'train'``.
    data_dir: tfds data directory (default :func:`default_data_dir`).
  Raises:
    DatasetError: the dataset has no such split.
  """
  info = dataset_info(name, data_dir)
  if not info.splits and not is_folder(name):
    # Split sizes unknown to the metadata (tfds mocks): ask the dataset itself.
    cardinality = int(builder(name, data_dir).as_dataset(split=split).cardinality())
    if cardinality >= 0:
      return cardinality
  if split not in info.splits:
    raise DatasetError(f'{name} has no split {split!r}; its splits are {sorted(info.splits)}.')
  return info.splits[split]


def decode_image(encoded):
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 (H, W, 3).

  Args:
    encoded: a scalar ``tf.string`` tensor (usable inside ``tf.data`` maps).
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def read_split(name: str, split: str, *, data_dir: str | None = None, start: int = 0,
               end: int | None = None, with_masks: bool = False, decode: bool = True):
  """Examples ``start:end`` of a split, in canonical order, as a ``tf.data.Dataset``.

  Each element: ``image`` uint8 (H, W, 3) (encoded bytes with ``decode=False``;
  decode them with :func:`decode_image`), ``label`` int64, ``id`` int64 (index
  in the split) and, with ``with_masks``, ``core_mask``/``spurious_mask``
  uint8 (H, W, 1) in 0..255.

  Args:
    name: a dataset name.
    split: e.g. ``'train'``.
    data_dir: tfds data directory (default :func:`default_data_dir`).
    start: first example (default 0).
    end: one past the last example (default: the split size).
    with_masks: add the core/spurious masks (datasets with masks only).
    decode: decode the images (default True).
  """
  size = split_size(name, split, data_dir)
  end = size if end is None else end
  if not 0 <= start <= end <= size:
    raise DatasetError(f'examples [{start}:{end}] are outside {name}/{split} (size {size}).')
  if is_folder(name):
    folder = _scan_folder(name[len(FOLDER_PREFIX):])
    items = folder.splits[split][start:end]
    ds = tf.data.Dataset.from_tensor_slices({
        'path': tf.constant([p for p, _ in items], tf.string, shape=[len(items)]),
        'label': tf.constant([l for _, l in items], tf.int64, shape=[len(items)])})

    def load(example):
      data = tf.io.read_file(example['path'])
      return {'image': decode_image(data) if decode else data, 'label': example['label']}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    b = ensure_prepared(name, data_dir)
    features = set(b.info.features.keys())
    if with_masks and not set(MASK_FEATURES) <= features:
      raise DatasetError(f'{name} has no core/spurious masks; datasets with masks: '
                         'synthetic_shapes, salient_imagenet.')
    # One file at a time (no interleave) keeps the canonical order, so ids are
    # positions in the split whatever the number of processes.
    decoders = None if decode else {'image': tfds.decode.SkipDecoding()}
    # tfds refuses empty slices: read one example and drop it, keeping the structure.
    first, last = (start, end) if end > start else (max(0, start - 1), max(1, start))
    ds = b.as_dataset(split=f'{split}[{first}:{last}]', shuffle_files=False, decoders=decoders,
                      read_config=tfds.ReadConfig(interleave_cycle_length=1))
    if end == start:
      ds = ds.take(0)
    keep = ('image', 'label') + (MASK_FEATURES if with_masks else ())

    def select(example):
      out = {k: example[k] for k in keep}
      out['label'] = tf.cast(out['label'], tf.int64)
      if decode and out['image'].shape.rank == 3 and out['image'].shape[-1] == 1:
        out['image'] = tf.image.grayscale_to_rgb(out['image'])
      return out

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ids = tf.data.Dataset.range(start, end)
  return tf.data.Dataset.zip((ids, ds)).map(lambda i, ex: {**ex, 'id': i})


def split_attributes(name: str, split: str, keys=DIFFICULTY_FEATURES, *,
                     data_dir: str | None = None) -> dict[str, np.ndarray]:
  """Per-example scalar features of a whole split, in canonical order (row i = id i).

  Reads only the named features (images and masks are not decoded), so that results
  keyed by id (a representation store's ``ids``) can be joined with the examples'
  ground truth: for ``synthetic_shapes``, :data:`DIFFICULTY_FEATURES`.

  Args:
    name: a tfds dataset name (not a ``folder:``).
    split: e.g. ``'test'``.
    keys: the scalar features to read (default :data:`DIFFICULTY_FEATURES`).
    data_dir: tfds data directory (default :func:`default_data_dir`).
  Returns:
    ``{key: (split size,) array}``.
  Raises:
    DatasetError: a folder dataset, or a feature the dataset does not have (naming
      those it has).
  """
  if is_folder(name):
    raise DatasetError(f'{name} is an image folder: its examples carry no features besides '
                       'image and label.')
  b = ensure_prepared(name, data_dir)
  features = b.info.features
  missing = [k for k in keys if k not in features]
  if missing:
    scalars = sorted(k for k, f in features.items() if not f.shape)
    raise DatasetError(f'{name} has no feature {", ".join(missing)}; its scalar features are '
                       f'{", ".join(scalars)}. Difficulty labels are in synthetic_shapes 1.1.0 and '
                       'later (delete an older prepared copy to regenerate it).')
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if k not in keys and isinstance(f, tfds.features.Image)}
  ds = b.as_dataset(split=split, shuffle_files=False, decoders=skip,
                    read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(lambda example: {k: example[k] for k in keys})
  columns = {k: [] for k in keys}
  for batch in tfds.as_numpy(ds.batch(4096)):
    for k in keys:
      columns[k].append(batch[k])
  return {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}

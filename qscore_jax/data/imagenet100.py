"""ImageNet-100: the 100-class ImageNet subset of CMC and solo-learn, as a tfds dataset.

The WordNet ids ship with the package (``imagenet100_wnids.txt``, in CMC's
order). Labels are **0..99 in sorted WordNet-id order** — the order
torchvision's ``ImageFolder`` (and therefore solo-learn) assigns to a folder
holding these 100 classes, and the relative order of their imagenet2012
labels.

``imagenet100`` is prepared once from a prepared ``imagenet2012`` in the same
tfds data directory (``qscore prepare imagenet100``): the JPEG bytes of the
100 classes are copied as they are (no re-encoding), so every later read is an
ordinary tfds dataset with exact split sizes and stable example indices.
"""

from __future__ import annotations

import functools
import importlib.resources
import io

from qscore_jax.data._tensorflow import tf  # before tfds: TF imported quietly, off accelerators

# pylint: disable=wrong-import-order
import numpy as np
import tensorflow_datasets as tfds

from qscore_jax.data.errors import manual_download_error


@functools.cache
def imagenet100_wnids() -> tuple[str, ...]:
  """The 100 WordNet ids, sorted: position = ImageNet-100 label."""
  text = importlib.resources.files('qscore_jax.data').joinpath(
      'imagenet100_wnids.txt').read_text(encoding='utf-8')
  wnids = sorted({line.strip() for line in text.splitlines() if line.strip()})
  if len(wnids) != 100:
    raise RuntimeError(f'imagenet100_wnids.txt holds {len(wnids)} distinct ids, not 100.')
  return tuple(wnids)


def imagenet2012_label_map(imagenet_wnids: list[str]) -> np.ndarray:
  """(1000,) int64: the ImageNet-100 label of each imagenet2012 label, -1 if not kept.

  ``imagenet_wnids`` are imagenet2012's class names in label order
  (``tfds.builder('imagenet2012').info.features['label'].names``).
  """
  position = {wnid: i for i, wnid in enumerate(imagenet100_wnids())}
  missing = set(position) - set(imagenet_wnids)
  if missing:
    raise ValueError(f'{len(missing)} ImageNet-100 classes are not imagenet2012 classes: '
                     f'{sorted(missing)[:5]}')
  return np.array([position.get(wnid, -1) for wnid in imagenet_wnids], np.int64)


def filter_imagenet100(ds: tf.data.Dataset, imagenet_wnids: list[str]) -> tf.data.Dataset:
  """Keeps the examples of the 100 classes and relabels them 0..99 (sorted wnids).

  Args:
    ds: imagenet2012 examples (dicts with an int ``label``).
    imagenet_wnids: imagenet2012's class names in label order.
  """
  table = tf.constant(imagenet2012_label_map(imagenet_wnids))

  def relabel(example):
    return {**example, 'label': tf.gather(table, example['label'])}

  return ds.map(relabel).filter(lambda example: example['label'] >= 0)


def _imagenet2012_source(split: str, data_dir: str | None) -> tuple[tf.data.Dataset, list[str]]:
  """imagenet2012 examples with undecoded JPEG bytes, in canonical order."""
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  if not builder.is_prepared():
    raise manual_download_error('imagenet2012', builder, needed_by='imagenet100')
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return ds, builder.info.features['label'].names


class Imagenet100(tfds.core.GeneratorBasedBuilder):
  """The ImageNet-100 subset (CMC / solo-learn), copied from a prepared imagenet2012."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Filtered from imagenet2012 5.1.0; labels in sorted wnid order.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='ImageNet-100 (CMC, solo-learn): 100 imagenet2012 classes; labels 0..99 '
                    'in sorted WordNet-id order.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(imagenet100_wnids())),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/HobbitLong/CMC')

  def _split_generators(self, dl_manager):
    del dl_manager
    data_dir = str(self.data_dir_root)
    return {'train': self._generate_examples('train', data_dir),
            'validation': self._generate_examples('validation', data_dir)}

  def _generate_examples(self, split, data_dir):
    source, names = _imagenet2012_source(split, data_dir)
    for example in tfds.as_numpy(filter_imagenet100(source, names)):
      file_name = example['file_name'].decode()
      yield file_name, {'image': _jpeg_file(example['image']), 'label': int(example['label']),
                        'file_name': file_name}


def _jpeg_file(data: bytes):
  """Encoded bytes passed through to the tfds Image feature without re-encoding."""
  return io.BytesIO(data)

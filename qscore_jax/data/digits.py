"""Handwritten digits: real images that ship with scikit-learn, as a tfds dataset.

scikit-learn's ``load_digits`` holds 1,797 8x8 grey-level scans of
handwritten digits (UCI "Optical Recognition of Handwritten Digits", 43
writers). ``sklearn_digits`` upsamples them (bilinear) to 32x32 RGB (config
``32px``, the default; ``64px``: 64x64) so that the same backbones and
pipelines run on them: data no one here made, for checks that synthetic shapes
cannot give. The split is fixed and stratified:
every 5th example of each class (in sklearn's order) is in ``test``.
"""

from __future__ import annotations

import dataclasses

# Before tfds: TF imported quietly, off accelerators (see _tensorflow.py).
from qscore_jax.data import _tensorflow  # pylint: disable=unused-import

# pylint: disable=wrong-import-order
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def digits_arrays(image_size: int = 32):
  """All 1,797 digits as uint8 RGB (N, S, S, 3), their labels (N,), and test flags (N,).

  Args:
    image_size: S, the side the 8x8 scans are upsampled to (bilinear, default 32).
  Returns:
    ``(images, labels, is_test)``: uint8 (N, S, S, 3), int64 (N,), bool (N,).
  """
  # Here, not at the top: scikit-learn takes ~1 s to import and only preparing needs it.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  # Grey levels 0..16, ink bright: invert to dark ink on white paper like a scan.
  grey = (255 - digits.images * (255 / 16)).astype(np.uint8)
  images = np.stack([
      np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR))
      for g in grey])
  rgb = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  rank = np.zeros(len(labels), np.int64)
  for label in range(10):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  return rgb, labels, rank % 5 == 4


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """A digits configuration: tfds' ``BuilderConfig`` fields plus the image size.

  Attributes:
    image_size: side of the upsampled images (default 32).
  """
  image_size: int = 32


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, upsampled to RGB images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [DigitsConfig(name='32px', image_size=32,
                                  description='Bilinear upsampling to 32x32.'),
                     DigitsConfig(name='64px', image_size=64,
                                  description='Bilinear upsampling to 64x64.')]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # scikit-learn's order
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset')

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels, is_test = digits_arrays(self.builder_config.image_size)
    return {'train': self._generate_examples(images, labels, ~is_test),
            'test': self._generate_examples(images, labels, is_test)}

  def _generate_examples(self, images, labels, keep):
    for index in np.flatnonzero(keep):
      yield int(index), {'image': images[index], 'label': int(labels[index])}

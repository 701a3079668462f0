"""Evaluation preprocessing, driven by a model's preprocessing metadata (TensorFlow ops).

``resize_then_crop`` (torchvision): resize the shorter side to
``round(image_size / crop_fraction)`` (the longer side keeps the aspect ratio,
truncated as torchvision does), then center-crop ``image_size``.
``crop_then_resize`` (SimCLR's and BYOL's TF code): center-crop a square of
``crop_fraction`` of the shorter side, then resize to ``image_size``.
Resizing uses the metadata's interpolation with antialiasing (as PIL does for
torchvision); images already at the target size are left untouched, which is
the CIFAR-size path. Pixels become float32 in [0, 1], then ``(x - mean) / std``
when the metadata has mean and std.

Masks (core/spurious) go through the same crop and resize, bilinear, staying
in [0, 1], so they stay aligned with the image.
"""

from __future__ import annotations

from typing import Callable

from qscore_jax.data._tensorflow import tf
from qscore_jax.data.preprocessing import Preprocessing


def _center_crop(tf, image, height, width):
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - height, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - width, tf.float32) / 2.0), tf.int32)
  return image[top:top + height, left:left + width]


def _resize(tf, image, height, width, method):
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  return tf.cond(same, lambda: tf.cast(image, tf.float32),
                 lambda: tf.image.resize(image, tf.stack([height, width]), method=method,
                                         antialias=True))


def crop_and_resize(tf, image, preprocessing: Preprocessing, image_size: int, method: str):
  """The geometric part of evaluation preprocessing; float32 output, same value range.

  Args:
    tf: the TensorFlow module.
    image: (H, W, C) tensor, any numeric dtype.
    preprocessing: gives ``crop_mode`` and ``crop_fraction`` (module docstring).
    image_size: S, the output side.
    method: ``tf.image.resize`` method (e.g. ``'bicubic'``, ``'bilinear'``).
  Returns:
    float32 (S, S, C).
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  size = tf.constant(image_size, tf.int32)
  if preprocessing.crop_mode == 'resize_then_crop':
    resize_to = int(round(image_size / preprocessing.crop_fraction))
    scale = resize_to / tf.cast(short, tf.float64)
    new_h = tf.where(h == short, resize_to, tf.cast(tf.cast(h, tf.float64) * scale, tf.int32))
    new_w = tf.where(w == short, resize_to, tf.cast(tf.cast(w, tf.float64) * scale, tf.int32))
    image = _resize(tf, image, new_h, new_w, method)
    return _center_crop(tf, image, size, size)
  side = tf.cast(tf.round(preprocessing.crop_fraction * tf.cast(short, tf.float32)), tf.int32)
  image = _center_crop(tf, image, side, side)
  return _resize(tf, image, size, size, method)


def native_preprocessing(info) -> Preprocessing:
  """Preprocessing for a model trained from scratch on a fixed-size dataset.

  Images at their native size (no crop), scaled to [0, 1] and normalised with
  mean 0.5 and std 0.25 per channel. Raises for datasets of varying image size.

  Args:
    info: the dataset's :class:`~qscore_jax.data.datasets.DatasetInfo`.
  """
  size = info.image_shape[0]
  if size is None:
    raise ValueError(f'{info.name} has images of varying size: give image_size and a '
                     'preprocessing (e.g. a registry one) explicitly.')
  return Preprocessing(name=f'{info.name}-native', image_size=size, crop_fraction=1.0,
                       crop_mode='resize_then_crop', interpolation='bilinear',
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def eval_transform(preprocessing: Preprocessing | None, *, image_size: int | None = None
                   ) -> Callable:
  """A function uint8 image (H, W, 3) -> float32 network input (S, S, 3).

  Without ``preprocessing`` the image is only scaled to [0, 1] (fixed-size
  datasets). ``image_size`` overrides the metadata's size.
  """
  def transform(image):
    if preprocessing is None:
      return tf.cast(image, tf.float32) / 255.0
    size = image_size or preprocessing.image_size
    image = crop_and_resize(tf, image, preprocessing, size, preprocessing.interpolation)
    image = tf.clip_by_value(image, 0.0, 255.0) / 255.0
    image = tf.reshape(image, [size, size, 3])
    if preprocessing.mean is not None:
      image = (image - tf.constant(preprocessing.mean, tf.float32)) / tf.constant(
          preprocessing.std, tf.float32)
    return image

  return transform


def mask_transform(preprocessing: Preprocessing | None, *, image_size: int | None = None
                   ) -> Callable:
  """A function uint8 mask (H, W, 1), 0..255 -> float32 (S, S) in [0, 1].

  Args:
    preprocessing: crop and resize like the images (bilinear); None keeps the
      mask's size.
    image_size: overrides ``preprocessing.image_size``.
  """
  def transform(mask):
    mask = tf.cast(mask, tf.float32) / 255.0
    if preprocessing is not None:
      size = image_size or preprocessing.image_size
      mask = crop_and_resize(tf, mask, preprocessing, size, 'bilinear')
      mask = tf.reshape(mask, [size, size, 1])
    return tf.clip_by_value(mask[..., 0], 0.0, 1.0)

  return transform

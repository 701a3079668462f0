"""Validation of image batches handed to a backbone.

Every backbone calls :func:`check_image_batch` first, at trace time, so a batch
of the wrong rank, layout or dtype fails with a sentence that says what to do
instead of a page of XLA shape errors.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def check_image_batch(images: Any, *, model_name: str, min_size: int = 1) -> None:
  """Raises ``ValueError``/``TypeError`` unless ``images`` is a float NHWC RGB batch.

  Args:
    images: the array given to the model; expected shape (N, H, W, 3), floating
      dtype, already preprocessed (scaled and normalised as the model's
      preprocessing metadata says).
    model_name: used in the message, e.g. ``"ResNet"``.
    min_size: the smallest height/width the model can process.
  """
  shape = tuple(getattr(images, 'shape', ()))
  dtype = getattr(images, 'dtype', None)
  if dtype is None:
    raise TypeError(
        f'{model_name} expects an array of images of shape (N, H, W, 3), got '
        f'an object of type {type(images).__name__}. Convert it with '
        'jnp.asarray(...) or np.asarray(...) first.')
  if len(shape) != 4:
    hint = ''
    if len(shape) == 3 and shape[-1] == 3:
      hint = (' It looks like a single image: add a batch dimension with '
              'images[None].')
    elif len(shape) == 2:
      hint = ' It looks like a single grey-scale image or a feature matrix.'
    raise ValueError(
        f'{model_name} expects a batch of images of rank 4 with shape '
        f'(N, H, W, 3) (channels last), got rank {len(shape)} with shape '
        f'{shape}.{hint}')
  if shape[-1] != 3:
    hint = ''
    if shape[1] == 3:
      hint = (' The batch looks channels-first (N, 3, H, W), as in PyTorch: '
              'transpose it with images.transpose(0, 2, 3, 1).')
    elif shape[-1] == 1:
      hint = (' It looks grey-scale: repeat the channel with '
              'jnp.repeat(images, 3, axis=-1).')
    elif shape[-1] == 4:
      hint = ' It looks like RGBA: drop the alpha channel with images[..., :3].'
    raise ValueError(
        f'{model_name} expects RGB images with 3 channels in the last axis, '
        f'shape (N, H, W, 3), got shape {shape}.{hint}')
  if not jnp.issubdtype(dtype, jnp.floating):
    hint = ''
    if np.dtype(dtype) == np.uint8:
      hint = (' These look like raw 8-bit pixels: convert them to float and '
              'apply the model\'s preprocessing (see '
              'qscore_jax.models.get_model_spec(id).preprocessing), e.g. '
              'images.astype(np.float32) / 255 followed by mean/std '
              'normalisation.')
    raise TypeError(
        f'{model_name} expects floating-point images (float32, bfloat16 or '
        f'float16), got dtype {np.dtype(dtype).name}.{hint}')
  if shape[0] == 0:
    raise ValueError(f'{model_name} got an empty batch (N = 0), shape {shape}.')
  if shape[1] < min_size or shape[2] < min_size:
    raise ValueError(
        f'{model_name} needs images of at least {min_size}x{min_size} pixels, '
        f'got {shape[1]}x{shape[2]} (shape {shape}).')

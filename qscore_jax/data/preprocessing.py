"""How a model's authors turned an image into the network input: :class:`Preprocessing`.

Plain data (NumPy only), shared by the model registry (each checkpoint's
preset) and the data pipeline (which applies it), so neither depends on the
other and importing it pulls in neither TensorFlow nor JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a model's authors turned an image into the network input.

  ``mean``/``std`` are per-channel RGB statistics applied to images scaled to
  [0, 1]; ``None`` means the network takes [0, 1] RGB directly (SimCLR).
  ``crop_mode='resize_then_crop'`` resizes the shorter side to
  ``image_size / crop_fraction`` and center-crops ``image_size`` (torchvision);
  ``'crop_then_resize'`` center-crops ``crop_fraction`` of the shorter side and
  resizes it to ``image_size`` (SimCLR's and BYOL's TF code).

  Attributes:
    name: the preset's name (``registry.toml``) or a free name.
    image_size: side of the square network input.
    crop_fraction: in (0, 1], see ``crop_mode``.
    crop_mode: ``'resize_then_crop'`` or ``'crop_then_resize'``.
    interpolation: ``'bilinear'`` or ``'bicubic'`` (antialiased resizing).
    mean: per-channel RGB mean for [0, 1] images, or None.
    std: per-channel RGB std, or None (together with ``mean``).
  """
  name: str
  image_size: int
  crop_fraction: float
  crop_mode: str
  interpolation: str
  mean: tuple[float, float, float] | None = None
  std: tuple[float, float, float] | None = None

  def __post_init__(self):
    if (self.mean is None) != (self.std is None):
      raise ValueError(f'preprocessing {self.name!r}: give both mean and std or neither.')
    if self.crop_mode not in ('resize_then_crop', 'crop_then_resize'):
      raise ValueError(f'preprocessing {self.name!r}: unknown crop_mode {self.crop_mode!r}.')
    if self.interpolation not in ('bilinear', 'bicubic'):
      raise ValueError(f'preprocessing {self.name!r}: unknown interpolation '
                       f'{self.interpolation!r}.')
    if not 0 < self.crop_fraction <= 1:
      raise ValueError(f'preprocessing {self.name!r}: crop_fraction must be in (0, 1].')

  def normalize(self, images):
    """Maps RGB images in [0, 1], (..., 3), to the network input.

    Args:
      images: RGB in [0, 1], (..., 3) (NumPy or JAX); returned unchanged when
        ``mean`` is None.
    """
    if self.mean is None:
      return images
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (images - mean) / std

  def to_json(self) -> dict[str, Any]:
    """The fields as a JSON-serialisable dict (as stored in metadata)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'Preprocessing':
    """The preprocessing of a :meth:`to_json` dict (lists of mean/std become tuples).

    Args:
      data: the dict of fields.
    """
    data = dict(data)
    for key in ('mean', 'std'):
      if data.get(key) is not None:
        data[key] = tuple(float(v) for v in data[key])
    return cls(**data)


__all__ = ['Preprocessing']

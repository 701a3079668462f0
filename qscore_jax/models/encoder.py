"""An encoder loaded once: module, variables, metadata, preprocessing and a content fingerprint.

Every driver (embedding, analysis, interpretation, comparison, the demo, the
experiment) takes an :class:`Encoder`. :func:`load_encoder` makes one from any
model reference: a saved model directory, a ``qscore finetune`` workdir, a
converted registry id or a shipped model id (``demo-simclr-r18w025``). The CLI
resolves the reference once and hands the ``Encoder`` down, so one report
costs one restore.

>>> encoder = load_encoder('demo-simclr-r18w025')
>>> encoder.num_features, encoder.preprocessing.image_size
(128, 32)
>>> representations = encoder.embed(images)      # (N, 32, 32, 3) -> (N, 128)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from qscore_jax.data.preprocessing import Preprocessing
from qscore_jax.models.features import keep_state
from qscore_jax.models import precision, weights
from qscore_jax.models.variables import embed


def fingerprint_variables(variables: Mapping[str, Any]) -> str:
  """``sha256:<hex>`` of a variables tree's content: every leaf's path, dtype, shape and bytes.

  Two encoders have the same fingerprint exactly when their model state is bit
  for bit the same, whatever file or directory it came from.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` (other collections are ignored).
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(keep_state(dict(variables))))
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n'.encode())
    digest.update(array.tobytes())
  return f'sha256:{digest.hexdigest()}'


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """A backbone with its weights and everything known about them.

  Attributes:
    module: the Flax backbone (``module.apply(variables, images, train=False)``).
    variables: its ``{'params', 'batch_stats'}``.
    metadata: the saved model's ``metadata.json`` content (model id, method,
      arch and options, preprocessing, heads, provenance).
    directory: the saved model directory it was restored from (None in memory).
  """
  module: nn.Module
  variables: Mapping[str, Any]
  metadata: Mapping[str, Any]
  directory: pathlib.Path | None = None

  @functools.cached_property
  def preprocessing(self) -> Preprocessing | None:
    """How its authors fed it (None: not recorded; the data's native size is used)."""
    data = self.metadata.get('preprocessing')
    return Preprocessing.from_json(data) if data else None

  @functools.cached_property
  def fingerprint(self) -> str:
    """:func:`fingerprint_variables` of its variables (computed once, on first use)."""
    return fingerprint_variables(self.variables)

  @property
  def name(self) -> str:
    """The registry id it was converted from, else its directory (``'in memory'`` without)."""
    return self.metadata.get('model_id') or (str(self.directory) if self.directory
                                             else 'in memory')

  @property
  def num_features(self) -> int:
    """d, the size of its representation."""
    return self.module.num_features

  @property
  def compute_dtype(self) -> str:
    """The dtype its forward pass computes in (``'float32'`` or ``'bfloat16'``)."""
    return precision.name_of(getattr(self.module, 'dtype', None))

  def describe(self) -> dict[str, Any]:
    """What a store or report records about the encoder (JSON-serialisable)."""
    return {'model': self.name, 'method': self.metadata.get('method'),
            'arch': self.metadata.get('arch'),
            'arch_options': dict(self.metadata.get('arch_options') or {}),
            'model_fingerprint': self.fingerprint, 'compute_dtype': self.compute_dtype,
            'compute_path': precision.compute_path(getattr(self.module, 'dtype', None))}

  def embed(self, images) -> jax.Array:
    """Jitted inference-mode representations, (N, H, W, 3) -> (N, d) float32.

    Args:
      images: (N, H, W, 3) float, preprocessed as :attr:`preprocessing` says.
    """
    return embed(self.module, self.variables, images)

  @classmethod
  def from_variables(cls, module: nn.Module, variables: Mapping[str, Any], *,
                     arch: str | None = None, arch_options: Mapping[str, Any] | None = None,
                     method: str | None = None, preprocessing: Preprocessing | None = None,
                     name: str | None = None) -> 'Encoder':
    """An encoder held in memory (a model being trained, users' own weights).

    Args:
      module: the backbone.
      variables: its variables.
      arch, arch_options, method: recorded as a saved model's metadata would.
      preprocessing: how to feed it (None: the data's native size).
      name: its name in stores and reports (default ``'in memory'``).
    """
    metadata = {'model_id': name, 'method': method, 'arch': arch or type(module).__name__,
                'arch_options': dict(arch_options or {}),
                'preprocessing': preprocessing.to_json() if preprocessing else None}
    return cls(module, keep_state(dict(variables)), metadata)


def load_encoder(ref: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None,
                 dtype: str | None = None, **overrides: Any) -> Encoder:
  """Resolves a model reference and restores it, once.

  Args:
    ref: a saved model directory, a ``qscore finetune`` workdir, a converted
      registry id or a shipped model id (:func:`~qscore_jax.models.weights.resolve_model_dir`).
    sharding: where to place every array (default: the first local device).
    dtype: the computation dtype, ``'float32'``, ``'bfloat16'`` or ``'auto'``
      (:mod:`~qscore_jax.models.precision`); None: the module's default, float32.
    **overrides: other module attributes that do not change the weights.

  Raises:
    FileNotFoundError: ``ref`` names no saved model (saying whether an id is
      known but not converted yet, or which file a directory lacks).
  """
  directory = weights.model_directory(ref)
  metadata = weights.read_metadata(directory)
  if dtype is not None:
    overrides['dtype'] = precision.as_jnp(precision.resolve(dtype))
  module = weights.model_from_metadata(metadata, **overrides)
  variables = weights.load_variables(directory, module, sharding=sharding)
  return Encoder(module, variables, metadata, directory)


def as_encoder(model: 'Encoder | str | os.PathLike', *, caller: str | None = None) -> Encoder:
  """``model`` itself if it is an :class:`Encoder`, else :func:`load_encoder` of it.

  Args:
    model: an encoder or a model reference.
    caller: the public function that received a reference; given, passing a
      reference is deprecated there (load it once with :func:`load_encoder`).
  """
  if isinstance(model, Encoder):
    return model
  if caller:
    warnings.warn(f'{caller}: passing a model reference ({model!r}) is deprecated; load it '
                  'once with qscore_jax.load_encoder(ref) and pass the Encoder.',
                  DeprecationWarning, stacklevel=3)
  return load_encoder(model)


__all__ = ['Encoder', 'as_encoder', 'fingerprint_variables', 'load_encoder']

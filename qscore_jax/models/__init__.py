"""Flax backbones of the SSL releases, their registry, and weight storage.

Every backbone has the same interface:

* ``model.apply(variables, images)`` maps preprocessed images (N, H, W, 3) to
  the representation the method evaluates, (N, model.num_features), float32;
* ``model.feature_names`` lists the intermediate feature maps that
  :func:`apply_with_features` returns and that gradients can be taken against
  (``'perturbations'`` collection);
* variables are ``{'params': ..., 'batch_stats': ...}`` (no ``batch_stats``
  for ViTs).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qscore_jax.models.features import (STATE_COLLECTIONS, apply_with_features,
                                        expose_feature, keep_state)
from qscore_jax.models.inputs import check_image_batch
from qscore_jax.models.registry import (
    ARCHITECTURES, METHODS, ModelSpec, Preprocessing, build_model,
    get_model_spec, get_preprocessing, list_models)
from qscore_jax.models.resnet import ResNet
from qscore_jax.models.vit import VisionTransformer, resample_pos_embed
from qscore_jax.models.weights import load_heads, load_model, load_variables, save_model


def _default_input_shape(model: nn.Module) -> tuple[int, int, int, int]:
  size = getattr(model, 'image_size', 224)
  return (1, size, size, 3)


def init_variables(model: nn.Module, rng: jax.Array,
                   input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Randomly initialised ``{'params', 'batch_stats'}`` for ``model`` (jitted).

  Args:
    model: a backbone from :func:`build_model` or :meth:`ModelSpec.build`.
    rng: a ``jax.random.key``.
    input_shape: shape of an example batch; defaults to one image of the
      model's ``image_size`` (224x224 when it has none).
  """
  shape = input_shape or _default_input_shape(model)
  init = jax.jit(lambda key: keep_state(
      model.init(key, jnp.zeros(shape, jnp.float32))))
  return init(rng)


def abstract_variables(model: nn.Module,
                       input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the model's variables.

  Costs no compilation; used to check converted weights and to restore
  checkpoints onto a target.

  Args:
    model: a backbone from :func:`build_model` or :meth:`ModelSpec.build`.
    input_shape: shape of an example batch; defaults to one image of the
      model's ``image_size`` (224 when it has none).
  """
  shape = input_shape or _default_input_shape(model)
  return keep_state(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))))


@functools.partial(jax.jit, static_argnames=('model',))
def embed(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """Jitted inference-mode representation, (N, H, W, 3) -> (N, d) float32.

  Args:
    model: a backbone (static: one compilation per model and input shape).
    variables: its variables (collections other than ``params`` and
      ``batch_stats`` are dropped).
    images: (N, H, W, 3) float, preprocessed as the model expects.
  """
  return model.apply(keep_state(variables), images, train=False)


__all__ = [
    'ARCHITECTURES', 'METHODS', 'ModelSpec', 'Preprocessing', 'ResNet',
    'STATE_COLLECTIONS', 'VisionTransformer', 'abstract_variables',
    'apply_with_features', 'build_model', 'check_image_batch', 'embed', 'expose_feature',
    'get_model_spec', 'get_preprocessing', 'init_variables', 'list_models',
    'load_model', 'load_variables', 'resample_pos_embed', 'save_model',
]

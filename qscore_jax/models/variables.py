"""Variables of a backbone: random initialisation, their shapes, the jitted forward pass.

Pure functions of a module (no files): :mod:`qscore_jax.models.weights` restores
checkpoints onto :func:`abstract_variables`, drivers embed with :func:`embed`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qscore_jax.models.features import keep_state


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


__all__ = ['abstract_variables', 'embed', 'init_variables']

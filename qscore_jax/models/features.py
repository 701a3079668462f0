"""Intermediate feature maps of the backbones: exposing them and reading them back.

Backbones call :func:`expose_feature` on each feature map worth looking at
(ResNet stages, ViT token arrays). It does two things: the map is *sown* into
the ``'intermediates'`` collection, so :func:`apply_with_features` can return
it, and it passes through ``Module.perturb`` (collection ``'perturbations'``),
so the gradient of any function of the output with respect to that map is
``jax.grad`` with respect to a zero perturbation, the basis of Grad-CAM.
Neither collection is model state: they are never saved.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

# Collections that hold model state; sown intermediates and perturbations are
# transient and never stored.
STATE_COLLECTIONS = ('params', 'batch_stats')


def keep_state(variables) -> dict[str, Any]:
  """The model-state collections of ``variables`` (drops intermediates, perturbations)."""
  return {k: v for k, v in variables.items() if k in STATE_COLLECTIONS}


def expose_feature(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Sows ``x`` as ``name`` and makes it a gradient tap; returns ``x`` unchanged.

  Args:
    module: the calling Flax module (inside its ``__call__``).
    name: the feature map's name (an entry of the model's ``feature_names``).
    x: the feature map, e.g. (N, h, w, C) or (N, tokens, D).
  """
  x = module.perturb(name, x)
  module.sow('intermediates', name, x)
  return x


def apply_with_features(model: nn.Module, variables: Any, images: jax.Array, *,
                        train: bool = False):
  """Representation and every intermediate feature map in one pass.

  Args:
    model: a backbone (``qscore_jax.models``).
    variables: its variables (only ``params``/``batch_stats`` are used).
    images: (N, H, W, 3) float, preprocessed as the model expects.
    train: run in training mode (batch statistics), default False.
  Returns:
    ``(representation, features)``: the representation (N, d) and a dict from
    each name of ``model.feature_names`` to its array, (N, h, w, C) for ResNet
    stages and (N, 1 + h*w, D) token arrays for ViT blocks. With ``train=True``
    the updated ``batch_stats`` are discarded (use ``model.apply`` with
    ``mutable=['batch_stats']`` to train).
  """
  mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
  representation, state = model.apply(
      keep_state(variables), images, train=train, mutable=mutable)
  features = {name: value[0] for name, value in state['intermediates'].items()}
  return representation, features

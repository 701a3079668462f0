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

from qscore_jax.models.encoder import Encoder, as_encoder, load_encoder
from qscore_jax.models.features import (STATE_COLLECTIONS, apply_with_features,
                                        expose_feature, keep_state)
from qscore_jax.models.inputs import check_image_batch
from qscore_jax.models.registry import (
    ARCHITECTURES, METHODS, ModelSpec, Preprocessing, build_model,
    get_model_spec, get_preprocessing, list_models)
from qscore_jax.models.resnet import ResNet
from qscore_jax.models.variables import abstract_variables, embed, init_variables
from qscore_jax.models.vit import VisionTransformer, resample_pos_embed
from qscore_jax.models.weights import load_heads, load_model, load_variables, save_model


__all__ = [
    'ARCHITECTURES', 'Encoder', 'METHODS', 'ModelSpec', 'Preprocessing', 'ResNet',
    'STATE_COLLECTIONS', 'VisionTransformer', 'abstract_variables',
    'apply_with_features', 'as_encoder', 'build_model', 'check_image_batch', 'embed', 'expose_feature',
    'get_model_spec', 'get_preprocessing', 'init_variables', 'list_models', 'load_encoder',
    'load_model', 'load_variables', 'resample_pos_embed', 'save_model',
]

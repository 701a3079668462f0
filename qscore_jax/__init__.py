"""qscore_jax: Q-Score and discriminative features of SSL representations in JAX.

The reference JAX/Flax implementation of Kalibhat et al., "Measuring
Self-Supervised Representation Quality for Downstream Classification using
Discriminative Features" (AAAI 2024), with the published checkpoints of
SimCLR, SwAV, MoCo, BYOL, DINO, SimSiam, VICReg and Barlow Twins.
"""

from qscore_jax._version import __version__

# Before anything starts a JAX backend: CPU flags are read only once.
from qscore_jax import _xla_cpu

_xla_cpu.configure()

# pylint: disable=wrong-import-position
from qscore_jax import models
from qscore_jax.models import (
    Encoder, abstract_variables, apply_with_features, build_model, embed, get_model_spec,
    init_variables, list_models, load_encoder, load_model, save_model)
# The statistics, for users' own jitted code.
from qscore_jax.stats import (
    activation_counts, activation_frequency, band_limits, check_finite,
    check_representations, discriminative_features, feature_mask, highly_active,
    nonfinite_rows, qscore, qscore_v1, sample_moments)
from qscore_jax.validation import InputError
from qscore_jax.embed import embed_dataset, embed_images, make_embed_step
# Importing the submodule qscore_jax.embed bound the name `embed` to that module; the
# public `qscore_jax.embed` is the jitted forward pass.
from qscore_jax.models import embed  # pylint: disable=reimported

__all__ = [
    'Encoder', 'InputError', '__version__', 'abstract_variables', 'activation_counts',
    'activation_frequency', 'apply_with_features', 'band_limits', 'build_model', 'check_finite',
    'check_representations', 'discriminative_features', 'embed', 'embed_dataset',
    'embed_images', 'feature_mask', 'get_model_spec',
    'highly_active', 'init_variables', 'list_models', 'load_encoder', 'load_model', 'make_embed_step',
    'models', 'nonfinite_rows', 'qscore', 'qscore_v1', 'sample_moments', 'save_model',
]

"""qscore_jax: Q-Score and discriminative features of SSL representations in JAX.

The reference JAX/Flax implementation of Kalibhat et al., "Measuring
Self-Supervised Representation Quality for Downstream Classification using
Discriminative Features" (AAAI 2024), with the published checkpoints of
SimCLR, SwAV, MoCo, BYOL, DINO, SimSiam, VICReg and Barlow Twins.
"""

__version__ = '0.1.0'

# Before anything starts a JAX backend: CPU flags are read only once.
from qscore_jax import _xla_cpu

_xla_cpu.configure()

# pylint: disable=wrong-import-position
from qscore_jax import models
from qscore_jax.models import (
    abstract_variables, apply_with_features, build_model, embed, get_model_spec,
    init_variables, list_models, load_model, save_model)

__all__ = [
    '__version__', 'abstract_variables', 'apply_with_features', 'build_model',
    'embed', 'get_model_spec', 'init_variables', 'list_models', 'load_model',
    'models', 'save_model',
]

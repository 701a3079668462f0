"""Projection heads, predictors and prototypes of the SSL methods, as one MLP module.

Every head the eight releases ship is a stack of linear layers, each optionally
followed by BatchNorm and an activation, sometimes applied to an L2-normalised
input (SwAV prototypes, DINO's last layer):

=============  ==================================================================
method         head layers (features, bias, norm, activation)
=============  ==================================================================
SimCLR v2      projector: (w, no bias, bn, relu) x2, (128, no bias, bn without shift)
SwAV           projector: (2048, bias, bn, relu), (128, bias);
               prototypes: L2-normalised input, (3000, no bias)
MoCo v2        projector: (2048, bias, -, relu), (128, bias)
MoCo v3        projector: (4096, no bias, bn, relu), (256, no bias, bn without affine);
               predictor: (4096, no bias, bn, relu), (256, no bias)
BYOL           projector / predictor: (4096, bias, bn, relu), (256, no bias)
DINO           projector: (2048, bias, -, gelu) x2, (256, bias);
               prototypes: L2-normalised input, (65536, no bias) (weight norm folded)
SimSiam        projector: (2048, no bias, bn, relu) x2, (2048, bias, bn without affine);
               predictor: (512, no bias, bn, relu), (2048, bias)
VICReg         projector: (8192, bias, bn, relu) x2, (8192, no bias)
Barlow Twins   projector: (8192, no bias, bn, relu) x2, (8192, no bias)
=============  ==================================================================

A head is described by a :class:`HeadSpec` (JSON-serialisable, stored in the
metadata of a converted checkpoint) and built with :meth:`HeadSpec.build`.
Parameters are named ``dense_<i>`` and ``norm_<i>`` for layer ``i``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = (None, 'batchnorm', 'batchnorm_no_affine', 'batchnorm_no_shift')
ACTIVATIONS = (None, 'relu', 'gelu')


@dataclasses.dataclass(frozen=True)
class HeadLayer:
  """One linear layer of a head and what follows it.

  Attributes:
    features: output width.
    use_bias: whether the linear layer has a bias.
    norm: ``None``, ``'batchnorm'`` (scale and shift), ``'batchnorm_no_affine'``
      (statistics only: MoCo v3, SimSiam, Barlow Twins) or
      ``'batchnorm_no_shift'`` (scale without shift: SimCLR v2's last layer).
    activation: ``None``, ``'relu'`` or ``'gelu'`` (exact, as PyTorch's).
    weight_norm: the kernel's columns are divided by their norm in the forward
      pass (PyTorch ``weight_norm`` with the gain fixed at 1: DINO's last layer
      with ``norm_last_layer=True``). Converted checkpoints store the folded
      weight, whose columns have norm 1 already, so both readings agree.
  """
  features: int
  use_bias: bool = True
  norm: str | None = None
  activation: str | None = None
  weight_norm: bool = False

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {ACTIVATIONS}, got {self.activation!r}.')


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """A head: its layers and whether its input is L2-normalised first.

  Attributes:
    layers: the :class:`HeadLayer` s, input side first.
    normalize_input: L2-normalise the input rows first (SwAV prototypes,
      DINO's last layer).
  """
  layers: tuple[HeadLayer, ...]
  normalize_input: bool = False

  def build(self, **overrides: Any) -> 'MLPHead':
    """The :class:`MLPHead` of this spec.

    Args:
      **overrides: other :class:`MLPHead` attributes (``dtype``,
        ``bn_axis_name``, ...).
    """
    return MLPHead(layers=tuple(self.layers), normalize_input=self.normalize_input,
                   **overrides)

  def to_json(self) -> dict[str, Any]:
    """``{'layers': [layer fields, ...], 'normalize_input': bool}`` (as stored in metadata)."""
    return {'layers': [dataclasses.asdict(layer) for layer in self.layers],
            'normalize_input': self.normalize_input}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> 'HeadSpec':
    """The spec of a :meth:`to_json` dict.

    Args:
      data: ``{'layers': [...], 'normalize_input': bool}`` (the latter optional).
    """
    return cls(tuple(HeadLayer(**layer) for layer in data['layers']),
               bool(data.get('normalize_input', False)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``F.normalize(x, dim=-1)``: x / max(||x||, eps).

  Written as ``x * rsqrt(max(||x||^2, eps^2))``: the same value, and a zero
  gradient at x = 0 (as PyTorch's), where the gradient of ``jnp.linalg.norm``
  is NaN — a dead predictor output would otherwise poison a whole step.

  Args:
    x: (..., d) array, normalised along the last axis.
    eps: lower bound of the norm (default 1e-12).
  """
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


class _WeightNormDense(nn.Dense):
  """``nn.Dense`` (same parameters) whose kernel columns are used at unit norm."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    kernel = kernel * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(kernel), axis=0), 1e-24))
    y = inputs.astype(self.dtype) @ kernel.astype(self.dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    return y


class MLPHead(nn.Module):
  """Linear layers with optional BatchNorm and activation, (N, d_in) -> (N, d_out).

  BatchNorm follows PyTorch's ``BatchNorm1d`` (eps 1e-5, momentum 0.1 = Flax
  0.9); in training mode its statistics are global over ``bn_axis_name``
  under ``pmap`` (and over the whole batch under ``jit``).

  Attributes:
    layers: the :class:`HeadLayer` s, input side first.
    normalize_input: L2-normalise the input rows first.
    bn_momentum: Flax BatchNorm momentum (default 0.9).
    bn_epsilon: BatchNorm epsilon (default 1e-5).
    bn_axis_name: the pmap axis of global batch statistics (default None).
    dtype: computation dtype (default float32); the output is float32.
  """
  layers: Sequence[HeadLayer]
  normalize_input: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the head.

    Args:
      x: (N, d_in) features.
      train: training mode: batch statistics, and ``batch_stats`` updated when
        mutable (default False).
    Returns:
      (N, d_out) float32.
    """
    if x.ndim != 2:
      raise ValueError(f'A head takes features of shape (N, d), got shape {x.shape}.')
    x = x.astype(self.dtype)
    if self.normalize_input:
      x = l2_normalize(x.astype(jnp.float32)).astype(self.dtype)
    for i, layer in enumerate(self.layers):
      dense = _WeightNormDense if layer.weight_norm else nn.Dense
      x = dense(layer.features, use_bias=layer.use_bias, dtype=self.dtype, name=f'dense_{i}')(x)
      if layer.norm is not None:
        affine = layer.norm == 'batchnorm'
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, dtype=self.dtype,
            use_scale=layer.norm != 'batchnorm_no_affine', use_bias=affine,
            name=f'norm_{i}')(x)
      if layer.activation == 'relu':
        x = nn.relu(x)
      elif layer.activation == 'gelu':
        x = nn.gelu(x, approximate=False)
    return x.astype(jnp.float32)

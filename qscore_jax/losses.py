"""The self-supervised objectives, as pure functions of the projections.

Every loss takes the outputs of the heads for the *global* batch: under
``jax.jit`` over a device mesh the arrays are global already; under
``jax.pmap`` pass ``axis_name`` and the per-device rows are all-gathered
first, so every device computes the same global value. Take the mean of the
gradients over devices (``lax.pmean``) in a pmapped step; the result equals the
gradient of the single-device loss on the whole batch (tested).

Conventions and defaults follow the official releases:

==============  =====================================================================
SimCLR          NT-Xent over 2N views, cosine similarity / temperature (0.1 on ImageNet
                with LARS, 0.5 for small data); mean over all 2N anchors.
BYOL            2 - 2 cos(p, sg(z_target)), both directions summed, mean over the batch.
SimSiam         -cos(p, sg(z)), both directions averaged.
VICReg          25 * MSE(z1, z2) + 25 * hinge(1 - std) + 1 * off-diagonal covariance^2 / d,
                std with the unbiased variance + 1e-4 under the root.
Barlow Twins    sum_i (1 - C_ii)^2 + 0.0051 * sum_{i != j} C_ij^2, C the cross-correlation
                of the batch-standardised projections (biased variance, eps 1e-5).
==============  =====================================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qscore_jax.models.heads import l2_normalize


def gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """All rows of the global batch: ``x`` itself, or all-gathered over ``axis_name``."""
  return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)


def _check_pair(a, b, what):
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'{what} expects two (N, d) arrays of the same shape, got {a.shape} and '
                     f'{b.shape}.')


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1,
            axis_name: str | None = None) -> jax.Array:
  """SimCLR's NT-Xent loss of two views' projections (N, d) each; scalar.

  For each of the 2N anchors, the positive is the other view of the same image
  and the negatives are the other 2N - 2 projections.
  """
  _check_pair(z1, z2, 'nt_xent')
  z = l2_normalize(jnp.concatenate([gather(z1, axis_name), gather(z2, axis_name)]))
  n = z.shape[0] // 2
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # not itself
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(log_prob[jnp.arange(2 * n), positives])


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity of (N, d) arrays, (N,)."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def byol_loss(p1: jax.Array, p2: jax.Array, target_z1: jax.Array, target_z2: jax.Array, *,
              axis_name: str | None = None) -> jax.Array:
  """BYOL: ``2 - 2 cos(p1, sg(z'2)) + 2 - 2 cos(p2, sg(z'1))``, mean over the batch."""
  _check_pair(p1, target_z2, 'byol_loss')
  p1, p2, t1, t2 = (gather(x, axis_name) for x in (p1, p2, target_z1, target_z2))
  t1, t2 = lax.stop_gradient(t1), lax.stop_gradient(t2)
  return jnp.mean((2 - 2 * cosine_similarity(p1, t2)) + (2 - 2 * cosine_similarity(p2, t1)))


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, *,
                 axis_name: str | None = None) -> jax.Array:
  """SimSiam: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, mean over the batch."""
  _check_pair(p1, z2, 'simsiam_loss')
  p1, p2, z1, z2 = (gather(x, axis_name) for x in (p1, p2, z1, z2))
  z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
  return -0.5 * (jnp.mean(cosine_similarity(p1, z2)) + jnp.mean(cosine_similarity(p2, z1)))


def _off_diagonal_square_sum(m: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(m)) - jnp.sum(jnp.square(jnp.diagonal(m)))


def vicreg_terms(z1: jax.Array, z2: jax.Array, *, eps: float = 1e-4,
                 axis_name: str | None = None) -> dict[str, jax.Array]:
  """VICReg's three unweighted terms: ``invariance``, ``variance``, ``covariance``."""
  _check_pair(z1, z2, 'vicreg')
  z1, z2 = gather(z1, axis_name), gather(z2, axis_name)
  n, d = z1.shape
  if n < 2:
    raise ValueError('VICReg needs at least 2 samples in the batch (unbiased variance).')

  def variance(z):
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jnp.mean(jax.nn.relu(1.0 - std))

  def covariance(z):
    z = z - jnp.mean(z, axis=0)
    return _off_diagonal_square_sum(z.T @ z / (n - 1)) / d

  return {'invariance': jnp.mean(jnp.square(z1 - z2)),
          'variance': 0.5 * (variance(z1) + variance(z2)),
          'covariance': covariance(z1) + covariance(z2)}


def vicreg_loss(z1: jax.Array, z2: jax.Array, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
                axis_name: str | None = None) -> jax.Array:
  """VICReg: weighted sum of :func:`vicreg_terms` (defaults 25, 25, 1)."""
  terms = vicreg_terms(z1, z2, eps=eps, axis_name=axis_name)
  return (sim_coeff * terms['invariance'] + std_coeff * terms['variance']
          + cov_coeff * terms['covariance'])


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, *, lambd: float = 0.0051,
                      eps: float = 1e-5, axis_name: str | None = None) -> jax.Array:
  """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``."""
  _check_pair(z1, z2, 'barlow_twins_loss')
  z1, z2 = gather(z1, axis_name), gather(z2, axis_name)

  def standardize(z):  # BatchNorm1d(affine=False) in training mode
    return (z - jnp.mean(z, axis=0)) / jnp.sqrt(jnp.var(z, axis=0) + eps)

  c = standardize(z1).T @ standardize(z2) / z1.shape[0]
  on_diagonal = jnp.sum(jnp.square(jnp.diagonal(c) - 1))
  return on_diagonal + lambd * _off_diagonal_square_sum(c)


__all__ = ['barlow_twins_loss', 'byol_loss', 'cosine_similarity', 'gather', 'nt_xent',
           'simsiam_loss', 'vicreg_loss', 'vicreg_terms']

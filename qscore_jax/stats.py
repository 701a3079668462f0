"""Per-sample statistics of a representation matrix (the definitions of the Q-Score paper).

Pure functions of ``h`` (N, d): they run inside ``jax.jit``, ``vmap`` and
``pmap`` and can be called from users' own jitted code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_EPS = 4.0


def sample_moments(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample mean and population std over the d features.

  Args:
    h: representations (N, d).
  Returns:
    ``(mu, sigma)``, each (N,) float32; sigma is exactly 0 for a constant row.
  """
  h = jnp.asarray(h, jnp.float32)
  mu = jnp.mean(h, axis=-1)
  # Two-pass variance (never negative). In float32 the mean of a constant row
  # can round away from its entries, leaving a spurious sigma of ~1e-8: such
  # rows are detected exactly and given sigma = 0.
  sigma = jnp.sqrt(jnp.mean(jnp.square(h - mu[..., None]), axis=-1))
  return mu, jnp.where(_varies(h), sigma, 0.0)


def _varies(h: jax.Array) -> jax.Array:
  """True for rows (..., d) whose entries are not all equal."""
  return jnp.max(h, axis=-1) > jnp.min(h, axis=-1)


def highly_active(h: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
  """Membership of L_i = {j : h_ij > mu_i + eps * sigma_i}, bool (N, d).

  A constant row (sigma_i = 0) has no highly active feature. It is tested
  explicitly: in float32 the mean of a constant row can round below its
  entries, which would otherwise make every entry "active".
  """
  h = jnp.asarray(h, jnp.float32)
  mu, sigma = sample_moments(h)
  return (h > (mu + eps * sigma)[..., None]) & _varies(h)[..., None]

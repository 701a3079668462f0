"""The Q-Score regularizer for fine-tuning, and the L1 (Lasso) baseline.

On a batch of backbone representations ``H`` (B, d) (METHOD.md):

    R(H) = - lambda1 * sum_{i : Q_i < alpha} Q_i  +  lambda2 * sum_{j : c_j > beta} c_j
    alpha = mean_i Q_i,   c_j = ||H[:, j]||_1 = sum_i |h_ij|,   beta = mean_j c_j

The first term raises the Q-Score of the batch's below-average samples; the
second penalises features that are active across the whole batch. Q_i is
:func:`qscore_jax.stats.qscore` with the discriminative set D either fixed
(computed on the pre-trained model's representations and passed in) or taken
from the batch itself. Options (:class:`RegularizerConfig`):

* ``normalization``: ``'sum'`` (the formula above) or ``'mean'`` (the first sum
  divided by B, the second by d, so the scale does not grow with the batch or
  the width);
* ``stop_gradient``: treat alpha and beta as constants (default). In the formula
  above alpha and beta only enter through the selections, which are piecewise
  constant, so the gradient is the same either way (tested); the option keeps
  the choice explicit;
* ``views``: apply to every view that goes through the backbone (default) or
  only the first;
* ``discriminative``: ``'fixed'`` (D from the pre-trained model, optionally
  refreshed every ``refresh_every`` steps by the training loop) or ``'batch'``.

``kind='l1'`` replaces both terms by ``lambda1 * sum_ij |h_ij|`` (divided by
B d with ``'mean'``): the Lasso baseline of the comparison. ``kind='none'``
disables the regularizer. Everything is computed on the global batch (under
``pmap`` with ``axis_name`` the rows are all-gathered first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from qscore_jax import stats, validation
from qscore_jax.losses import gather

KINDS = ('qscore', 'l1', 'none')
NORMALIZATIONS = ('sum', 'mean')
VIEWS = ('all', 'first')
DISCRIMINATIVE = ('fixed', 'batch')


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
  """Options of the regularizer (defaults: METHOD.md).

  Attributes:
    kind: ``'qscore'`` (default), ``'l1'`` (the Lasso baseline) or ``'none'``.
    lambda1: weight of the low-quality term (of the L1 penalty for ``'l1'``)
      (default 1e-4).
    lambda2: weight of the dense-features term (default 1e-4).
    normalization: ``'sum'`` (default) or ``'mean'`` (terms divided by B resp. d).
    stop_gradient: treat alpha and beta as constants (default True).
    views: ``'all'`` views through the backbone (default) or only the ``'first'``.
    discriminative: ``'fixed'`` (D of the pre-trained model, default) or
      ``'batch'`` (D of each batch).
    refresh_every: steps between recomputations of a fixed D by the training
      loop (default 0: never).
    eps: highly-active threshold in per-sample stds (default 4).
    band: percentiles delimiting D (default 50, 95).
  """
  kind: str = 'qscore'
  lambda1: float = 1e-4
  lambda2: float = 1e-4
  normalization: str = 'sum'
  stop_gradient: bool = True
  views: str = 'all'
  discriminative: str = 'fixed'
  refresh_every: int = 0  # steps between recomputations of a fixed D (0: never)
  eps: float = stats.DEFAULT_EPS
  band: tuple[float, float] = stats.DEFAULT_BAND

  def __post_init__(self):
    for name, value, allowed in (('kind', self.kind, KINDS),
                                 ('normalization', self.normalization, NORMALIZATIONS),
                                 ('views', self.views, VIEWS),
                                 ('discriminative', self.discriminative, DISCRIMINATIVE)):
      if value not in allowed:
        raise validation.InputError(f'regularizer {name} must be one of {allowed}, got '
                                    f'{value!r}.')
    for name in ('lambda1', 'lambda2'):
      validation.check_number(getattr(self, name), f'regularizer {name}', minimum=0)
    validation.check_number(self.refresh_every, 'regularizer refresh_every', minimum=0,
                            integer=True, hint='0 never recomputes D.')
    validation.eps(self.eps, 'regularizer eps')
    validation.band(self.band, 'regularizer band')

  @property
  def active(self) -> bool:
    """Whether the terms are computed (also with zero lambdas: then they are only logged)."""
    return self.kind != 'none'

  @property
  def needs_fixed_discriminative(self) -> bool:
    """Whether the training loop must compute D on the pre-trained model first."""
    return self.kind == 'qscore' and self.discriminative == 'fixed'


def batch_discriminative(h: jax.Array, eps: float = stats.DEFAULT_EPS,
                         band: tuple[float, float] = stats.DEFAULT_BAND) -> jax.Array:
  """D computed from the batch itself, bool (d,).

  Args:
    h: representations of the batch (B, d).
    eps: highly-active threshold in per-sample stds (default 4).
    band: percentiles delimiting D (default 50, 95).
  Returns:
    bool (d,).
  """
  return stats.discriminative_features(stats.activation_counts(h, eps), band)


def qscore_terms(h: jax.Array, discriminative: jax.Array, *, eps: float = stats.DEFAULT_EPS,
                 normalization: str = 'sum', stop_gradient: bool = True
                 ) -> dict[str, jax.Array]:
  """The two terms of the Q-Score regularizer on a batch (unweighted), and diagnostics.

  Args:
    h: backbone representations of the (global) batch, (B, d).
    discriminative: membership of D, bool (d,) (checked as by :func:`qscore_jax.stats.qscore`).
    eps: highly-active threshold of Q in per-sample stds (default 4).
    normalization: ``'sum'`` or ``'mean'`` (divide the terms by B resp. d).
    stop_gradient: treat alpha and beta as constants (default True).
  Returns:
    ``low_quality``: -sum_{i: Q_i < alpha} Q_i; ``dense_features``:
    sum_{j: c_j > beta} c_j (each divided by B resp. d with ``'mean'``);
    ``qscore_mean``, ``qscore_min``, ``alpha``, ``beta``, and the counts of
    selected samples and features.
  """
  h = validation.representations(h)
  q = stats.qscore(h, discriminative, eps)
  alpha = jnp.mean(q)
  columns = jnp.sum(jnp.abs(h), axis=0)
  beta = jnp.mean(columns)
  if stop_gradient:
    alpha, beta = lax.stop_gradient(alpha), lax.stop_gradient(beta)
  low = q < alpha
  dense = columns > beta
  low_quality = -jnp.sum(jnp.where(low, q, 0.0))
  dense_features = jnp.sum(jnp.where(dense, columns, 0.0))
  if normalization == 'mean':
    low_quality, dense_features = low_quality / h.shape[0], dense_features / h.shape[1]
  return {'low_quality': low_quality, 'dense_features': dense_features,
          'qscore_mean': jnp.mean(q), 'qscore_min': jnp.min(q), 'alpha': alpha, 'beta': beta,
          'num_low_quality': jnp.sum(low), 'num_dense_features': jnp.sum(dense)}


def l1_penalty(h: jax.Array, normalization: str = 'sum') -> jax.Array:
  """sum_ij |h_ij| (divided by B d with ``'mean'``), a float32 scalar.

  Args:
    h: representations (B, d).
    normalization: ``'sum'`` (default) or ``'mean'``.
  Returns:
    float32 scalar.
  """
  h = validation.representations(h)
  total = jnp.sum(jnp.abs(h))
  return total / h.size if normalization == 'mean' else total


def regularizer(views: list[jax.Array] | tuple[jax.Array, ...], config: RegularizerConfig,
                discriminative: jax.Array | None = None, *, axis_name: str | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The regularizer's value over the chosen views, and its terms for logging.

  Args:
    views: backbone representations per view, each (B, d) (per device under pmap).
    config: the options.
    discriminative: bool (d,), D of the pre-trained model (``discriminative='fixed'``).
    axis_name: the pmap axis, to compute on the global batch.
  Returns:
    ``(value, terms)``: the value to add to the loss (0 when disabled) and a dict of
    scalars (summed over views; Q statistics of the first view).
  """
  if not config.active:
    return jnp.float32(0.0), {}
  chosen = list(views) if config.views == 'all' else list(views)[:1]
  chosen = [gather(h, axis_name) for h in chosen]
  if config.kind == 'l1':
    penalty = sum(l1_penalty(h, config.normalization) for h in chosen)
    return config.lambda1 * penalty, {'l1': penalty}
  value, logged = jnp.float32(0.0), {}
  for index, h in enumerate(chosen):
    if config.discriminative == 'batch':
      members = batch_discriminative(lax.stop_gradient(h), config.eps, config.band)
    elif discriminative is None:
      raise ValueError("regularizer discriminative='fixed' needs the set D of the pre-trained "
                       'model (see qscore_jax.finetune.loop.reference_discriminative).')
    else:
      members = discriminative
    terms = qscore_terms(h, members, eps=config.eps, normalization=config.normalization,
                         stop_gradient=config.stop_gradient)
    value = value + config.lambda1 * terms['low_quality'] + config.lambda2 * terms['dense_features']
    for name in ('low_quality', 'dense_features'):
      logged[name] = logged.get(name, 0.0) + terms[name]
    if index == 0:
      logged.update({k: terms[k] for k in ('qscore_mean', 'qscore_min', 'num_low_quality',
                                           'num_dense_features')})
  return value, logged


__all__ = ['RegularizerConfig', 'batch_discriminative', 'l1_penalty', 'qscore_terms',
           'regularizer']

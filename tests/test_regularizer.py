"""The Q-Score regularizer against a float64 numpy reference and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qscore_jax import regularizer
from qscore_jax.regularizer import RegularizerConfig


def reference(h, discriminative, lambda1, lambda2, eps=4.0, normalization='sum'):
  """METHOD.md's formula, written independently in float64 numpy."""
  h = np.asarray(h, np.float64)
  b, d = h.shape
  q = np.zeros(b)
  for i in range(b):
    mu, sigma = h[i].mean(), h[i].std()
    members = [j for j in range(d) if sigma > 0 and h[i, j] > mu + eps * sigma
               and discriminative[j]]
    q[i] = np.mean([h[i, j] - mu for j in members]) if members else 0.0
  alpha = q.mean()
  columns = np.abs(h).sum(0)
  beta = columns.mean()
  low = -q[q < alpha].sum()
  dense = columns[columns > beta].sum()
  if normalization == 'mean':
    low, dense = low / b, dense / d
  return lambda1 * low + lambda2 * dense


def batch(seed, b=12, d=24):
  """Sparse-ish representations where each row has a few clearly highly active features."""
  rng = np.random.default_rng(seed)
  h = np.abs(rng.standard_normal((b, d))) * 0.3
  for i in range(b):
    h[i, rng.choice(d, 2, replace=False)] += rng.uniform(4, 9, 2)
  return h


def _value(h, d_set, config):
  return regularizer.regularizer([jnp.asarray(h, jnp.float32)], config, jnp.asarray(d_set))[0]


@pytest.mark.parametrize('normalization', ['sum', 'mean'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_value_equals_float64_reference(seed, normalization):
  h = batch(seed)
  d_set = np.random.default_rng(seed + 10).random(h.shape[1]) < 0.6
  config = RegularizerConfig(lambda1=0.3, lambda2=0.01, normalization=normalization)
  ours = float(_value(h, d_set, config))
  assert ours == pytest.approx(reference(h, d_set, 0.3, 0.01, normalization=normalization),
                               rel=1e-5)


@pytest.mark.parametrize('stop_gradient', [True, False])
@pytest.mark.parametrize('seed', [0, 3])
def test_gradient_equals_finite_differences(seed, stop_gradient):
  h = batch(seed)
  d_set = np.ones(h.shape[1], bool)
  config = RegularizerConfig(lambda1=0.5, lambda2=0.02, stop_gradient=stop_gradient)
  grad = np.asarray(jax.grad(lambda x: _value(x, d_set, config))(jnp.asarray(h, jnp.float32)))
  step = 1e-5
  numeric = np.zeros_like(h)
  for index in np.ndindex(*h.shape):
    plus, minus = h.copy(), h.copy()
    plus[index] += step
    minus[index] -= step
    numeric[index] = (reference(plus, d_set, 0.5, 0.02) -
                      reference(minus, d_set, 0.5, 0.02)) / (2 * step)
  assert np.abs(numeric).max() > 0.01  # the terms are not trivially flat here
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


def test_l1_baseline_and_views():
  h1, h2 = batch(4), batch(5)
  config = RegularizerConfig(kind='l1', lambda1=0.1)
  value, _ = regularizer.regularizer([h1, h2], config)
  assert float(value) == pytest.approx(0.1 * (np.abs(h1).sum() + np.abs(h2).sum()), rel=1e-6)
  first = RegularizerConfig(kind='l1', lambda1=0.1, views='first', normalization='mean')
  value, _ = regularizer.regularizer([h1, h2], first)
  assert float(value) == pytest.approx(0.1 * np.abs(h1).mean(), rel=1e-6)


def test_batch_discriminative_set_and_missing_fixed_set():
  h = batch(6)
  config = RegularizerConfig(discriminative='batch', lambda1=1.0, lambda2=0.0)
  value, terms = regularizer.regularizer([h], config)
  members = np.asarray(regularizer.batch_discriminative(jnp.asarray(h, jnp.float32)))
  assert float(value) == pytest.approx(reference(h, members, 1.0, 0.0), rel=1e-5)
  assert float(terms['qscore_mean']) > 0
  with pytest.raises(ValueError, match='needs the set D'):
    regularizer.regularizer([h], RegularizerConfig())


def test_options_are_checked():
  with pytest.raises(ValueError, match="normalization must be one of"):
    RegularizerConfig(normalization='avg')
  with pytest.raises(ValueError, match='>= 0'):
    RegularizerConfig(lambda1=-1.0)

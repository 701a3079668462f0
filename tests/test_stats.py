"""Per-sample statistics against an independent float64 numpy implementation."""

import jax
import numpy as np
import pytest

from qscore_jax import stats


def _numpy_highly_active(h, eps):
  h = np.asarray(h, np.float64)
  mu = h.mean(axis=1, keepdims=True)
  sigma = h.std(axis=1, keepdims=True)  # population std, ddof=0
  return h > mu + eps * sigma, mu[:, 0], sigma[:, 0]


@pytest.mark.parametrize('eps', [4.0, 2.0, 0.5])
def test_moments_and_highly_active_match_float64(eps):
  rng = np.random.default_rng(0)
  # Sparse non-negative rows like pooled ReLU features, plus signed ViT-like rows.
  h = np.concatenate([np.maximum(rng.standard_normal((50, 512)), 0) ** 2,
                      rng.standard_normal((50, 512))]).astype(np.float32)
  expected, mu, sigma = _numpy_highly_active(h, eps)
  got_mu, got_sigma = jax.jit(stats.sample_moments)(h)
  np.testing.assert_allclose(got_mu, mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_sigma, sigma, rtol=1e-5)
  got = np.asarray(jax.jit(stats.highly_active, static_argnums=1)(h, eps))
  # Entries within float32 rounding of the threshold may legitimately flip.
  threshold = mu + eps * sigma
  ambiguous = np.abs(h - threshold[:, None]) < 1e-5 * np.abs(threshold[:, None]) + 1e-6
  assert np.array_equal(got[~ambiguous], expected[~ambiguous])


@pytest.mark.parametrize('row', [np.zeros(64), np.full(64, 0.1), np.full(64, -3.7)])
def test_constant_rows_have_no_active_feature_and_no_nan(row):
  h = np.stack([row, np.arange(64.0)]).astype(np.float32)
  mu, sigma = stats.sample_moments(h)
  assert np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma)) and float(sigma[0]) == 0
  for eps in (4.0, 0.5, 0.0):
    assert not np.asarray(stats.highly_active(h, eps))[0].any()


def test_single_sample_and_vmap():
  h = np.random.default_rng(1).standard_normal((1, 100)).astype(np.float32) ** 3
  expected, _, _ = _numpy_highly_active(h, 4.0)
  assert np.array_equal(np.asarray(stats.highly_active(h)), expected)
  batched = jax.vmap(stats.highly_active)(h[None])
  assert np.array_equal(np.asarray(batched[0]), expected)

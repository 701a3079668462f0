"""The statistics of the Q-Score method, as pure jit-compatible functions.

For representations ``h`` (N, d), sample i and feature j:

    mu_i, sigma_i   mean and population std of row i over the d features
    L_i             {j : h_ij > mu_i + eps * sigma_i}        ("highly active", eps = 4)
    A_j             |{i : j in L_i}| / N                     (activation frequency)
    D               {j : p_lo <= A_j <= p_hi}, p_lo/p_hi the 50th/95th percentiles of
                    the non-zero A_j                         ("discriminative" features)
    Q_i             mean over j in L_i ∩ D of (h_ij - mu_i); 0 when L_i ∩ D is empty
    Q_v1(h)         ((max_j h_j - mean(h)) / std(h)) / ||h||_1   (the paper's first version)

All functions take arrays (no Python loops over samples) and run under
``jax.jit``, ``vmap``, ``pmap`` and ``shard_map``; ``valid`` masks exclude
padding rows from dataset-level counts. D is computed from integer counts, so
it is exact whatever the device layout; Q is a row-wise quantity. Rows that
are constant (including all-zero rows) have sigma = 0, no highly active
feature and Q = 0. Streaming over a store on disk uses the same functions
chunk by chunk (:mod:`qscore_jax.analysis`).

Inputs are checked by :mod:`qscore_jax.validation`. Always, also under
``jax.jit``: h is (N, d) of a real dtype, D a bool mask (d,) (outside a trace
also distinct integer indices, converted to the mask), ``valid`` bool (N,),
counts (d,). On concrete arrays only (skipped for tracers): h has no NaN or
inf and nothing beyond the float32 range (the error names the first rows), eps
is finite and > 0, the band is 0 <= lo < hi <= 100, counts are finite and >= 0.
Inside jitted code, :func:`check_representations` under
``jax.experimental.checkify.checkify`` adds the value checks of h.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qscore_jax import validation
# Re-exported: the opt-in value check and the conversion of indices to D.
from qscore_jax.validation import check_representations, feature_mask  # pylint: disable=unused-import

DEFAULT_EPS = 4.0
DEFAULT_BAND = (50.0, 95.0)


def _varies(h: jax.Array) -> jax.Array:
  """True for rows (..., d) whose entries are not all equal."""
  return jnp.max(h, axis=-1) > jnp.min(h, axis=-1)


def sample_moments(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample mean and population std over the d features.

  Args:
    h: representations (N, d), any real dtype (computed in float32).
  Returns:
    ``(mu, sigma)``, each (N,) float32; sigma is exactly 0 for a constant row.
  Raises:
    InputError: h is not (N, d) real, or (concrete arrays) holds NaN, inf or values
      beyond float32.
  """
  return _moments(validation.representations(h))


def _moments(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`sample_moments` of checked float32 representations."""
  mu = jnp.mean(h, axis=-1)
  # Two-pass variance (never negative). In float32 the mean of a constant row
  # can round away from its entries, leaving a spurious sigma of ~1e-8: such
  # rows are detected exactly and given sigma = 0.
  sigma = jnp.sqrt(jnp.mean(jnp.square(h - mu[..., None]), axis=-1))
  return mu, jnp.where(_varies(h), sigma, 0.0)


def highly_active(h: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
  """Membership of L_i = {j : h_ij > mu_i + eps * sigma_i}, bool (N, d).

  A constant row (sigma_i = 0) has no highly active feature. It is tested
  explicitly: in float32 the mean of a constant row can round below its
  entries, which would otherwise make every entry "active".

  Args:
    h: representations (N, d), any float dtype (computed in float32).
    eps: threshold in per-sample standard deviations above the sample mean
      (default 4).
  Returns:
    bool (N, d), True where feature j is highly active in sample i.
  Raises:
    InputError: as :func:`sample_moments`, or eps not > 0 (concrete).
  """
  h = validation.representations(h)
  return _active_given(h, *_moments(h), validation.eps(eps))


def _active_given(h, mu, sigma, eps):
  """:func:`highly_active` from precomputed moments (sigma is 0 exactly for constant rows)."""
  return (h > (mu + eps * sigma)[..., None]) & (sigma > 0)[..., None]


def activation_counts(h: jax.Array, eps: float = DEFAULT_EPS,
                      valid: jax.Array | None = None) -> jax.Array:
  """Per feature, the number of (valid) rows in which it is highly active: int32 (d,).

  Summed over chunks, devices or processes, the counts give A_j exactly.

  Args:
    h: representations (N, d), any float dtype (computed in float32).
    eps: the highly-active threshold in per-sample stds (default 4).
    valid: optional (N,) bool; rows where it is False (padding) are not counted
      (nor checked for NaN/inf).
  Returns:
    int32 (d,).
  Raises:
    InputError: as :func:`highly_active`, or ``valid`` not bool (N,).
  """
  h = validation.representations(h, valid=valid)
  active = _active_given(h, *_moments(h), validation.eps(eps))
  if valid is not None:
    active = active & jnp.asarray(valid, bool)[:, None]
  return jnp.sum(active, axis=0, dtype=jnp.int32)


def activation_frequency(counts: jax.Array, num_rows) -> jax.Array:
  """A_j = counts_j / N, float32 (d,); zeros when N = 0.

  Args:
    counts: (d,) :func:`activation_counts` (int or float).
    num_rows: N, the number of rows counted (Python or array scalar).
  Raises:
    InputError: counts not (d,), or (concrete) negative counts or N.
  """
  counts = validation.counts(counts)
  if not validation.is_traced(num_rows):
    validation.check_number(num_rows, 'num_rows', minimum=0)
  return jnp.where(num_rows > 0, counts / jnp.maximum(num_rows, 1), 0.0)


def band_limits(counts: jax.Array, band: tuple[float, float] = DEFAULT_BAND,
                nonzero_only: bool = True) -> tuple[jax.Array, jax.Array]:
  """The (p_lo, p_hi) percentiles of the activation counts (NaN when none qualifies).

  Works on counts rather than frequencies: percentiles scale linearly with N,
  and integers are exact, so D does not depend on float rounding.

  Args:
    counts: (d,) :func:`activation_counts` (or A_j).
    band: lower and upper percentiles (default 50 and 95).
    nonzero_only: take the percentiles over the non-zero counts only (default)
      or over all of them.
  Returns:
    ``(p_lo, p_hi)``, two float32 scalars.
  Raises:
    InputError: counts not (d,) (static); negative counts, or a band not
      0 <= lo < hi <= 100 (concrete).
  """
  return _band_limits(validation.counts(counts), validation.band(band), nonzero_only)


def _band_limits(counts, band, nonzero_only):
  """:func:`band_limits` of checked float32 counts and band."""
  pool = jnp.where(counts > 0, counts, jnp.nan) if nonzero_only else counts
  limits = jnp.nanpercentile(pool, jnp.asarray(band, jnp.float32))
  return limits[0], limits[1]


def discriminative_features(counts: jax.Array, band: tuple[float, float] = DEFAULT_BAND,
                            nonzero_only: bool = True) -> jax.Array:
  """Membership of D, bool (d,): features whose activation count lies in the band.

  Args:
    counts: :func:`activation_counts` over the reference split (or A_j: the
      band is scale-invariant).
    band: lower and upper percentiles (default 50 and 95; one third-party
      implementation uses 50 and 90).
    nonzero_only: take the percentiles over the non-zero counts (the paper's
      choice) or over all of them.
  Returns:
    bool (d,). Empty (all False) when no feature is ever highly active.
  Raises:
    InputError: as :func:`band_limits`.
  """
  counts = validation.counts(counts)
  lo, hi = _band_limits(counts, validation.band(band), nonzero_only)
  members = (counts >= lo) & (counts <= hi)
  return members & (counts > 0) if nonzero_only else members


def qscore(h: jax.Array, discriminative: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
  """Q_i = mean over j in L_i ∩ D of (h_ij - mu_i); 0 when that set is empty. (N,) float32.

  Args:
    h: representations (N, d), any float dtype (computed in float32).
    discriminative: the set D: bool (d,) (:func:`discriminative_features`), or
      outside a trace distinct integer feature indices in [0, d) (see
      :func:`qscore_jax.validation.feature_mask`).
    eps: the highly-active threshold defining L_i, in per-sample stds (default 4).
  Returns:
    (N,) float32.
  Raises:
    InputError: as :func:`highly_active`, or D not a mask of length d / valid indices.
  """
  h = validation.representations(h)
  discriminative = validation.feature_mask(discriminative, h.shape[1])
  mu, sigma = _moments(h)
  return _qscore_given(h, mu, _active_given(h, mu, sigma, validation.eps(eps)), discriminative)


def _qscore_given(h, mu, active, discriminative):
  """:func:`qscore` from precomputed means and highly active sets."""
  selected = active & jnp.asarray(discriminative, bool)[None, :]
  count = jnp.sum(selected, axis=-1)
  total = jnp.sum(jnp.where(selected, h - mu[:, None], 0.0), axis=-1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def qscore_v1(h: jax.Array) -> jax.Array:
  """The first version: ((max_j h_j - mean(h)) / std(h)) / ||h||_1; 0 for constant rows.

  Args:
    h: representations (N, d), any float dtype (computed in float32).
  Returns:
    (N,) float32.
  Raises:
    InputError: as :func:`sample_moments`.
  """
  h = validation.representations(h)
  mu, sigma = _moments(h)
  return _qscore_v1_given(h, mu, sigma, jnp.sum(jnp.abs(h), axis=-1))


def _qscore_v1_given(h, mu, sigma, l1):
  """:func:`qscore_v1` from precomputed moments and L1 norms."""
  ok = (sigma > 0) & (l1 > 0)
  score = (jnp.max(h, axis=-1) - mu) / jnp.where(ok, sigma, 1.0) / jnp.where(ok, l1, 1.0)
  return jnp.where(ok, score, 0.0)


def nonfinite_rows(h: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Number of (valid) rows holding a NaN or an infinity (int32 scalar; jit-compatible).

  Only the static checks run (it is meant for non-finite input).

  Args:
    h: representations (N, d).
    valid: optional (N,) bool; rows where it is False are not counted.
  Returns:
    int32 scalar.
  """
  h, valid = validation.check_rows_static(h, valid)
  bad = ~jnp.all(jnp.isfinite(jnp.asarray(h)), axis=-1)
  if valid is not None:
    bad = bad & jnp.asarray(valid)
  return jnp.sum(bad, dtype=jnp.int32)


def check_finite(h, what: str = 'representations') -> None:
  """Raises ``InputError`` naming how many rows of ``h`` hold NaN or inf, and the first ones.

  :func:`check_representations` (which also works under checkify) with the
  arguments of earlier versions.

  Args:
    h: representations (N, d), array-like (concrete).
    what: what the rows are, for the message (default ``'representations'``).
  Raises:
    InputError: a row holds NaN, inf or a value beyond float32.
  """
  check_representations(h, what=what)


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Dataset-level statistics of a reference split.

  Attributes:
    counts: int64 (d,), rows in which each feature is highly active.
    num_rows: N of the reference split.
    discriminative: bool (d,), membership of D.
    band_counts: (p_lo, p_hi) in counts (divide by N for A_j); NaN when D is empty.
    eps, band, nonzero_only: the options they were computed with.
  """
  counts: np.ndarray
  num_rows: int
  discriminative: np.ndarray
  band_counts: tuple[float, float]
  eps: float
  band: tuple[float, float]
  nonzero_only: bool

  @property
  def frequencies(self) -> np.ndarray:
    """A_j, float64 (d,)."""
    return self.counts / max(self.num_rows, 1)

  @property
  def band_frequencies(self) -> tuple[float, float]:
    """``band_counts`` as activation frequencies ``(lo, hi)`` (divided by N)."""
    return tuple(float(c) / max(self.num_rows, 1) for c in self.band_counts)

  @property
  def num_discriminative(self) -> int:
    """|D|, the number of discriminative features."""
    return int(self.discriminative.sum())

  def to_json(self) -> dict[str, Any]:
    """The summary written to ``report.json`` (options, N, d, |D|, band, never-active count)."""
    lo, hi = self.band_frequencies
    return {'eps': self.eps, 'band_percentiles': list(self.band),
            'nonzero_only': self.nonzero_only, 'num_rows': self.num_rows,
            'dim': int(len(self.counts)), 'num_discriminative': self.num_discriminative,
            'band_frequencies': [lo, hi],
            'never_active': int((self.counts == 0).sum())}

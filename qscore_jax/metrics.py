"""Q-Score as a misclassification predictor, its baselines, and dataset-level scores.

One ranking, two views, always reported side by side under the same names
(tables, figures, ``report.json``, the console):

- **correct = positive** (the paper's, METHOD.md): correctly classified samples
  are the positives and the score ranks them; a random score has AUPRC equal to
  the probe's accuracy (``chance_auprc_correct_positive``).
- **error = positive** (finding the probe's mistakes): misclassified samples are
  the positives, ranked by minus the score (low score first); chance AUPRC = the
  error rate (``chance_auprc_error_positive``).

AUROC is one number for both views (chance 0.5). AUPRC is scikit-learn's
average precision, AUROC its ROC AUC; their 95% intervals come from a bootstrap
over the evaluated samples (:func:`bootstrap_areas`).

Baselines (higher = more likely correct): the probe's maximum softmax
probability (uses the probe, trained with labels), the representation L2 norm,
Hoyer sparsity, and k-NN agreement — the fraction of a sample's k nearest
neighbours (cosine, same split) to which the probe assigns the same class as to
the sample (label-free at evaluation time). Dataset-level, label-free:
RankMe (Garrido et al., 2023), alpha-ReQ (Agrawal et al., 2022) and LiDAR
(Thilak et al., 2024; it needs several augmented views of each sample).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as sk_metrics


def misclassification_metrics(score, correct) -> dict[str, float]:
  """AUPRC/AUROC of ``score`` for telling the probe's correct samples from its errors.

  Two views of one ranking, always reported side by side (module docstring):

  - *correct = positive* (the paper's): correctly classified samples are the
    positives, ranked by ``score``; chance AUPRC = the probe's accuracy.
  - *error = positive* (finding mistakes): misclassified samples are the
    positives, ranked by ``-score`` (low score first); chance AUPRC = the error rate.

  AUROC is the same number in both views (swapping the classes and negating the
  score leaves it unchanged); chance is 0.5.

  Args:
    score: (N,) finite scores, higher = predicted correct.
    correct: (N,) bool, whether the probe classified each sample correctly.
  Returns:
    ``auprc_correct_positive``, ``chance_auprc_correct_positive``,
    ``auprc_error_positive``, ``chance_auprc_error_positive``, ``auroc``,
    ``chance_auroc``, ``num_correct`` and ``num_errors``. With a single class
    present the areas are NaN.
  """
  score = np.asarray(score, np.float64)
  correct = np.asarray(correct, bool)
  if score.shape != correct.shape:
    raise ValueError(f'score {score.shape} and correct {correct.shape} differ in shape.')
  if not np.all(np.isfinite(score)):
    raise ValueError(f'{int(np.sum(~np.isfinite(score)))} scores are NaN or inf.')
  accuracy = float(correct.mean()) if len(correct) else float('nan')
  both = 0 < correct.sum() < len(correct)
  nan = float('nan')
  return {
      'auprc_correct_positive':
          float(sk_metrics.average_precision_score(correct, score)) if both else nan,
      'chance_auprc_correct_positive': accuracy,
      'auprc_error_positive':
          float(sk_metrics.average_precision_score(~correct, -score)) if both else nan,
      'chance_auprc_error_positive': 1 - accuracy,
      'auroc': float(sk_metrics.roc_auc_score(correct, score)) if both else nan,
      'chance_auroc': 0.5,
      'num_correct': int(correct.sum()),
      'num_errors': int((~correct).sum()),
  }


# The areas' keys that get bootstrap intervals (``<key>_interval``).
AREAS = ('auprc_correct_positive', 'auprc_error_positive', 'auroc')
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


def _resample_weights(n: int, resamples: int, seed: int, max_cells: int = 4_000_000):
  """Yields (b, n) float64 bootstrap weights (how often each sample is drawn), in blocks."""
  rng = np.random.default_rng(seed)
  block = max(1, min(resamples, max_cells // max(n, 1)))
  for start in range(0, resamples, block):
    rows = min(block, resamples - start)
    draws = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    yield np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def weighted_areas(score: np.ndarray, positive: np.ndarray, weights: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Average precision and ROC AUC of ``score`` under many sample weightings at once.

  The same numbers as scikit-learn's ``average_precision_score`` and ``roc_auc_score``
  with ``sample_weight`` (tied scores form one threshold), vectorised over the rows
  of ``weights`` so that a bootstrap does not call scikit-learn once per resample.

  Args:
    score: (N,) scores, higher = predicted positive.
    positive: (N,) bool labels.
    weights: (B, N) non-negative weights (bootstrap counts).
  Returns:
    ``(average_precision, roc_auc)``, each (B,); NaN where a weighting leaves no
    positive or no negative weight.
  """
  order = np.argsort(-np.asarray(score, np.float64), kind='stable')
  ranked = np.asarray(score, np.float64)[order]
  # The last sample of each run of tied scores: one threshold per distinct score.
  ends = np.flatnonzero(np.r_[np.diff(ranked) != 0, True])
  w = weights[:, order]
  pos = np.asarray(positive, bool)[order]
  tp = np.cumsum(w * pos, axis=1)[:, ends]
  fp = np.cumsum(w * ~pos, axis=1)[:, ends]
  total_pos, total_neg = tp[:, -1:], fp[:, -1:]
  with np.errstate(invalid='ignore', divide='ignore'):
    recall = tp / total_pos
    precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
    ap = np.sum(np.diff(np.c_[np.zeros(len(w)), recall], axis=1) * precision, axis=1)
    tpr = np.c_[np.zeros(len(w)), recall]
    fpr = np.c_[np.zeros(len(w)), fp / total_neg]
    auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
  valid = (total_pos[:, 0] > 0) & (total_neg[:, 0] > 0)
  return np.where(valid, ap, np.nan), np.where(valid, auc, np.nan)


def _percentile_interval(values: np.ndarray, confidence: float) -> list[float] | None:
  values = values[np.isfinite(values)]
  if not len(values):
    return None
  tail = 100 * (1 - confidence) / 2
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return [float(lo), float(hi)]


def bootstrap_areas(score, correct, *, resamples: int = DEFAULT_RESAMPLES,
                    confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> dict[str, Any]:
  """Bootstrap percentile intervals of the areas of :func:`misclassification_metrics`.

  Resamples the evaluated samples with replacement (the probe, hence which
  samples are errors, stays fixed): the interval is the uncertainty that comes
  from having N evaluated samples.

  Args:
    score: (N,) finite scores, higher = predicted correct.
    correct: (N,) bool, whether the probe classified each sample correctly.
    resamples: bootstrap resamples (default 1000).
    confidence: the intervals' coverage (default 0.95).
    seed: NumPy seed of the resampling; the same seed gives the same intervals.
  Returns:
    ``{'<area>_interval': [lo, hi] or None}`` for each area in :data:`AREAS`, and
    ``bootstrap``: ``{'resamples', 'confidence', 'seed', 'valid'}`` (``valid``:
    resamples that held both classes; the others are left out).
  """
  return _bootstrap({'score': score}, correct, resamples, confidence, seed)['score']


def _bootstrap(scores: Mapping[str, Any], correct, resamples: int, confidence: float,
               seed: int) -> dict[str, dict[str, Any]]:
  """:func:`bootstrap_areas` of several scores over the same resamples (drawn once)."""
  correct = np.asarray(correct, bool)
  scores = {name: np.asarray(values, np.float64) for name, values in scores.items()}
  draws = {name: {area: [] for area in AREAS} for name in scores}
  for weights in _resample_weights(len(correct), resamples, seed):
    for name, score in scores.items():
      ap_correct, auroc = weighted_areas(score, correct, weights)
      ap_error, _ = weighted_areas(-score, ~correct, weights)
      draws[name]['auprc_correct_positive'].append(ap_correct)
      draws[name]['auprc_error_positive'].append(ap_error)
      draws[name]['auroc'].append(auroc)
  out = {}
  for name, by_area in draws.items():
    by_area = {k: np.concatenate(v) if v else np.zeros(0) for k, v in by_area.items()}
    out[name] = {f'{area}_interval': _percentile_interval(by_area[area], confidence)
                 for area in AREAS}
    out[name]['bootstrap'] = {'resamples': resamples, 'confidence': confidence, 'seed': seed,
                              'valid': int(np.isfinite(by_area['auroc']).sum())}
  return out


def bootstrap_mean(values, *, resamples: int = DEFAULT_RESAMPLES,
                   confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> list[float] | None:
  """Bootstrap percentile interval of the mean of ``values``.

  Args:
    values: (N,) finite values (e.g. per-image IoUs, or paired differences).
    resamples: bootstrap resamples (default 1000).
    confidence: coverage (default 0.95).
    seed: NumPy seed of the resampling.
  Returns:
    ``[lo, hi]``, or None for an empty ``values``.
  """
  values = np.asarray(values, np.float64)
  if not len(values):
    return None
  means = np.concatenate([w @ values / len(values)
                          for w in _resample_weights(len(values), resamples, seed)])
  return _percentile_interval(means, confidence)


def spearman(x, y, *, resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
             seed: int = 0) -> dict[str, Any]:
  """Spearman's rank correlation of two samples, with a bootstrap percentile interval.

  Ranks are averaged over ties (as :func:`scipy.stats.spearmanr`); each resample draws
  the N pairs with replacement and ranks them again.

  Args:
    x: (N,) finite values.
    y: (N,) finite values.
    resamples: bootstrap resamples (0: no interval).
    confidence: the interval's coverage (default 0.95).
    seed: NumPy seed of the resampling.
  Returns:
    ``{'rho', 'interval': [lo, hi] or None, 'n'}``; rho is NaN when either sample is
    constant.
  """
  # scipy (installed with scikit-learn) only for these rank statistics.
  from scipy import stats as scipy_stats  # pylint: disable=import-outside-toplevel
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'spearman needs two (N,) samples of equal length, got {x.shape} and '
                     f'{y.shape}.')
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError('spearman: the samples hold NaN or inf.')

  def rho(a, b):  # rows are samples: (R, N) -> (R,)
    ra, rb = scipy_stats.rankdata(a, axis=-1), scipy_stats.rankdata(b, axis=-1)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    scale = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(scale > 0, (ra * rb).sum(-1) / np.where(scale > 0, scale, 1), np.nan)

  value = float(rho(x[None], y[None])[0]) if len(x) > 1 else float('nan')
  interval = None
  if resamples and len(x) > 1:
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    values = rho(x[draws], y[draws])
    interval = _percentile_interval(values[np.isfinite(values)], confidence)
  return {'rho': value, 'interval': interval, 'n': int(len(x))}


def knn_agreement(h: np.ndarray, predictions: np.ndarray, k: int = 10,
                  chunk_rows: int = 2048) -> np.ndarray:
  """Fraction of each sample's k nearest neighbours (cosine, excluding itself) that the
  probe puts in the same class as the sample; (N,) float32. Memory O(chunk x N).

  Args:
    h: representations (N, d).
    predictions: (N,) integer classes the probe predicts.
    k: number of neighbours (default 10; at most N - 1; all ones when N < 2).
    chunk_rows: rows whose similarities are computed at once (default 2048).
  """
  h = np.asarray(h, np.float32)
  n = len(h)
  k = min(k, n - 1)
  if k < 1:
    return np.ones(n, np.float32)
  normed = jnp.asarray(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12))
  predictions = jnp.asarray(predictions)

  @jax.jit
  def block(start, rows):
    similarity = rows @ normed.T
    own = start + jnp.arange(rows.shape[0])
    similarity = similarity.at[jnp.arange(rows.shape[0]), own].set(-jnp.inf)  # not itself
    _, neighbours = jax.lax.top_k(similarity, k)
    return jnp.mean(predictions[neighbours] == predictions[own][:, None], axis=-1)

  out = np.zeros(n, np.float32)
  for start in range(0, n, chunk_rows):
    rows = normed[start:start + chunk_rows]
    if rows.shape[0] < chunk_rows and n > chunk_rows:  # keep one compiled shape
      pad = jnp.zeros((chunk_rows - rows.shape[0], rows.shape[1]), rows.dtype)
      values = block(start, jnp.concatenate([rows, pad]))[:rows.shape[0]]
    else:
      values = block(start, rows)
    out[start:start + rows.shape[0]] = np.asarray(values)
  return out


def nearest_neighbours(h: np.ndarray, k: int, chunk_rows: int = 1024) -> np.ndarray:
  """Each sample's k nearest neighbours by cosine similarity, excluding itself; (N, k) int.

  Computed in float64 on the host, ``chunk_rows`` rows at a time (memory O(chunk x N));
  neighbours in order of decreasing similarity, ties broken by the lower index.

  Args:
    h: representations (N, d).
    k: number of neighbours, 1 <= k <= N - 1.
    chunk_rows: rows whose similarities are computed at once (default 1024).
  Returns:
    (N, k) int64 row indices.
  Raises:
    ValueError: k outside [1, N - 1].
  """
  h = np.asarray(h, np.float64)
  n = len(h)
  if not 1 <= k <= n - 1:
    raise ValueError(f'k nearest neighbours need 1 <= k <= N - 1 = {n - 1}, got k = {k}.')
  normed = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-300)
  out = np.zeros((n, k), np.int64)
  for start in range(0, n, chunk_rows):
    similarity = normed[start:start + chunk_rows] @ normed.T
    rows = np.arange(similarity.shape[0])
    similarity[rows, start + rows] = -np.inf  # not itself
    out[start:start + len(rows)] = np.argsort(-similarity, axis=1, kind='stable')[:, :k]
  return out


def neighbourhood_consistency(representations, k: int = 10, chunk_rows: int = 1024
                              ) -> np.ndarray:
  """How much the encoders agree on each sample's neighbours; (N,) float64 in [0, 1].

  For every pair of encoders (a, b), the share of sample i's k nearest neighbours
  (cosine, same split) in a's space that are also among its k nearest in b's,
  averaged over the pairs. Label-free; a sample whose neighbourhood depends on the
  encoder is one none of them represents reliably.

  Args:
    representations: a sequence of at least two (N, d_m) arrays, the same N samples in
      the same order, embedded by different encoders (widths may differ).
    k: neighbours per sample (default 10; at most N - 1).
    chunk_rows: rows whose similarities are computed at once (default 1024).
  Returns:
    (N,) float64.
  Raises:
    ValueError: fewer than two encoders, or different numbers of samples.
  """
  spaces = [np.asarray(h) for h in representations]
  if len(spaces) < 2:
    raise ValueError(f'neighbourhood consistency compares encoders: it needs at least two, '
                     f'got {len(spaces)}.')
  sizes = {len(h) for h in spaces}
  if len(sizes) != 1:
    raise ValueError(f'neighbourhood consistency needs the same samples from every encoder, '
                     f'got {sorted(sizes)} rows.')
  neighbours = [nearest_neighbours(h, k, chunk_rows) for h in spaces]
  total = np.zeros(len(spaces[0]))
  pairs = [(a, b) for a in range(len(spaces)) for b in range(a + 1, len(spaces))]
  for a, b in pairs:
    # Each row's two neighbour lists hold no repeats, so the values that occur twice in
    # their sorted concatenation are the shared neighbours.
    both = np.sort(np.concatenate([neighbours[a], neighbours[b]], axis=1), axis=1)
    total += np.sum(both[:, 1:] == both[:, :-1], axis=1) / k
  return total / len(pairs)


def _spectrum(h: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
  h = np.asarray(h, np.float64)
  if len(h) > max_rows:
    h = h[np.sort(np.random.default_rng(seed).choice(len(h), max_rows, replace=False))]
  return np.linalg.svd(h, compute_uv=False)


def rankme(h: np.ndarray, *, max_rows: int = 25600, eps: float = 1e-7, seed: int = 0) -> float:
  """RankMe: exp of the entropy of the normalised singular values of H (N x d).

  ``p_k = sigma_k / ||sigma||_1 + eps``; RankMe = exp(-sum_k p_k log p_k), between 1
  and min(N, d). At most ``max_rows`` rows (a seeded random subset) are used.

  Args:
    h: representations (N, d) (computed in float64).
    max_rows: at most this many rows are used (default 25600).
    eps: added to every p_k (default 1e-7).
    seed: seed of the row subset.
  Returns:
    RankMe as a float (1.0 for an all-zero H).
  """
  singular = _spectrum(h, max_rows, seed)
  if singular.sum() == 0:
    return 1.0
  p = singular / singular.sum() + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def lidar(views: np.ndarray, *, delta: float = 1e-4, eps: float = 1e-7) -> float:
  """LiDAR (Thilak et al., 2024): the effective rank of the LDA matrix of the SSL task.

  Each of n samples is a surrogate class whose members are its q augmented views.
  With mu_i the mean of sample i's views and mu the mean of the mu_i::

      Sigma_b = 1/(n-1) sum_i (mu_i - mu)(mu_i - mu)^T
      Sigma_w = 1/(n(q-1)) sum_i sum_j (e_ij - mu_i)(e_ij - mu_i)^T + delta I
      Sigma   = Sigma_w^(-1/2) Sigma_b Sigma_w^(-1/2)

  and, with lambda the eigenvalues of Sigma, ``p_k = lambda_k / ||lambda||_1 + eps``,
  LiDAR = exp(-sum_k p_k log p_k), between 1 and min(n - 1, d). The eigenvalues of
  Sigma are those of the symmetric-definite pencil (Sigma_b, Sigma_w), which is how
  they are computed.

  Args:
    views: (n, q, d) embeddings of q >= 2 augmented views of each of n >= 2 samples
      (computed in float64).
    delta: the ridge added to Sigma_w (default 1e-4).
    eps: added to every p_k (default 1e-7, as RankMe).
  Returns:
    LiDAR as a float (1.0 when the sample means do not vary).
  Raises:
    ValueError: ``views`` not (n, q, d) with n >= 2 and q >= 2, or not finite.
  """
  # scipy (installed with scikit-learn) only for this score's generalised eigenproblem.
  from scipy import linalg  # pylint: disable=import-outside-toplevel
  views = np.asarray(views, np.float64)
  if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
    raise ValueError(f'LiDAR needs views of shape (n, q, d) with n >= 2 samples and q >= 2 '
                     f'views each, got {views.shape}.')
  if not np.isfinite(views).all():
    raise ValueError('LiDAR: the views hold NaN or inf.')
  n, q, d = views.shape
  means = views.mean(axis=1)
  between = np.cov(means, rowvar=False, ddof=1).reshape(d, d)
  spread = (views - means[:, None]).reshape(n * q, d)
  within = spread.T @ spread / (n * (q - 1)) + delta * np.eye(d)
  eigenvalues = np.clip(linalg.eigh(between, within, eigvals_only=True), 0, None)
  if eigenvalues.sum() == 0:
    return 1.0
  p = eigenvalues / eigenvalues.sum() + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def alpha_req(h: np.ndarray, *, max_rows: int = 25600, seed: int = 0,
              fit_range: tuple[float, float] = (0.0, 1.0)) -> float:
  """alpha-ReQ: the decay exponent alpha of the eigenspectrum, lambda_k ~ k^(-alpha).

  Eigenvalues of the covariance of the centred representations, fitted by least
  squares in log-log space over the non-negligible eigenvalues (those above
  1e-10 of the largest), optionally restricted to a fraction ``fit_range`` of
  the ranks.

  Args:
    h: representations (N, d) (computed in float64).
    max_rows: at most this many rows (a seeded random subset) are used
      (default 25600).
    seed: seed of the row subset.
    fit_range: ``(lo, hi)`` fractions of the ranks the fit uses (default all).
  Returns:
    alpha as a float; NaN with fewer than two non-negligible eigenvalues.
  """
  h = np.asarray(h, np.float64)
  singular = _spectrum(h - h.mean(0), max_rows, seed)
  eigen = singular ** 2 / max(len(h) - 1, 1)
  eigen = eigen[eigen > eigen.max() * 1e-10] if eigen.max() > 0 else eigen[:0]
  if len(eigen) < 2:
    return float('nan')
  lo, hi = int(fit_range[0] * len(eigen)), max(int(fit_range[1] * len(eigen)), 2)
  ranks = np.arange(1, len(eigen) + 1)[lo:hi]
  slope, _ = np.polyfit(np.log(ranks), np.log(eigen[lo:hi]), 1)
  return float(-slope)


def score_table(scores: Mapping[str, np.ndarray], correct: np.ndarray, *,
                resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                seed: int = 0) -> dict[str, dict[str, Any]]:
  """:func:`misclassification_metrics` and :func:`bootstrap_areas` for every named score.

  Args:
    scores: ``{name: (N,) scores}``.
    correct: (N,) bool, whether each sample is correctly classified.
    resamples: bootstrap resamples of the intervals (0: no intervals).
    confidence: the intervals' coverage (default 0.95).
    seed: seed of the resampling (the same resamples for every score).
  Returns:
    ``{name: metrics dict}`` (with ``<area>_interval`` and ``bootstrap`` when
    ``resamples`` > 0).
  """
  table = {name: misclassification_metrics(values, correct) for name, values in scores.items()}
  if resamples:
    for name, intervals in _bootstrap(scores, correct, resamples, confidence, seed).items():
      table[name].update(intervals)
  return table

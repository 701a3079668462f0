"""Q-Score as a misclassification predictor, its baselines, and dataset-level scores.

Convention (METHOD.md): *correctly classified is the positive class and the
score is the ranking*, so a random score has AUPRC equal to the probe's
accuracy (the chance level reported beside it) and AUROC 0.5. The mirrored view
— misclassified as positive, ranked by minus the score — is reported too.
AUPRC is scikit-learn's average precision, AUROC its ROC AUC.

Baselines (higher = more likely correct): the probe's maximum softmax
probability (uses the probe, trained with labels), the representation L2 norm,
Hoyer sparsity, and k-NN agreement — the fraction of a sample's k nearest
neighbours (cosine, same split) to which the probe assigns the same class as to
the sample (label-free at evaluation time). Dataset-level, label-free:
RankMe (Garrido et al., 2023) and alpha-ReQ (Agrawal et al., 2022).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics as sk_metrics


def misclassification_metrics(score, correct) -> dict[str, float]:
  """AUPRC/AUROC of ``score`` for predicting that a sample is correctly classified.

  Args:
    score: (N,) finite scores, higher = predicted correct.
    correct: (N,) bool, whether the probe classified each sample correctly.
  Returns:
    ``auprc``, ``auroc`` (correct positive, score as ranking), ``auprc_mirrored``
    (misclassified positive, ranked by -score), their chance levels, and the
    positive rate. With a single class present the areas are NaN.
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
      'auprc': float(sk_metrics.average_precision_score(correct, score)) if both else nan,
      'auroc': float(sk_metrics.roc_auc_score(correct, score)) if both else nan,
      'auprc_mirrored': float(sk_metrics.average_precision_score(~correct, -score)) if both else nan,
      'chance_auprc': accuracy,
      'chance_auprc_mirrored': 1 - accuracy,
      'chance_auroc': 0.5,
      'positive_rate': accuracy,
  }


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


def score_table(scores: Mapping[str, np.ndarray], correct: np.ndarray) -> dict[str, dict[str, Any]]:
  """:func:`misclassification_metrics` for every named score.

  Args:
    scores: ``{name: (N,) scores}``.
    correct: (N,) bool, whether each sample is correctly classified.
  Returns:
    ``{name: metrics dict}``.
  """
  return {name: misclassification_metrics(values, correct) for name, values in scores.items()}

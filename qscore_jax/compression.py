"""Compression: linear accuracy when only some feature dimensions are kept.

Features are ranked by how discriminative they are — members of D first
(closest to the middle of the band first), then the others by their distance
(in activation frequency) to the band — and the probe is retrained on the top
``(1 - r) d`` features for each removed fraction ``r``, against random subsets
of the same size over several seeds. Keeping exactly D is reported as its own
point. The paper's claim: no significant loss up to about 40% removed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qscore_jax import validation
from qscore_jax.probe import ProbeConfig, evaluate_probe, train_linear_probe
from qscore_jax.stats import FeatureStats


def discriminativeness_ranking(feature: FeatureStats) -> np.ndarray:
  """Feature indices, most discriminative first (a permutation of range(d)).

  Args:
    feature: the reference split's :class:`~qscore_jax.stats.FeatureStats`
      (activation frequencies, band and D).
  Returns:
    (d,) int indices: members of D by distance to the band's centre, then the
    others by distance to the band; the given order when no feature is ever
    highly active.
  """
  a = feature.frequencies
  lo, hi = feature.band_frequencies
  if not np.isfinite(lo):  # no feature ever highly active: keep the given order
    return np.arange(len(a))
  centre = (lo + hi) / 2
  distance = np.where(feature.discriminative, np.abs(a - centre) - 2.0,  # D first
                      np.where(a < lo, lo - a, a - hi))
  return np.lexsort((np.arange(len(a)), distance))


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """Options of the compression curve.

  Attributes:
    fractions_removed: fractions r of the d dimensions removed; the probe is
      retrained on the top ``max(1, round((1 - r) d))`` (default 0, 0.1, ..., 0.9).
    random_seeds: one random subset of the same size per seed (default 0, 1, 2).
    probe: the probe retrained at every point (default 30 epochs).
  """
  fractions_removed: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  random_seeds: tuple[int, ...] = (0, 1, 2)
  probe: ProbeConfig = ProbeConfig(epochs=30)

  def __post_init__(self):
    if not len(self.fractions_removed):
      raise validation.InputError('compression fractions_removed is empty: give at least one '
                                  'fraction in [0, 1), e.g. (0.0, 0.5, 0.9).')
    for fraction in self.fractions_removed:
      validation.check_number(fraction, 'compression fractions_removed entry', minimum=0,
                              below=1)
    if not len(self.random_seeds):
      raise validation.InputError('compression random_seeds is empty: give at least one seed '
                                  '(qscore analyze --compression-seeds 1 or more), or skip the '
                                  'curve (--no-compression).')


def _evaluate(train_h, train_y, eval_h, eval_y, num_classes, columns, probe_config):
  probe = train_linear_probe(np.asarray(train_h[:, columns]), train_y, num_classes, probe_config)
  return evaluate_probe(probe, np.asarray(eval_h[:, columns]), eval_y)


def _accuracy(*args):
  return _evaluate(*args)['top1']


def _paired_se(before: np.ndarray, after: np.ndarray) -> float:
  """Standard error of the mean of ``before - after`` (per-sample correctness, 0/1)."""
  delta = before.astype(np.float64) - after.astype(np.float64)
  return float(np.std(delta, ddof=1) / np.sqrt(len(delta))) if len(delta) > 1 else float('nan')


def compression_curve(train_h: np.ndarray, train_y: np.ndarray, eval_h: np.ndarray,
                      eval_y: np.ndarray, num_classes: int, feature: FeatureStats,
                      config: CompressionConfig = CompressionConfig()) -> dict[str, Any]:
  """Linear accuracy vs fraction of dimensions removed: ranked, random, and D only.

  Args:
    train_h: (N_train, d) float representations training the probe (array or
      row/column-indexable memory map).
    train_y: (N_train,) integer labels.
    eval_h: (N_eval, d) float representations it is evaluated on.
    eval_y: (N_eval,) integer labels.
    num_classes: number of classes.
    feature: the reference split's :class:`~qscore_jax.stats.FeatureStats`
      (ranks the features, gives D).
    config: fractions, seeds and probe (:class:`CompressionConfig`).
  Returns:
    ``{'fractions_removed', 'kept', 'ranked', 'random_mean', 'random_std', 'random',
    'ranked_loss_se', 'discriminative_only': {'kept', 'accuracy'}}`` (accuracies as
    fractions). ``ranked_loss_se`` is the standard error of the ranked probe's loss
    against the first point with nothing removed, paired over the evaluated samples
    (None without such a point); ``random_std`` the population std over the seeds.
  """
  d = train_h.shape[1]
  order = discriminativeness_ranking(feature)
  rows: dict[str, list] = {'fractions_removed': [], 'kept': [], 'ranked': [], 'random_mean': [],
                           'random_std': [], 'random': [], 'ranked_loss_se': []}
  full = None  # per-sample correctness with every feature kept
  for fraction in config.fractions_removed:
    kept = max(1, int(round((1 - fraction) * d)))
    result = _evaluate(train_h, train_y, eval_h, eval_y, num_classes, np.sort(order[:kept]),
                       config.probe)
    ranked = result['top1']
    if fraction == 0 and full is None:
      full = result['correct']
    randoms = [_accuracy(train_h, train_y, eval_h, eval_y, num_classes,
                         np.sort(np.random.default_rng(seed).choice(d, kept, replace=False)),
                         config.probe)
               for seed in config.random_seeds]
    rows['fractions_removed'].append(float(fraction))
    rows['kept'].append(kept)
    rows['ranked'].append(ranked)
    rows['ranked_loss_se'].append(None if full is None else _paired_se(full, result['correct']))
    rows['random'].append(randoms)
    rows['random_mean'].append(float(np.mean(randoms)))
    rows['random_std'].append(float(np.std(randoms)))
  members = np.flatnonzero(feature.discriminative)
  rows['discriminative_only'] = {
      'kept': int(len(members)),
      'accuracy': (_accuracy(train_h, train_y, eval_h, eval_y, num_classes, members, config.probe)
                   if len(members) else float('nan'))}
  return rows


def as_table(curve: dict[str, Any]) -> list[dict[str, Any]]:
  """Rows for report.json / Markdown: removed fraction, kept, ranked and random accuracy.

  Args:
    curve: the dict returned by :func:`compression_curve`.
  Returns:
    One dict per point: ``removed``, ``kept``, ``ranked``, ``random_mean``,
    ``random_std``, ``ranked_loss_se``.
  """
  losses = curve.get('ranked_loss_se') or [None] * len(curve['kept'])
  return [{'removed': f, 'kept': k, 'ranked': r, 'random_mean': m, 'random_std': s,
           'ranked_loss_se': e}
          for f, k, r, m, s, e in zip(curve['fractions_removed'], curve['kept'], curve['ranked'],
                                      curve['random_mean'], curve['random_std'], losses)]


__all__ = ['CompressionConfig', 'as_table', 'compression_curve', 'discriminativeness_ranking']

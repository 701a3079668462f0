"""The judged claims (qscore_jax.findings) and the intervals they rest on (qscore_jax.metrics)."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from qscore_jax import compression, findings, metrics, saliency
from qscore_jax.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED


# ------------------------------------------------------------------ bootstrap intervals


def test_weighted_areas_equal_sklearn_with_sample_weights_and_ties():
  rng = np.random.default_rng(3)
  n = 300
  score = np.round(rng.normal(size=n), 1)  # many ties
  score[:80] = 0.0  # like Q = 0 for samples without a discriminative feature
  positive = rng.random(n) < 0.65
  weights = rng.multinomial(n, np.full(n, 1 / n), size=25).astype(float)
  ap, auc = metrics.weighted_areas(score, positive, weights)
  for b in range(len(weights)):
    assert ap[b] == pytest.approx(
        sk_metrics.average_precision_score(positive, score, sample_weight=weights[b]), abs=1e-12)
    assert auc[b] == pytest.approx(
        sk_metrics.roc_auc_score(positive, score, sample_weight=weights[b]), abs=1e-12)
  # Unit weights: the plain areas.
  ap, auc = metrics.weighted_areas(score, positive, np.ones((1, n)))
  assert ap[0] == pytest.approx(sk_metrics.average_precision_score(positive, score), abs=1e-12)
  # A weighting without negatives has no area.
  ap, auc = metrics.weighted_areas(score, positive, positive[None].astype(float))
  assert np.isnan(ap[0]) and np.isnan(auc[0])


def test_bootstrap_intervals_are_seeded_and_cover_the_estimate():
  rng = np.random.default_rng(0)
  correct = rng.random(400) < 0.7
  score = rng.standard_normal(400) + correct
  table = metrics.score_table({'q': score}, correct)['q']
  again = metrics.bootstrap_areas(score, correct)
  for area in metrics.AREAS:
    lo, hi = table[f'{area}_interval']
    assert lo < table[area] < hi and again[f'{area}_interval'] == [lo, hi]
  assert table['bootstrap'] == {'resamples': 1000, 'confidence': 0.95, 'seed': 0, 'valid': 1000}
  other = metrics.bootstrap_areas(score, correct, seed=1)
  assert other['auroc_interval'] != table['auroc_interval']
  # Against scipy's bootstrap (percentile method) of the same statistic: the same interval
  # up to Monte-Carlo error.
  from scipy import stats  # pylint: disable=import-outside-toplevel
  reference = stats.bootstrap((score, correct), lambda s, c: sk_metrics.roc_auc_score(c, s),
                              paired=True, vectorized=False, n_resamples=1000,
                              method='percentile', random_state=0).confidence_interval
  assert table['auroc_interval'] == pytest.approx([reference.low, reference.high], abs=0.015)
  # The interval narrows like 1/sqrt(N).
  wide = metrics.bootstrap_areas(score[:100], correct[:100])['auroc_interval']
  assert wide[1] - wide[0] > 1.5 * (table['auroc_interval'][1] - table['auroc_interval'][0])
  assert 'auroc_interval' not in metrics.score_table({'q': score}, correct, resamples=0)['q']


def test_bootstrap_mean_interval():
  values = np.random.default_rng(1).normal(0.3, 0.1, size=2000)
  lo, hi = metrics.bootstrap_mean(values)
  se = values.std(ddof=1) / np.sqrt(len(values))
  assert lo == pytest.approx(values.mean() - 1.96 * se, abs=se / 4)
  assert hi == pytest.approx(values.mean() + 1.96 * se, abs=se / 4)
  assert metrics.bootstrap_mean(np.zeros(0)) is None


# ------------------------------------------------------------------ the verdict rules


def test_effect_and_no_loss_rules():
  assert findings.effect_verdict(0.2, (0.1, 0.3), 0.05) == SUPPORTED
  assert findings.effect_verdict(0.01, (-0.02, 0.04), 0.05) == NOT_SUPPORTED
  assert findings.effect_verdict(-0.2, (-0.3, -0.1), 0.05) == NOT_SUPPORTED  # the reverse
  assert findings.effect_verdict(0.04, (-0.05, 0.13), 0.05) == INCONCLUSIVE
  # Significant but too small to matter is not "supported".
  assert findings.effect_verdict(0.03, (0.01, 0.06), 0.05) == INCONCLUSIVE
  assert findings.effect_verdict(0.2, (0.1, 0.3), 0.05, enough=False) == INCONCLUSIVE
  assert findings.effect_verdict(0.2, None, 0.05) == INCONCLUSIVE
  assert findings.no_loss_verdict(0.0, (-0.01, 0.01), 0.02) == SUPPORTED
  assert findings.no_loss_verdict(0.1, (0.05, 0.15), 0.02) == NOT_SUPPORTED
  assert findings.no_loss_verdict(0.01, (-0.03, 0.05), 0.02) == INCONCLUSIVE
  assert findings.no_loss_verdict(0.0, (-0.01, 0.01), 0.02, enough=False) == INCONCLUSIVE


def _misclassification(score, correct):
  return findings.misclassification_finding(metrics.score_table({'qscore': score}, correct))


def test_a_score_that_separates_perfectly_finds_the_errors():
  correct = np.random.default_rng(0).random(300) < 0.7
  finding = _misclassification(correct.astype(float) + 0.1, correct)
  assert finding['verdict'] == SUPPORTED and finding['estimate'] == 1.0
  assert finding['interval'] == [1.0, 1.0]
  assert 'AUROC of Q 1.000 [1.000, 1.000]' in finding['evidence']


def test_a_random_score_does_not():
  rng = np.random.default_rng(1)
  correct = rng.random(5000) < 0.7
  finding = _misclassification(rng.random(5000), correct)
  assert finding['verdict'] == NOT_SUPPORTED, finding
  assert finding['interval'][0] < 0.5 < finding['interval'][1] < 0.55


def test_a_tiny_sample_is_inconclusive_even_when_it_separates():
  correct = np.array([True] * 8 + [False] * 4)
  finding = _misclassification(correct.astype(float), correct)
  assert finding['verdict'] == INCONCLUSIVE and finding['interval'] == [1.0, 1.0]
  assert 'too few samples (4 errors, 8 correct samples' in finding['reason']
  # A noisy score on a small sample: the interval holds both chance and a useful AUROC.
  rng = np.random.default_rng(2)
  correct = rng.random(60) < 0.6
  finding = _misclassification(rng.standard_normal(60) + 0.3 * correct, correct)
  assert finding['verdict'] == INCONCLUSIVE and 'holds both' in finding['reason']


def _table(ranked, random_mean, random_std, loss_se=0.005, removed=(0.0, 0.4, 0.9)):
  return [{'removed': r, 'kept': int(100 * (1 - r)), 'ranked': a, 'random_mean': m,
           'random_std': s, 'ranked_loss_se': loss_se if r else 0.0}
          for r, a, m, s in zip(removed, ranked, random_mean, random_std)]


def test_compression_rules():
  kept = findings.compression_finding(_table((0.80, 0.80, 0.60), (0.80, 0.79, 0.70),
                                             (0.0, 0.002, 0.01)), 1000)
  assert kept['verdict'] == SUPPORTED and kept['removed'] == 0.4 and kept['estimate'] == 0.0
  # Beside the verdict the evidence says where Q's order loses to random subsets.
  assert '90% removed (60.0% vs 70.0 ± 1.0)' in kept['evidence']
  lost = findings.compression_finding(_table((0.80, 0.70, 0.60), (0.80, 0.75, 0.7),
                                             (0.0, 0.005, 0.01)), 1000)
  assert lost['verdict'] == NOT_SUPPORTED and lost['estimate'] == pytest.approx(0.1)
  noisy = findings.compression_finding(_table((0.80, 0.79, 0.60), (0.80, 0.79, 0.7),
                                              (0.0, 0.03, 0.01)), 1000)
  assert noisy['verdict'] == INCONCLUSIVE
  tiny = findings.compression_finding(_table((0.8, 0.8, 0.6), (0.8, 0.8, 0.6), (0, 0, 0)), 10)
  assert tiny['verdict'] == INCONCLUSIVE and 'too few evaluated samples (10' in tiny['reason']
  # Without a point between 0 and 40% removed there is nothing to judge.
  far = findings.compression_finding(_table((0.8, 0.6), (0.8, 0.7), (0, 0.01),
                                            removed=(0.0, 0.9)), 1000)
  assert far['verdict'] == INCONCLUSIVE and far['estimate'] is None
  assert findings.compression_finding([], 1000) is None


def test_compression_curve_reports_the_paired_standard_error_of_the_loss():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 600)
  h = rng.normal(size=(600, 12)).astype(np.float32)
  h[np.arange(600), y] += 3.0
  from qscore_jax import streaming  # pylint: disable=import-outside-toplevel
  from qscore_jax.probe import ProbeConfig  # pylint: disable=import-outside-toplevel
  feature = streaming.feature_stats(h[:400], eps=1.0)
  curve = compression.compression_curve(
      h[:400], y[:400], h[400:], y[400:], 3, feature,
      compression.CompressionConfig(fractions_removed=(0.0, 0.5), random_seeds=(0,),
                                    probe=ProbeConfig(epochs=3, batch_size=64)))
  table = compression.as_table(curve)
  assert table[0]['ranked_loss_se'] == 0.0 and 0 <= table[1]['ranked_loss_se'] < 0.05


def _per_image(core, core_chance, n):
  rng = np.random.default_rng(4)
  return {'core_iou': np.clip(core + 0.05 * rng.standard_normal(n), 0, 1),
          'core_iou_baseline': np.clip(core_chance + 0.05 * rng.standard_normal(n), 0, 1),
          'spurious_iou': np.full(n, 0.2), 'spurious_iou_baseline': np.full(n, 0.2),
          **{k: np.ones(n, bool) for k in ('core_defined', 'spurious_defined',
                                           'core_baseline_defined', 'spurious_baseline_defined',
                                           'has_target')},
          'num_targets': np.ones(n, int), 'correct': rng.random(n) < 0.7}


@pytest.mark.parametrize('core, chance, n, verdict', [
    (0.5, 0.1, 200, SUPPORTED), (0.1, 0.1, 2000, NOT_SUPPORTED), (0.05, 0.2, 200, NOT_SUPPORTED),
    (0.5, 0.1, 10, INCONCLUSIVE)])
def test_localisation_rules(core, chance, n, verdict):
  summary = saliency.summarize_ious(_per_image(core, chance, n))
  finding = findings.localisation_finding(summary['all'])
  assert finding['verdict'] == verdict, finding
  over = summary['all']['core_over_chance']
  assert finding['estimate'] == over['mean'] and over['count'] == n
  assert over['interval'][0] <= over['mean'] <= over['interval'][1]

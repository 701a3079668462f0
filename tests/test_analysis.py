"""Linear probe, compression and the full analysis on small planted data."""

import json

import numpy as np
import pytest

from qscore_jax import analysis, compression, streaming
from qscore_jax.probe import ProbeConfig, evaluate_probe, train_linear_probe


def _planted(n=600, d=64, classes=4, seed=0, noise=1.0):
  """Class-dependent sparse non-negative features: a few dimensions carry the class."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  h = np.abs(rng.standard_normal((n, d))) * 0.3
  for c in range(classes):
    rows = labels == c
    h[rows, 4 * c:4 * c + 4] += rng.gamma(4.0, 1.0, (rows.sum(), 4)) * noise
  return h.astype(np.float32), labels


def test_probe_learns_and_is_reproducible():
  h, y = _planted()
  config = ProbeConfig(epochs=20, batch_size=64)
  probe = train_linear_probe(h[:400], y[:400], 4, config)
  result = evaluate_probe(probe, h[400:], y[400:])
  assert result['top1'] > 0.95 and result['top5'] == 1.0
  assert probe.losses[-1] < probe.losses[0]
  again = train_linear_probe(h[:400], y[:400], 4, config)
  np.testing.assert_array_equal(probe.kernel, again.kernel)
  other = train_linear_probe(h[:400], y[:400], 4, ProbeConfig(epochs=20, batch_size=64, seed=1))
  assert not np.array_equal(probe.kernel, other.kernel)
  assert result['correct'].dtype == bool and result['max_softmax'].shape == (200,)
  assert np.all((result['max_softmax'] > 0.25) & (result['max_softmax'] <= 1))


@pytest.mark.parametrize('norm', ['standardize', 'l2', 'none'])
def test_probe_feature_norms_and_schedules(norm):
  h, y = _planted(noise=2.0)
  for schedule in ('step', 'cosine'):
    config = ProbeConfig(epochs=10, batch_size=50, feature_norm=norm, schedule=schedule,
                         learning_rate=0.05)
    probe = train_linear_probe(h, y, 4, config)
    assert evaluate_probe(probe, h, y)['top1'] > 0.8


def test_probe_rejects_bad_inputs():
  h, y = _planted(n=20)
  with pytest.raises(ValueError, match='labels must lie in 0..2'):
    train_linear_probe(h, y, 3)
  with pytest.raises(ValueError, match='as many labels'):
    train_linear_probe(h, y[:5], 4)
  with pytest.raises(ValueError, match='feature_norm'):
    ProbeConfig(feature_norm='batchnorm')


def test_discriminativeness_ranking_puts_d_first():
  h, _ = _planted()
  feature = streaming.feature_stats(h)
  order = compression.discriminativeness_ranking(feature)
  assert sorted(order) == list(range(64))
  k = feature.num_discriminative
  assert k > 0 and set(order[:k]) == set(np.flatnonzero(feature.discriminative))


def test_compression_curve_and_full_analysis(tmp_path):
  h, y = _planted(n=800, seed=1)
  train = analysis.Split.from_arrays(h[:600], y[:600], 'train')
  test = analysis.Split.from_arrays(h[600:], y[600:], 'test')
  config = analysis.AnalysisConfig(
      probe=ProbeConfig(epochs=15, batch_size=64),
      compression=compression.CompressionConfig(fractions_removed=(0.0, 0.5, 0.9),
                                                random_seeds=(0, 1),
                                                probe=ProbeConfig(epochs=8, batch_size=64)))
  report = analysis.analyze(train, test, tmp_path, class_names=['a', 'b', 'c', 'd'], config=config)
  on_disk = json.loads((tmp_path / 'report.json').read_text())
  assert on_disk['probe']['top1'] == report['probe']['top1'] > 0.9
  for name in ('qscore', 'qscore_v1', 'max_softmax', 'l2_norm', 'hoyer_sparsity', 'knn_agreement'):
    row = on_disk['misclassification'][name]
    assert set(row) >= {'auprc_correct_positive', 'auprc_error_positive', 'auroc',
                        'chance_auprc_correct_positive', 'chance_auprc_error_positive',
                        'auprc_correct_positive_interval', 'auroc_interval'}
    if row['num_errors']:
      assert row['auroc_interval'][0] <= row['auroc'] <= row['auroc_interval'][1]
    else:  # a probe without errors: no area, no interval, and the claim is not judged
      assert np.isnan(row['auroc']) and row['auroc_interval'] is None
  if not on_disk['misclassification']['qscore']['num_errors']:
    assert on_disk['findings'][0]['verdict'] == 'inconclusive'
  assert on_disk['dataset_level']['rankme'] > 1
  assert [r['removed'] for r in on_disk['compression']] == [0.0, 0.5, 0.9]
  # The planted class dimensions are discriminative: ranked beats random at 90% removed.
  last = on_disk['compression'][-1]
  assert last['ranked'] > last['random_mean']
  for figure in on_disk['figures'].values():
    assert (tmp_path / figure).stat().st_size > 5000
  scores = np.load(tmp_path / 'scores.npz')
  assert scores['score_qscore'].shape == (200,) and scores['correct'].dtype == bool
  assert len(analysis.summary_lines(report)) >= 8


def test_analysis_refuses_nonfinite_representations(tmp_path):
  h, y = _planted(n=100)
  h[5] = np.nan
  split = analysis.Split.from_arrays(h, y)
  with pytest.raises(ValueError, match='1 of 100 rows of the representations contain NaN'):
    analysis.analyze(split, split, tmp_path, config=analysis.AnalysisConfig(compression=None))

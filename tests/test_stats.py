"""Statistics against an independent float64 numpy implementation, and streaming versions."""

import jax
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

import qscore_jax
from qscore_jax import metrics, stats, streaming


# ------------------------------------------------------------------ reference

def reference(h, eps=4.0, band=(50.0, 95.0), nonzero_only=True):
  """The definitions of METHOD.md, in float64, written independently of qscore_jax."""
  h = np.asarray(h, np.float64)
  n, d = h.shape
  mu = h.mean(axis=1)
  sigma = h.std(axis=1)
  constant = h.max(axis=1) == h.min(axis=1)
  active = (h > (mu + eps * sigma)[:, None]) & ~constant[:, None]
  a = active.sum(axis=0) / n
  pool = a[a > 0] if nonzero_only else a
  if pool.size:
    lo, hi = np.percentile(pool, band)
    member = (a >= lo) & (a <= hi)
    if nonzero_only:
      member &= a > 0
  else:
    member = np.zeros(d, bool)
  q = np.zeros(n)
  for i in range(n):
    chosen = active[i] & member
    if chosen.any():
      q[i] = np.mean(h[i, chosen] - mu[i])
  l1 = np.abs(h).sum(axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    v1 = np.where((sigma > 0) & (l1 > 0) & ~constant, (h.max(axis=1) - mu) / sigma / l1, 0.0)
  return {'mu': mu, 'sigma': np.where(constant, 0, sigma), 'active': active, 'a': a,
          'member': member, 'q': q, 'v1': v1}


def _representations(seed=0, n=300, d=256, signed=False):
  rng = np.random.default_rng(seed)
  if signed:  # ViT-like
    h = rng.standard_normal((n, d)) + 0.3 * rng.standard_normal((n, 1))
  else:  # pooled ReLU features: sparse, heavy-tailed, with a few shared active features
    h = np.maximum(rng.standard_normal((n, d)) * rng.gamma(1.0, 1.0, d), 0) ** 2
    h[:, :8] += rng.gamma(2.0, 2.0, (n, 8)) * (rng.random((n, 8)) < 0.3)
  return h.astype(np.float32)


def _check(h, **options):
  ref = reference(h, **options)
  counts = np.asarray(jax.jit(stats.activation_counts, static_argnums=1)(h, options.get('eps', 4.0)))
  np.testing.assert_array_equal(counts, ref['active'].sum(0))
  member = np.asarray(stats.discriminative_features(
      counts, options.get('band', (50.0, 95.0)), options.get('nonzero_only', True)))
  np.testing.assert_array_equal(member, ref['member'])
  q = np.asarray(jax.jit(stats.qscore, static_argnums=2)(h, member, options.get('eps', 4.0)))
  np.testing.assert_allclose(q, ref['q'], rtol=1e-5, atol=1e-6 * np.abs(ref['q']).max(initial=1))
  v1 = np.asarray(stats.qscore_v1(h))
  np.testing.assert_allclose(v1, ref['v1'], rtol=1e-5, atol=1e-12)
  mu, sigma = (np.asarray(x) for x in stats.sample_moments(h))
  np.testing.assert_allclose(mu, ref['mu'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, ref['sigma'], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(q)) and np.all(np.isfinite(v1))
  return ref


@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('options', [{}, {'eps': 2.0}, {'band': (50.0, 90.0)},
                                     {'nonzero_only': False}])
def test_statistics_equal_float64_reference(signed, options):
  ref = _check(_representations(signed=signed), **options)
  assert 0 < ref['member'].sum() < len(ref['member'])  # a meaningful D


def test_edge_cases_zero_and_constant_rows_n1_d1_empty_d():
  h = _representations(n=50, d=64)
  h[3] = 0.0  # all-zero row
  h[7] = 0.1  # constant row (its float32 mean rounds away from 0.1)
  h[9] = -2.5
  ref = _check(h)
  assert ref['q'][3] == ref['q'][7] == ref['q'][9] == 0
  q = np.asarray(stats.qscore(h, ref['member']))
  assert q[3] == q[7] == q[9] == 0
  _check(h[:1])  # N = 1
  _check(h[:, :1])  # d = 1: sigma = 0 everywhere, empty D, Q = 0
  assert not np.asarray(stats.discriminative_features(np.zeros(10, np.int32))).any()  # empty D
  q = np.asarray(stats.qscore(h, np.zeros(64, bool)))
  assert np.all(q == 0)


def test_statistics_are_exported_at_package_level_and_jit_inside_user_code():
  h = _representations(n=64, d=32)

  @jax.jit
  def users_step(h):
    counts = qscore_jax.activation_counts(h)
    return qscore_jax.qscore(h, qscore_jax.discriminative_features(counts))

  np.testing.assert_allclose(np.asarray(users_step(h)), reference(h)['q'], rtol=1e-5, atol=1e-6)
  vmapped = jax.vmap(lambda x: qscore_jax.highly_active(x))(h[None])
  np.testing.assert_array_equal(np.asarray(vmapped[0]), reference(h)['active'])


def test_nonfinite_rows_are_a_clear_error():
  h = _representations(n=40, d=16)
  h[2, 3] = np.nan
  h[5, 0] = np.inf
  assert int(stats.nonfinite_rows(h)) == 2
  with pytest.raises(ValueError, match='2 of 40 rows of the representations contain NaN or inf'):
    stats.check_finite(h)
  with pytest.raises(ValueError, match='2 of 40 rows'):
    streaming.feature_stats(h, chunk_rows=16)


# Chunks are rounded to multiples of streaming.BLOCK_ROWS (256): 301 rows are two
# chunks (one padded) with chunk_rows=7 or 256, one chunk with 1000.
@pytest.mark.parametrize('chunk_rows', [7, 256, 1000])
def test_streaming_equals_in_memory(chunk_rows):
  h = _representations(n=301, d=128)
  ref = reference(h)
  feature = streaming.feature_stats(h, chunk_rows=chunk_rows)
  np.testing.assert_array_equal(feature.counts, ref['active'].sum(0))
  np.testing.assert_array_equal(feature.discriminative, ref['member'])
  scores = streaming.sample_scores(h, feature, chunk_rows=chunk_rows)
  np.testing.assert_allclose(scores['qscore'], ref['q'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(scores['num_active'], ref['active'].sum(1))
  np.testing.assert_array_equal(scores['num_active_discriminative'],
                                (ref['active'] & ref['member']).sum(1))
  np.testing.assert_allclose(scores['l2_norm'], np.linalg.norm(h.astype(np.float64), axis=1),
                             rtol=1e-5)


def test_streaming_scores_all_equal_float64():
  """Every score of pass 2 against float64, on ReLU-like and signed rows with constant rows,
  and its non-finite check: exact on NaN/inf rows, silent on finite rows whose sum overflows."""
  h = np.concatenate([_representations(n=200, d=96), _representations(seed=1, n=200, d=96,
                                                                       signed=True)])
  h[3] = 0.0
  h[7] = 2.5  # constant, nonzero
  ref = reference(h)
  feature = streaming.feature_stats(h, chunk_rows=256)
  scores = streaming.sample_scores(h, feature, chunk_rows=256)
  h64 = h.astype(np.float64)
  l1, l2 = np.abs(h64).sum(1), np.linalg.norm(h64, axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    hoyer = np.where(l2 > 0, (np.sqrt(96) - l1 / l2) / (np.sqrt(96) - 1), 0.0)
  expected = {'qscore': ref['q'], 'qscore_v1': ref['v1'], 'l2_norm': l2, 'hoyer_sparsity': hoyer,
              'mean': ref['mu'], 'std': ref['sigma']}
  for name, value in expected.items():
    np.testing.assert_allclose(scores[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(scores['num_active'], ref['active'].sum(1))
  np.testing.assert_array_equal(scores['num_active_discriminative'],
                                (ref['active'] & feature.discriminative).sum(1))
  assert scores['std'][3] == scores['std'][7] == 0 and scores['num_active'][7] == 0
  huge = h.copy()
  huge[10] = 3e38  # finite, but its sum overflows float32: not a bad row
  assert np.isfinite(streaming.sample_scores(huge, feature, chunk_rows=256)['mean']).sum() == 399
  huge[12, 5], huge[13, 0], huge[13, 1] = np.nan, np.inf, -np.inf
  with pytest.raises(ValueError, match=r'2 of 400 rows .*NaN or inf.* 12, 13'):
    streaming.sample_scores(huge, feature, chunk_rows=256)


def _lidar_reference(views, delta=1e-4, eps=1e-7):
  """LiDAR from the paper's definition, in float64, written independently of qscore_jax:
  the explicit inverse square root of Sigma_w and the eigenvalues of the product."""
  views = np.asarray(views, np.float64)
  n, q, d = views.shape
  mu_i = views.mean(1)
  mu = mu_i.mean(0)
  sigma_b = sum(np.outer(m - mu, m - mu) for m in mu_i) / (n - 1)
  sigma_w = sum(np.outer(e - mu_i[i], e - mu_i[i]) for i in range(n) for e in views[i])
  sigma_w = sigma_w / (n * (q - 1)) + delta * np.eye(d)
  w_eig, w_vec = np.linalg.eigh(sigma_w)
  inv_sqrt = w_vec @ np.diag(w_eig ** -0.5) @ w_vec.T
  lam = np.linalg.eigvalsh(inv_sqrt @ sigma_b @ inv_sqrt)
  lam = np.clip(lam, 0, None)
  p = lam / lam.sum() + eps
  return np.exp(-np.sum(p * np.log(p)))


def test_lidar_equals_its_definition_in_float64():
  rng = np.random.default_rng(0)
  for n, q, d in ((40, 2, 8), (64, 4, 16), (30, 3, 48)):  # the last: d > n, a singular Sigma_b
    centres = rng.standard_normal((n, d)) * rng.gamma(1.0, 1.0, d)
    views = centres[:, None] + 0.3 * rng.standard_normal((n, q, d))
    assert np.isclose(metrics.lidar(views), _lidar_reference(views), rtol=1e-5)
  # Views that agree perfectly in k directions and are noise elsewhere: LiDAR sees about k.
  k, d = 5, 32
  signal = np.zeros((200, 1, d))
  signal[..., :k] = rng.standard_normal((200, 1, k)) * 3
  views = signal + 0.05 * rng.standard_normal((200, 4, d)) * (np.arange(d) >= k)
  assert abs(metrics.lidar(views) - k) < 0.6
  assert metrics.lidar(np.ones((10, 2, 4))) == 1.0
  with pytest.raises(ValueError, match=r'n >= 2 samples and q >= 2 views'):
    metrics.lidar(rng.standard_normal((10, 1, 4)))


def test_rankme_and_alpha_req_equal_their_definitions_in_float64():
  """RankMe (Garrido et al., 2023): exp of the entropy of p_k = sigma_k / ||sigma||_1 + eps
  over the singular values of H; alpha-ReQ (Agrawal et al., 2022): minus the least-squares
  slope of log lambda_k against log k over the covariance's eigenvalues. Here from the
  eigenvalues of H^T H and of the covariance (not an SVD), and the slope in closed form."""
  rng = np.random.default_rng(3)
  for n, d in ((300, 12), (50, 80)):  # the second: fewer rows than features
    h = rng.standard_normal((n, d)) * rng.gamma(1.0, 1.0, d) + rng.standard_normal(d)
    gram = np.linalg.eigvalsh(h.T @ h) if n >= d else np.linalg.eigvalsh(h @ h.T)
    sigma = np.sqrt(np.clip(gram, 0, None))[::-1]
    p = sigma / sigma.sum() + 1e-7
    assert np.isclose(metrics.rankme(h), np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    centred = h - h.mean(0)
    eigen = np.sort(np.linalg.eigvalsh(centred.T @ centred / (n - 1)))[::-1]
    eigen = eigen[eigen > eigen[0] * 1e-10]
    x, y = np.log(np.arange(1, len(eigen) + 1)), np.log(eigen)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    assert np.isclose(metrics.alpha_req(h), -slope, rtol=1e-5)


def test_neighbourhood_consistency_equals_a_float64_reference():
  rng = np.random.default_rng(0)
  n, k = 120, 7
  base = rng.standard_normal((n, 12))
  spaces = [base @ rng.standard_normal((12, 16)), base + 0.5 * rng.standard_normal((n, 12)),
            rng.standard_normal((n, 9))]  # two related encoders and an unrelated one

  def neighbours(h):  # brute force, float64, independently of qscore_jax
    normed = h / np.linalg.norm(h, axis=1, keepdims=True)
    return [set(sorted((j for j in range(n) if j != i), key=lambda j: -normed[i] @ normed[j])[:k])
            for i in range(n)]

  sets = [neighbours(h) for h in spaces]
  expected = np.array([np.mean([len(sets[a][i] & sets[b][i]) / k
                                for a, b in ((0, 1), (0, 2), (1, 2))]) for i in range(n)])
  got = metrics.neighbourhood_consistency(spaces, k=k, chunk_rows=50)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  related = metrics.neighbourhood_consistency(spaces[:2], k=k)
  assert related.mean() > 0.3 > metrics.neighbourhood_consistency([spaces[0], spaces[2]], k=k).mean()
  assert (metrics.neighbourhood_consistency([spaces[0], spaces[0]], k=k) == 1).all()
  with pytest.raises(ValueError, match='at least two'):
    metrics.neighbourhood_consistency(spaces[:1])
  with pytest.raises(ValueError, match=r'same samples .*\[60, 120\]'):
    metrics.neighbourhood_consistency([spaces[0][:60], spaces[1]])


def test_misclassification_metrics_equal_sklearn():
  rng = np.random.default_rng(0)
  correct = rng.random(500) < 0.7
  score = rng.standard_normal(500) + correct
  m = metrics.misclassification_metrics(score, correct)
  assert m['auprc_correct_positive'] == sk_metrics.average_precision_score(correct, score)
  assert m['auroc'] == sk_metrics.roc_auc_score(correct, score)
  # AUROC is one number for both views.
  assert np.isclose(m['auroc'], sk_metrics.roc_auc_score(~correct, -score), atol=1e-12)
  assert m['auprc_error_positive'] == sk_metrics.average_precision_score(~correct, -score)
  assert m['chance_auprc_correct_positive'] == correct.mean()
  assert m['chance_auprc_error_positive'] == 1 - correct.mean()
  assert m['auprc_correct_positive'] > m['chance_auprc_correct_positive'] and m['auroc'] > 0.5
  assert (m['num_correct'], m['num_errors']) == (correct.sum(), (~correct).sum())
  one_class = metrics.misclassification_metrics(score, np.ones(500, bool))
  assert np.isnan(one_class['auprc_correct_positive']) and np.isnan(one_class['auroc'])


def test_knn_agreement_rankme_alpha_req():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((4, 16)) * 5
  labels = np.repeat(np.arange(4), 25)
  h = centres[labels] + rng.standard_normal((100, 16))
  agreement = metrics.knn_agreement(h, labels, k=5, chunk_rows=32)
  assert agreement.shape == (100,) and agreement.mean() > 0.95
  # Against a direct float64 computation.
  normed = h / np.linalg.norm(h, axis=1, keepdims=True)
  sim = normed @ normed.T
  np.fill_diagonal(sim, -np.inf)
  neighbours = np.argsort(-sim, axis=1)[:, :5]
  np.testing.assert_allclose(agreement, (labels[neighbours] == labels[:, None]).mean(1))
  # RankMe of an isotropic Gaussian is close to d; of a rank-3 matrix close to 3.
  assert metrics.rankme(rng.standard_normal((2000, 16))) > 15
  low_rank = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 16))
  assert metrics.rankme(low_rank) < 3.2
  # alpha-ReQ recovers a planted power law.
  d, alpha = 64, 1.5
  spectrum = np.arange(1, d + 1) ** (-alpha / 2)
  planted = rng.standard_normal((20000, d)) * spectrum
  assert abs(metrics.alpha_req(planted, max_rows=20000) - alpha) < 0.15

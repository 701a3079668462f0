"""Inputs are checked at the boundary (issue 17, finding 7): a wrong D, valid, h, eps, band or
config value is a clear error, never a silent wrong number; valid inputs give the numbers
they gave before; the static checks hold under jax.jit and the value checks are opt-in there."""

import re

import jax
import numpy as np
import pytest
from jax.experimental import checkify

import qscore_jax
from qscore_jax import (analysis, cli, compression, probe, regularizer, saliency, streaming,
                        validation)
from qscore_jax.configs import experiment as experiment_config
from qscore_jax.configs import finetune as finetune_config

InputError = validation.InputError


def _h(n=96, d=48, seed=17):
  rng = np.random.default_rng(seed)
  return (np.maximum(rng.standard_normal((n, d)), 0) ** 2 * rng.gamma(1.0, 1.0, d)).astype(
      np.float32)


def _d(h, eps=2.0):
  return np.asarray(qscore_jax.discriminative_features(qscore_jax.activation_counts(h, eps)))


# ------------------------------------------------------------------ the same numbers as before

# Computed by main at commit 70d2804 on _h() with eps = 2 (before the checks existed).
MAIN_COUNTS = [18, 10, 0, 3, 3, 0, 0, 10, 7, 3, 0, 3, 0, 15, 0, 10, 5, 4, 0, 1, 18, 5, 0, 2, 9, 1,
               15, 0, 1, 4, 7, 12, 3, 6, 7, 5, 0, 6, 8, 15, 0, 2, 0, 0, 0, 1, 0, 3]
MAIN_D = [1, 7, 8, 13, 15, 16, 21, 24, 26, 30, 31, 33, 34, 35, 37, 38, 39]
MAIN_Q_FIRST = [8.24609088897705, 0.0, 1.700007438659668, 3.10825252532959, 0.0,
                1.9548065662384033, 3.5674312114715576, 37.81560516357422]
MAIN_Q_SUM = 458.61798095703125
MAIN_V1_SUM = 25.261516571044922
MAIN_BAND_COUNTS = (5.0, 16.19999885559082)
MAIN_TERMS = (-122.46240234375, 1713.232666015625)


def test_valid_inputs_give_the_numbers_main_gave():
  h = _h()
  counts = np.asarray(qscore_jax.activation_counts(h, 2.0))
  np.testing.assert_array_equal(counts, MAIN_COUNTS)
  member = np.asarray(qscore_jax.discriminative_features(counts))
  np.testing.assert_array_equal(np.flatnonzero(member), MAIN_D)
  q = np.asarray(qscore_jax.qscore(h, member, 2.0))
  np.testing.assert_allclose(q[:8], MAIN_Q_FIRST, rtol=1e-6)
  np.testing.assert_allclose(q.sum(), MAIN_Q_SUM, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(qscore_jax.qscore_v1(h)).sum(), MAIN_V1_SUM, rtol=1e-6)
  feature = streaming.feature_stats(h, eps=2.0, chunk_rows=16)
  np.testing.assert_array_equal(feature.counts, MAIN_COUNTS)
  np.testing.assert_allclose(feature.band_counts, MAIN_BAND_COUNTS, rtol=1e-6)
  scores = streaming.sample_scores(h, feature, chunk_rows=16)
  np.testing.assert_allclose(scores['qscore'].sum(), MAIN_Q_SUM, rtol=1e-6)
  terms = regularizer.qscore_terms(h, member, eps=2.0)
  np.testing.assert_allclose((float(terms['low_quality']), float(terms['dense_features'])),
                             MAIN_TERMS, rtol=1e-6)


# ------------------------------------------------------------------ D

def test_a_count_vector_as_d_is_an_error():
  h = _h()
  counts = np.asarray(qscore_jax.activation_counts(h, 2.0))
  with pytest.raises(InputError, match='looks like a count vector'):
    qscore_jax.qscore(h, counts, 2.0)


def test_an_index_list_selects_those_features_only():
  h = _h()
  mask = np.zeros(48, bool)
  mask[2] = True
  np.testing.assert_array_equal(np.asarray(qscore_jax.qscore(h, [2], 2.0)),
                                np.asarray(qscore_jax.qscore(h, mask, 2.0)))
  member = np.zeros(48, bool)
  member[MAIN_D] = True
  np.testing.assert_array_equal(np.asarray(qscore_jax.qscore(h, MAIN_D, 2.0)),
                                np.asarray(qscore_jax.qscore(h, member, 2.0)))
  assert np.asarray(qscore_jax.feature_mask([2, 5], 48)).sum() == 2
  with pytest.raises(InputError, match=r'must lie in \[0, 48\), got 48'):
    qscore_jax.qscore(h, [2, 48])
  with pytest.raises(InputError, match=r'must lie in \[0, 48\), got -1'):
    qscore_jax.qscore(h, [-1])


def test_a_float_mask_as_d_is_an_error():
  h = _h()
  with pytest.raises(InputError, match='got float32 values: a float or count vector is not a set'):
    qscore_jax.qscore(h, _d(h).astype(np.float32))


def test_a_d_of_another_length_is_an_error_not_a_broadcast():
  h = _h()
  with pytest.raises(InputError, match='has 1 entries but the representations have d = 48'):
    qscore_jax.qscore(h, np.array([True]))
  with pytest.raises(InputError, match='must be one-dimensional'):
    qscore_jax.qscore(h, _d(h)[None])
  feature = streaming.feature_stats(_h(d=32), chunk_rows=16)
  with pytest.raises(InputError, match="reference split's D .* has 32 entries"):
    streaming.sample_scores(h, feature, chunk_rows=16)
  with pytest.raises(InputError, match='has 1 entries'):
    saliency.selection_of(h, np.array([True]))


# ------------------------------------------------------------------ h

def test_a_nan_row_is_an_error_naming_it_not_a_zero_q():
  h = _h()
  h[3, 1] = np.nan
  h[7, 0] = np.inf
  for call in (lambda: qscore_jax.qscore(h, _d(_h())), lambda: qscore_jax.activation_counts(h),
               lambda: qscore_jax.qscore_v1(h), lambda: qscore_jax.sample_moments(h)):
    with pytest.raises(InputError, match=r'2 of 96 rows of the representations contain NaN or '
                                         r'inf \(rows 3, 7\)'):
      call()
  # Padding rows (valid False) are neither counted nor checked.
  valid = np.ones(96, bool)
  valid[[3, 7]] = False
  np.testing.assert_array_equal(np.asarray(qscore_jax.activation_counts(h, 2.0, valid)),
                                np.asarray(qscore_jax.activation_counts(_h()[valid], 2.0)))


def test_the_streaming_passes_name_the_first_bad_rows():
  h = _h(n=300)
  h[[20, 260, 261, 270, 280, 290, 299], 0] = np.nan
  with pytest.raises(InputError, match=r'7 of 300 rows .* \(rows 20, 260, 261, 270, 280, \.\.\.\)'):
    streaming.feature_stats(h, chunk_rows=16)
  feature = streaming.feature_stats(_h(n=300), chunk_rows=16)
  with pytest.raises(InputError, match=r'7 of 300 rows .* \(rows 20, 260'):
    streaming.sample_scores(h, feature, chunk_rows=16)


def test_float64_beyond_float32_is_an_error_not_zero_counts():
  h = _h().astype(np.float64)
  h[4, 2] = 1e39
  with pytest.raises(InputError, match=r'1 of 96 rows .* beyond the float32 range .*row 4\)'):
    qscore_jax.activation_counts(h)
  with pytest.raises(InputError, match=r'beyond the float32 range .*row 4\)'):
    qscore_jax.qscore(h, _d(_h()))
  with pytest.raises(InputError, match=r'1 of 96 rows .* beyond the float32 range .*row 4\)'):
    streaming.feature_stats(h, chunk_rows=16)


def test_representations_of_a_wrong_shape_or_dtype_are_errors():
  with pytest.raises(InputError, match=r'must have shape \(N, d\).*got shape \(48,\)'):
    qscore_jax.highly_active(_h()[0])
  with pytest.raises(InputError, match='must hold real numbers'):
    qscore_jax.activation_counts(_h() > 1)


# ------------------------------------------------------------------ valid, counts, options

def test_valid_must_be_bool_of_length_n():
  h = _h()
  with pytest.raises(InputError, match=r'valid must be a bool mask of shape \(96,\).*float64'):
    qscore_jax.activation_counts(h, valid=np.zeros(1))
  with pytest.raises(InputError, match=r'valid must have shape \(96,\).*got shape \(1,\)'):
    qscore_jax.activation_counts(h, valid=np.zeros(1, bool))
  with pytest.raises(InputError, match='valid must be a bool mask'):
    qscore_jax.nonfinite_rows(h, np.ones(96))


def test_discriminative_features_refuses_2d_or_negative_counts():
  counts = np.asarray(qscore_jax.activation_counts(_h(), 2.0))
  with pytest.raises(InputError, match=r'must have shape \(d,\).*got shape \(2, 48\)'):
    qscore_jax.discriminative_features(np.stack([counts, counts]))
  with pytest.raises(InputError, match='must be finite and >= 0'):
    qscore_jax.discriminative_features(counts - 5)


@pytest.mark.parametrize('band', [(0.0, 200.0), (95.0, 50.0), (50.0, 50.0), (float('nan'), 95.0),
                                  (50.0,)])
def test_a_band_out_of_range_is_an_error(band):
  counts = np.asarray(qscore_jax.activation_counts(_h(), 2.0))
  with pytest.raises(InputError, match='band must be two percentiles'):
    qscore_jax.discriminative_features(counts, band)
  with pytest.raises(InputError, match='band must be two percentiles'):
    streaming.feature_stats(_h(), band=band)
  with pytest.raises(InputError, match='band must be two percentiles'):
    analysis.AnalysisConfig(band=band)
  with pytest.raises(InputError, match='regularizer band must be two percentiles'):
    regularizer.RegularizerConfig(band=band)


@pytest.mark.parametrize('eps', [-1.0, 0.0, float('nan'), float('inf')])
def test_eps_must_be_finite_and_positive(eps):
  h = _h()
  with pytest.raises(InputError, match='eps must be a finite number > 0'):
    qscore_jax.highly_active(h, eps)
  with pytest.raises(InputError, match='eps must be a finite number > 0'):
    qscore_jax.qscore(h, _d(h), eps)
  with pytest.raises(InputError, match='eps must be a finite number > 0'):
    streaming.feature_stats(h, eps=eps)
  with pytest.raises(InputError, match='eps must be a finite number > 0'):
    analysis.AnalysisConfig(eps=eps)
  with pytest.raises(InputError, match='regularizer eps must be a finite number > 0'):
    regularizer.RegularizerConfig(eps=eps)
  with pytest.raises(InputError, match='eps must be a finite number > 0'):
    saliency.InterpretConfig(eps=eps)


@pytest.mark.parametrize('make, message', [
    (lambda: analysis.AnalysisConfig(knn_k=0), 'knn_k must be an integer >= 1'),
    (lambda: analysis.AnalysisConfig(chunk_rows=-5), 'chunk_rows must be an integer >= 1'),
    (lambda: probe.ProbeConfig(learning_rate=-0.1), 'probe learning_rate must be a finite'),
    (lambda: probe.ProbeConfig(learning_rate=float('nan')), 'probe learning_rate must be'),
    (lambda: probe.ProbeConfig(momentum=1.5), 'probe momentum must be'),
    (lambda: compression.CompressionConfig(random_seeds=()), 'random_seeds is empty'),
    (lambda: compression.CompressionConfig(fractions_removed=(0.5, 1.0)),
     'fractions_removed entry must be a finite number >= 0 and < 1'),
    (lambda: regularizer.RegularizerConfig(refresh_every=-1), 'refresh_every must be an integer'),
    (lambda: regularizer.RegularizerConfig(lambda1=float('nan')), 'regularizer lambda1 must be'),
])
def test_options_objects_check_their_ranges(make, message):
  with pytest.raises(InputError, match=message):
    make()


def test_supervised_config_checks_its_ranges():
  # Imported here, not at the top: it pulls in the data pipeline (TensorFlow).
  from qscore_jax import supervised  # pylint: disable=import-outside-toplevel
  with pytest.raises(InputError, match='steps must be an integer >= 1, got -5'):
    supervised.SupervisedConfig(steps=-5)
  with pytest.raises(InputError, match='learning_rate must be a finite number > 0'):
    supervised.SupervisedConfig(learning_rate=0.0)


# ------------------------------------------------------------------ configs and the CLI

@pytest.mark.parametrize('override, message', [
    ('num_steps=-5', "config field 'num_steps' must be an integer >= 1, got -5. Give -1"),
    ('num_steps=0', "config field 'num_steps' must be an integer >= 1"),
    ('batch_size=0', "config field 'batch_size' must be an integer >= 1"),
    ('num_epochs=-1', "config field 'num_epochs' must be a finite number > 0"),
    ('optimizer.learning_rate=-1e-5', "config field 'optimizer.learning_rate' must be"),
    ('loss.temperature=0', "config field 'loss.temperature' must be"),
    ('regularizer.eps=-1', 'regularizer eps must be a finite number > 0'),
    ('regularizer.band=95:50', 'regularizer band must be two percentiles'),
    ('regularizer.reference_examples=0', "'regularizer.reference_examples' must be"),
])
def test_finetune_config_fields_check_their_ranges(override, message):
  with pytest.raises(InputError, match=message):
    cli.load_config('finetune', [override])
  with pytest.raises(InputError, match=message):
    finetune_config.get_config(override)


def test_finetune_config_accepts_the_valid_edge_values():
  config = cli.load_config('finetune', ['num_steps=-1', 'num_steps=3',
                                        'optimizer.learning_rate=none',
                                        'regularizer.band=0:100', 'ema_base=1.0'])
  assert config.num_steps == 3 and config.regularizer.band == (0, 100)
  assert finetune_config.check_config(finetune_config.get_config()) is not None


@pytest.mark.parametrize('override, message', [
    ('pretrain_steps=-5', "'pretrain_steps' must be an integer >= 1"),
    ('compression_removed=0.5:1.5', "'compression_removed' entry must be"),
    ('regularizer.lambda1=-1', 'regularizer lambda1 must be a finite number >= 0'),
])
def test_experiment_config_fields_check_their_ranges(override, message):
  with pytest.raises(InputError, match=message):
    experiment_config.get_config(override)


@pytest.mark.parametrize('options, message', [
    (['--eps', '-1'], 'eps must be a finite number > 0, got -1.0'),
    (['--eps', 'nan'], 'eps must be a finite number > 0, got nan'),
    (['--band', '95', '50'],
     r'band must be two percentiles with 0 <= lo < hi <= 100, got \(95, 50\)'),
    (['--knn-k', '0'], 'knn_k must be an integer >= 1'),
    (['--probe-lr', '-0.1'], 'probe learning_rate must be'),
    (['--compression-seeds', '0'], 'random_seeds is empty'),
])
def test_cli_analyze_refuses_options_out_of_range_before_reading_anything(
    tmp_path, capsys, options, message):
  missing = str(tmp_path / 'no-such-store')
  status = cli.main(['analyze', '--train', missing, '--eval', missing, '--out',
                     str(tmp_path / 'out'), *options])
  assert status == 2
  error = capsys.readouterr().err
  assert error.startswith('qscore analyze: error: ')
  assert re.search(message, error), error
  assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------ under jax.jit

def test_static_checks_hold_under_jit_at_trace_time():
  h = _h()
  member = _d(h)
  with pytest.raises(InputError, match='has 1 entries'):
    jax.jit(qscore_jax.qscore)(h, member[:1])
  with pytest.raises(InputError, match='got float32 values'):
    jax.jit(qscore_jax.qscore)(h, member.astype(np.float32))
  with pytest.raises(InputError, match='integer indices inside a traced function'):
    jax.jit(qscore_jax.qscore)(h, np.flatnonzero(member))
  with pytest.raises(InputError, match='valid must be a bool mask'):
    jax.jit(qscore_jax.activation_counts)(h, valid=np.zeros(96))
  with pytest.raises(InputError, match=r'must have shape \(d,\)'):
    jax.jit(qscore_jax.discriminative_features)(np.ones((2, 48)))
  with pytest.raises(InputError, match=r'must have shape \(N, d\)'):
    jax.jit(qscore_jax.qscore_v1)(h[0])
  # Valid inputs stay traceable: jit, grad and the same numbers.
  np.testing.assert_allclose(np.asarray(jax.jit(qscore_jax.qscore)(h, member, 2.0)).sum(),
                             MAIN_Q_SUM, rtol=1e-6)
  grad = jax.grad(lambda x: regularizer.qscore_terms(x, member)['low_quality'])(h)
  assert np.isfinite(np.asarray(grad)).all()


def test_the_value_checks_are_opt_in_under_jit_with_checkify():
  h = _h()
  member = _d(h)

  def step(h, valid):
    qscore_jax.check_representations(h, valid)
    return qscore_jax.qscore(h, member)

  checked = jax.jit(checkify.checkify(step))
  error, q = checked(h, np.ones(96, bool))
  error.throw()  # clean input: nothing raised
  np.testing.assert_allclose(np.asarray(q), np.asarray(qscore_jax.qscore(h, member)))
  bad = h.copy()
  bad[5, 0] = np.nan
  error, _ = checked(bad, np.ones(96, bool))
  with pytest.raises(checkify.JaxRuntimeError, match=r'1 of 96 rows .* \(first: row 5\)'):
    error.throw()
  padding = np.ones(96, bool)
  padding[5] = False
  checked(bad, padding)[0].throw()  # a padding row is not checked
  # Without checkify the traced check says what to do; on concrete arrays it raises at once.
  with pytest.raises(ValueError, match='checkify'):
    jax.jit(step)(bad, padding)
  with pytest.raises(InputError, match=r'1 of 96 rows .* \(row 5\)'):
    qscore_jax.check_representations(bad)


def test_cli_interpret_and_finetune_refuse_options_out_of_range_before_loading(tmp_path, capsys):
  assert cli.main(['interpret', str(tmp_path / 'no-model'), '--out', str(tmp_path / 'out'),
                   '--eps', '-1']) == 2
  assert 'qscore interpret: error: eps must be a finite number > 0' in capsys.readouterr().err
  assert cli.main(['finetune', '--set', 'num_steps=-5', '--workdir', str(tmp_path / 'run')]) == 2
  assert ("qscore finetune: error: config field 'num_steps' must be an integer >= 1, got -5"
          in capsys.readouterr().err)
  assert not (tmp_path / 'run').exists()

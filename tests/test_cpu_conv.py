"""bfloat16 on a CPU's matrix units (issue 20): the dot-product convolutions, the decision
from the CPU's flags, and what the path changes in the shipped model's results.

The path's numerics do not depend on the CPU having the units (without them XLA
emulates the same bfloat16 products), so every test here runs on any CPU; the flags
are simulated with ``QSCORE_JAX_CPU_FLAGS``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sp_stats

from qscore_jax import stats
from qscore_jax.demo import DEMO_EPS
from qscore_jax.embed import embed_dataset
from qscore_jax.models import cpu_conv, load_encoder, precision
from qscore_jax.store import RepresentationStore

NHWC = ('NHWC', 'HWIO', 'NHWC')
EPS = DEMO_EPS  # the demo's 2 (at the default 4, most of these 32-px images have Q = 0)


def _bf16_rounded(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _reference(x, w, stride, padding):
  """float64 convolution of the bfloat16-rounded operands: what the dots compute, up to
  their float32 accumulation."""
  return np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(_bf16_rounded(x), jnp.float32), jnp.asarray(_bf16_rounded(w), jnp.float32),
      stride, padding, dimension_numbers=NHWC, precision=jax.lax.Precision.HIGHEST),
      np.float64)


@pytest.mark.parametrize('shape, kernel, stride, padding, path', [
    ((2, 7, 7, 24), 1, (1, 1), 'VALID', 'dot'),
    ((2, 7, 9, 24), 1, (2, 2), ((0, 0), (0, 0)), 'dot'),     # odd sizes, strided shortcut
    ((2, 8, 8, 16), 1, (2, 2), 'SAME', 'dot'),
    ((2, 14, 14, 16), 3, (1, 1), ((1, 1), (1, 1)), 'dot'),  # torchvision padding
    ((3, 5, 6, 8), 3, (1, 1), 'SAME', 'dot'),
    ((2, 15, 15, 8), 3, (1, 1), ((1, 1), (1, 1)), 'conv'),  # a map too large for the dots
    ((2, 14, 14, 8), 3, (2, 2), ((1, 1), (1, 1)), 'conv'),  # strided
    ((2, 16, 16, 3), 7, (2, 2), ((3, 3), (3, 3)), 'conv'),  # the stem
    ((2, 16, 16, 3), 4, (4, 4), 'SAME', 'conv'),  # a padded patch embedding
])
def test_the_dot_convolutions_equal_a_float64_convolution(shape, kernel, stride, padding, path):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  w = (rng.standard_normal((kernel, kernel, shape[-1], 12)) * 0.1).astype(np.float32)
  got = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=NHWC))(x, w)
  assert got.dtype == jnp.float32
  if path == 'dot':
    want = _reference(x, w, stride, padding)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
  else:  # the fallback: XLA's float32 convolution of the unrounded operands
    want = jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  text = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=NHWC)).lower(x, w).as_text()
  assert ('convolution' in text) == (path == 'conv'), text[-2000:]


def test_the_dot_convolutions_have_the_gradients_of_a_convolution():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 7, 7, 8)).astype(np.float32)
  w = (rng.standard_normal((3, 3, 8, 4)) * 0.1).astype(np.float32)
  g = rng.standard_normal((2, 7, 7, 4)).astype(np.float32)
  pad = ((1, 1), (1, 1))

  def loss(conv):
    return lambda x, w: jnp.sum(conv(x, w, (1, 1), pad, dimension_numbers=NHWC) * g)

  got = jax.grad(loss(cpu_conv.conv_general_dilated), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    # The forward operands are rounded to bfloat16, and so are the backward dots'.
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())


def test_the_path_is_chosen_from_the_cpus_flags(monkeypatch):
  monkeypatch.delenv(precision.DOTS_ENV, raising=False)
  monkeypatch.setenv(precision.FLAGS_ENV, 'sse4_2 avx2 avx512f')  # a Zen 3 / older Xeon
  assert precision.cpu_bf16_units() == ()
  assert not precision.uses_cpu_dots(jnp.bfloat16, backend='cpu')
  assert precision.conv_options(jnp.bfloat16) == {'dtype': jnp.bfloat16}
  monkeypatch.setenv(precision.FLAGS_ENV, 'avx2 avx512f avx512_bf16 amx_tile amx_bf16')
  assert precision.cpu_bf16_units() == ('amx_bf16', 'avx512_bf16')
  assert precision.uses_cpu_dots(jnp.bfloat16, backend='cpu')
  assert precision.conv_options(jnp.bfloat16) == {
      'dtype': jnp.float32, 'conv_general_dilated': cpu_conv.conv_general_dilated}
  assert precision.activation_dtype(jnp.bfloat16) == jnp.float32
  assert not precision.uses_cpu_dots(jnp.float32, backend='cpu')
  assert not precision.uses_cpu_dots(jnp.bfloat16, backend='gpu')
  monkeypatch.setenv(precision.DOTS_ENV, '0')  # the opt-out
  assert not precision.uses_cpu_dots(jnp.bfloat16, backend='cpu')
  assert precision.activation_dtype(jnp.bfloat16) == jnp.bfloat16


@pytest.mark.parametrize('flags', ['avx2 avx512f amx_bf16', 'avx2'],
                         ids=['matrix-unit path', 'bfloat16 activations'])
def test_shipped_model_in_bfloat16_keeps_representations_and_qscores(
    flags, tmp_path, tiny_data_dir, monkeypatch):
  """Issue 20's bound: bfloat16 representations within 2e-2 relative of float32 and
  Q-Scores' Spearman >= 0.99 on the shipped model, on both bfloat16 paths."""
  monkeypatch.setenv(precision.FLAGS_ENV, flags)
  monkeypatch.delenv(precision.DOTS_ENV, raising=False)
  jax.clear_caches()  # compiled embedding steps were traced under other flags
  h = {}
  for dtype in ('float32', 'bfloat16'):
    encoder = load_encoder('demo-simclr-r18w025', dtype=dtype)
    store = embed_dataset(encoder.module, encoder.variables, 'synthetic_shapes/tiny', 'train',
                          tmp_path / dtype, batch_size=128,
                          preprocessing=encoder.preprocessing, data_dir=tiny_data_dir,
                          progress=False)
    h[dtype] = RepresentationStore.open(store).representations().astype(np.float64)
  jax.clear_caches()
  low, high = h['bfloat16'], h['float32']
  relative = np.abs(low - high).max() / np.abs(high).max()
  assert 0 < relative < 2e-2, relative
  scores = {}
  for dtype, rows in h.items():
    rows = jnp.asarray(rows, jnp.float32)
    discriminative = stats.discriminative_features(stats.activation_counts(rows, eps=EPS))
    scores[dtype] = np.asarray(stats.qscore(rows, discriminative, eps=EPS))
  assert np.mean(scores['float32'] > 0) > 0.5  # a ranking, not ties at zero
  spearman = sp_stats.spearmanr(scores['bfloat16'], scores['float32']).statistic
  assert spearman >= 0.99, spearman


def test_the_patch_embedding_and_dense_dots_equal_float64_products():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 35, 33, 3)).astype(np.float32)  # remainders dropped
  w = (rng.standard_normal((16, 16, 3, 8)) * 0.1).astype(np.float32)
  got = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(
      x, w, (16, 16), 'VALID', dimension_numbers=NHWC))(x, w)
  want = _reference(x, w, (16, 16), 'VALID')
  assert got.shape == want.shape == (2, 2, 2, 8)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  a = rng.standard_normal((4, 5, 24)).astype(np.float32)
  b = rng.standard_normal((24, 7)).astype(np.float32)
  product = cpu_conv.dot_general(a, b, (((2,), (0,)), ((), ())))
  assert product.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(product, np.float64),
                             _bf16_rounded(a) @ _bf16_rounded(b), rtol=1e-5, atol=1e-5)


def test_a_vit_on_the_matrix_unit_path_stays_close_to_float32(monkeypatch):
  from qscore_jax.models import build_model, init_variables  # pylint: disable=import-outside-toplevel
  options = {'depth': 2, 'embed_dim': 48, 'num_heads': 3, 'image_size': 32}
  variables = init_variables(build_model('vit_small', patch_size=8, **options),
                             jax.random.key(0), (1, 32, 32, 3))
  images = np.random.default_rng(3).standard_normal((4, 32, 32, 3)).astype(np.float32)
  out = {}
  for name, flags, dtype in (('fp32', 'avx2', jnp.float32), ('dots', 'amx_bf16', jnp.bfloat16),
                             ('bf16', 'avx2', jnp.bfloat16)):
    monkeypatch.setenv(precision.FLAGS_ENV, flags)
    model = build_model('vit_small', patch_size=8, dtype=dtype, **options)
    fn = jax.jit(lambda v, x, m=model: m.apply(v, x))
    out[name] = np.asarray(fn(variables, images), np.float64)
    text = fn.lower(variables, images).as_text()
    # On the dots path the patch embedding is a dot too: no convolution is left.
    assert ('convolution' in text) == (name != 'dots')
  for name in ('dots', 'bf16'):
    relative = np.abs(out[name] - out['fp32']).max() / np.abs(out['fp32']).max()
    assert 0 < relative < 2e-2, (name, relative)


def test_stores_of_the_two_bfloat16_paths_are_never_mixed(tmp_path, tiny_data_dir, monkeypatch,
                                                          capsys):
  from qscore_jax import cli  # pylint: disable=import-outside-toplevel
  from qscore_jax.store import LEGACY_DEFAULTS, differences  # pylint: disable=import-outside-toplevel
  common = ['demo-simclr-r18w025', '--dataset', 'synthetic_shapes/tiny', '--split', 'test',
            '--data-dir', tiny_data_dir, '--no-progress', '--batch-size', '64',
            '--dtype', 'bfloat16', '--out', str(tmp_path / 'store')]
  monkeypatch.setenv(precision.FLAGS_ENV, 'avx2 amx_bf16')
  monkeypatch.delenv(precision.DOTS_ENV, raising=False)
  jax.clear_caches()
  assert cli.main(['embed', *common]) == 0
  assert RepresentationStore.open(tmp_path / 'store').metadata['compute_path'] == 'cpu_bf16_dots'
  # The same command where the path is off (another CPU, or the opt-out) is another run.
  monkeypatch.setenv(precision.DOTS_ENV, '0')
  jax.clear_caches()
  capsys.readouterr()
  assert cli.main(['embed', *common]) == 2
  assert "compute_path: stored 'cpu_bf16_dots', now 'standard'" in capsys.readouterr().err
  jax.clear_caches()
  # A store written before the field existed computed the standard way.
  assert LEGACY_DEFAULTS['compute_path'] == precision.STANDARD_PATH
  assert differences({'compute_path': precision.STANDARD_PATH}, {}, ('compute_path',)) == {}

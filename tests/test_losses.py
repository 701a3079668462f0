"""The SSL losses against lightly's reference implementations, and under pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qscore_jax import losses

lightly_loss = pytest.importorskip('lightly.loss')

RTOL = 1e-5


def _pair(seed, n=16, d=32, shift=0.0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((n, d)).astype(np.float32)
  b = (a + rng.standard_normal((n, d)) * 0.7 + shift).astype(np.float32)
  return a, b


def _torch(*arrays):
  return [torch.from_numpy(np.asarray(x, np.float64)) for x in arrays]


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_equals_lightly(temperature):
  z1, z2 = _pair(0)
  ours = float(losses.nt_xent(z1, z2, temperature=temperature))
  ref = float(lightly_loss.NTXentLoss(temperature=temperature)(*_torch(z1, z2)))
  assert ours == pytest.approx(ref, rel=RTOL)


def test_simsiam_equals_lightly_negative_cosine():
  p1, z2 = _pair(1)
  p2, z1 = _pair(2)
  ours = float(losses.simsiam_loss(p1, p2, z1, z2))
  criterion = lightly_loss.NegativeCosineSimilarity()
  tp1, tp2, tz1, tz2 = _torch(p1, p2, z1, z2)
  ref = float(0.5 * (criterion(tp1, tz2) + criterion(tp2, tz1)))
  assert ours == pytest.approx(ref, rel=RTOL)


def test_byol_equals_two_minus_two_cosine_of_lightly():
  # BYOL's regression loss ||p/|p| - z/|z|||^2 = 2 - 2 cos, summed over both directions.
  p1, t2 = _pair(3)
  p2, t1 = _pair(4)
  ours = float(losses.byol_loss(p1, p2, t1, t2))
  criterion = lightly_loss.NegativeCosineSimilarity()
  tp1, tp2, tt1, tt2 = _torch(p1, p2, t1, t2)
  ref = float((2 + 2 * criterion(tp1, tt2)) + (2 + 2 * criterion(tp2, tt1)))
  assert ours == pytest.approx(ref, rel=RTOL)
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  direct = np.mean(np.sum((normalize(p1.astype(np.float64)) - normalize(t2)) ** 2, 1)
                   + np.sum((normalize(p2.astype(np.float64)) - normalize(t1)) ** 2, 1))
  assert ours == pytest.approx(direct, rel=RTOL)


@pytest.mark.parametrize('coefficients', [(25.0, 25.0, 1.0), (5.0, 10.0, 2.0)])
def test_vicreg_equals_lightly(coefficients):
  z1, z2 = _pair(5, shift=0.3)
  z1 = z1 * 0.4  # some dimensions below unit std: the variance hinge is active
  sim, std, cov = coefficients
  ours = float(losses.vicreg_loss(z1, z2, sim_coeff=sim, std_coeff=std, cov_coeff=cov))
  ref = float(lightly_loss.VICRegLoss(lambda_param=sim, mu_param=std, nu_param=cov)(
      *_torch(z1, z2)))
  assert ours == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize('lambd', [0.0051, 0.1])
def test_barlow_twins_equals_lightly(lambd):
  z1, z2 = _pair(6, shift=0.2)
  ours = float(losses.barlow_twins_loss(z1, z2, lambd=lambd))
  ref = float(lightly_loss.BarlowTwinsLoss(lambda_param=lambd)(*_torch(z1, z2)))
  assert ours == pytest.approx(ref, rel=RTOL)


def test_gradients_flow_only_to_the_online_branch():
  p1, t2 = _pair(7)
  p2, t1 = _pair(8)
  grads = jax.grad(lambda t: losses.byol_loss(p1, p2, t[0], t[1]))((t1, t2))
  assert all(float(jnp.abs(g).max()) == 0 for g in grads)


def test_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match='same shape'):
    losses.nt_xent(np.zeros((4, 8)), np.zeros((4, 9)))
  with pytest.raises(ValueError, match='at least 2 samples'):
    losses.vicreg_loss(np.zeros((1, 8)), np.zeros((1, 8)))


@pytest.mark.parametrize('name', ['nt_xent', 'vicreg_loss', 'barlow_twins_loss'])
def test_pmap_with_axis_name_equals_the_global_loss_and_gradient(name):
  # With one local device the gathered batch is the local one; the per-device
  # split is exercised with 8 simulated devices in tests/test_finetune.py.
  fn = getattr(losses, name)
  z1, z2 = _pair(9, n=8, d=8)
  value, grad = jax.value_and_grad(lambda a: fn(a, z2))(z1)
  devices = jax.local_device_count()
  pv, pg = jax.pmap(jax.value_and_grad(lambda a, b: fn(a, b, axis_name='i')), axis_name='i')(
      z1.reshape(devices, -1, 8), z2.reshape(devices, -1, 8))
  np.testing.assert_allclose(pv[0], value, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pg).reshape(8, 8) / devices, grad, rtol=1e-5,
                             atol=1e-7)


def test_zero_projections_give_finite_gradients():
  # A dead head (all-zero output rows) must not turn a step into NaN: the gradient of
  # the normalisation at 0 is finite, as PyTorch's F.normalize.
  z = np.zeros((4, 8), np.float32)
  z[1:] = np.random.default_rng(0).standard_normal((3, 8))
  for fn in (lambda a: losses.nt_xent(a, a + 1), lambda a: losses.byol_loss(a, a, a + 1, a + 2),
             lambda a: losses.simsiam_loss(a, a, a + 1, a + 2)):
    assert np.all(np.isfinite(np.asarray(jax.grad(fn)(jnp.asarray(z)))))

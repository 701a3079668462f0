"""The SSL losses against lightly's reference implementations, and under pmap."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qscore_jax import losses

lightly_loss = pytest.importorskip('lightly.loss')
lightly_memory_bank = pytest.importorskip('lightly.loss.memory_bank')

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


# ------------------------------------------------ MoCo v2 / v3, SwAV, DINO: references

def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _prototype_scores(seed, crops, n=8, k=6, d=5):
  """SwAV-like scores: cosines of unit embeddings with unit prototypes, (n, k) per crop."""
  rng = np.random.default_rng(seed)
  prototypes = _unit(rng.standard_normal((k, d)))
  return [(_unit(rng.standard_normal((n, d))) @ prototypes.T).astype(np.float32)
          for _ in range(crops)]


def _official_sinkhorn(chunks, epsilon, iterations):
  """``distributed_sinkhorn`` of facebookresearch/swav in float64, one (B, K) chunk per rank.

  ``dist.all_reduce`` is the sum over the chunks; returns each rank's Q.t().
  """
  qs = [np.exp(np.asarray(c, np.float64) / epsilon).T for c in chunks]  # K x B per rank
  big_b = sum(q.shape[1] for q in qs)  # Q.shape[1] * world_size
  k = qs[0].shape[0]
  sum_q = sum(q.sum() for q in qs)
  qs = [q / sum_q for q in qs]
  for _ in range(iterations):
    sum_of_rows = sum(q.sum(axis=1, keepdims=True) for q in qs)
    qs = [q / sum_of_rows / k for q in qs]
    qs = [q / q.sum(axis=0, keepdims=True) / big_b for q in qs]
  return [(q * big_b).T for q in qs]


def _official_swav(scores, crops_for_assign, temperature, epsilon, iterations, queue=None):
  """The loss of swav's main loop (one rank) in float64; ``queue[i]`` goes with assigned crop i."""
  bs = scores[0].shape[0]
  loss = 0.0
  for i, crop_id in enumerate(crops_for_assign):
    out = np.asarray(scores[crop_id], np.float64)
    if queue is not None:
      out = np.concatenate([queue[i], out])
    q = _official_sinkhorn([out], epsilon, iterations)[0][-bs:]
    subloss = 0.0
    for v in np.delete(np.arange(len(scores)), crop_id):
      subloss -= np.mean(np.sum(q * _log_softmax(np.asarray(scores[v], np.float64)
                                                 / temperature), axis=1))
    loss += subloss / (len(scores) - 1)
  return loss / len(crops_for_assign)


def _official_moco_v3(q1, q2, k1, k2, temperature, world_size):
  """moco-v3's builder.py in float64 torch, its GPUs simulated: local queries, gathered keys.

  Returns the per-GPU losses (DDP averages their gradients).
  """
  q1, q2, k1, k2 = _torch(q1, q2, k1, k2)
  n = q1.shape[0] // world_size
  normalize = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731

  def ctr_loss(q, k, labels):
    logits = torch.einsum('nc,mc->nm', normalize(q), normalize(k)) / temperature
    return torch.nn.CrossEntropyLoss()(logits, labels) * (2 * temperature)

  per_gpu = []
  for rank in range(world_size):
    rows = slice(rank * n, (rank + 1) * n)
    labels = torch.arange(n) + n * rank
    per_gpu.append(float(ctr_loss(q1[rows], k2, labels) + ctr_loss(q2[rows], k1, labels)))
  return per_gpu


# ------------------------------------------------------------------------- MoCo v2

@pytest.mark.parametrize('temperature', [0.2, 0.07])
def test_moco_v2_equals_lightly_ntxent_with_a_memory_bank(temperature):
  q, k = _pair(10, n=8, d=16)
  queue = _unit(np.random.default_rng(11).standard_normal((24, 16))).astype(np.float32)
  ours = float(losses.moco_v2_loss(q * 3, k * 0.5, queue, temperature=temperature))
  # lightly's NTXentLoss(memory_bank_size=(K, d)) is MoCo's loss: positive q.k first, then q
  # against the bank *before* this batch is enqueued (bank.clone() is taken first, and it only
  # enqueues when out0 requires a gradient), label 0, mean over the batch. Its bank is stored
  # (K, d) and handed over transposed, (d, K): the same negatives as our (K, d) queue.
  criterion = lightly_loss.NTXentLoss(temperature=temperature, memory_bank_size=(24, 16))
  criterion.memory_bank.bank = torch.from_numpy(queue.astype(np.float64))
  tq, tk = _torch(q * 3, k * 0.5)
  ref = float(criterion(tq, tk))
  assert ours == pytest.approx(ref, rel=RTOL)
  # the official builder.py, transcribed (queue (d, K) there): the same number
  logits = np.concatenate([np.sum(_unit(q) * _unit(k), 1, keepdims=True),
                           _unit(q) @ queue.astype(np.float64).T], axis=1) / temperature
  assert ours == pytest.approx(-np.mean(_log_softmax(logits)[:, 0]), rel=RTOL)


def test_moco_v2_with_an_empty_queue_has_only_the_positive():
  # K = 0: nothing to contrast with, the loss is 0 (lightly's memory_bank_size=0 would instead
  # switch to SimCLR's in-batch negatives; we do not).
  q, k = _pair(12, n=4, d=8)
  assert float(losses.moco_v2_loss(q, k, np.zeros((0, 8), np.float32))) == pytest.approx(0.0)


def _lightly_bank(queue, pointer):
  bank = lightly_memory_bank.MemoryBankModule(size=queue.shape)
  bank.bank = torch.from_numpy(queue.copy())
  bank.bank_ptr[0] = pointer
  return bank


@pytest.mark.parametrize('pointer', [0, 3, 6])
def test_enqueue_without_wrap_equals_lightly_memory_bank(pointer):
  rng = np.random.default_rng(13)
  queue = rng.standard_normal((10, 4)).astype(np.float32)
  keys = rng.standard_normal((4, 4)).astype(np.float32)
  new_queue, new_pointer = losses.enqueue(queue, keys, np.int32(pointer))
  bank = _lightly_bank(queue, pointer)
  bank._dequeue_and_enqueue(torch.from_numpy(keys))  # pylint: disable=protected-access
  np.testing.assert_array_equal(new_queue, bank.bank.numpy())
  assert int(new_pointer) == int(bank.bank_ptr[0]) == (pointer + 4) % 10
  assert new_pointer.dtype == jnp.int32


def test_enqueue_wraps_around_the_end_of_the_queue():
  # K = 10 is not a multiple of N = 4: rows 8, 9, 0, 1 are written. The official MoCo asserts
  # K % N == 0 (never wraps mid-batch); lightly's memory bank writes rows 8, 9 only, drops the
  # other keys and resets the pointer to 0. We keep them all (modular ring buffer).
  rng = np.random.default_rng(14)
  queue = rng.standard_normal((10, 4)).astype(np.float32)
  keys = rng.standard_normal((4, 4)).astype(np.float32)
  new_queue, new_pointer = losses.enqueue(queue, keys, 8)
  expected = queue.copy()
  expected[[8, 9, 0, 1]] = keys
  np.testing.assert_array_equal(new_queue, expected)
  assert int(new_pointer) == 2
  # a pointer beyond K, and a batch exactly the size of the queue
  full, pointer = losses.enqueue(queue[:4], keys, 6)
  np.testing.assert_array_equal(full, keys[[2, 3, 0, 1]])
  assert int(pointer) == 2
  # in a jitted step, the pointer is traced
  jitted = jax.jit(losses.enqueue)(queue, keys, jnp.int32(8))
  np.testing.assert_array_equal(jitted[0], expected)


def test_enqueue_rejects_a_batch_larger_than_the_queue():
  with pytest.raises(ValueError, match='does not fit in a queue of 3 rows'):
    losses.enqueue(np.zeros((3, 4)), np.zeros((4, 4)), 0)


# ------------------------------------------------------------------------- MoCo v3

@pytest.mark.parametrize('temperature', [1.0, 0.2])
def test_moco_v3_equals_the_official_loss(temperature):
  # lightly has no MoCo v3 loss with the 2T factor: the reference is builder.py transcribed.
  q1, k2 = _pair(15, n=8, d=16)
  q2, k1 = _pair(16, n=8, d=16)
  ours = float(losses.moco_v3_loss(q1, q2, k1, k2, temperature=temperature))
  (ref,) = _official_moco_v3(q1, q2, k1, k2, temperature, world_size=1)
  assert ours == pytest.approx(ref, rel=RTOL)
  # the official multi-GPU value (local queries, gathered keys) averaged over 4 GPUs
  per_gpu = _official_moco_v3(q1, q2, k1, k2, temperature, world_size=4)
  assert ours == pytest.approx(np.mean(per_gpu), rel=RTOL)
  assert np.ptp(per_gpu) > 1e-3  # (they differ per GPU: the average is what is equal)


# ---------------------------------------------------------------------------- SwAV

@pytest.mark.parametrize('epsilon, iterations', [(0.05, 3), (0.1, 1), (0.03, 5)])
def test_sinkhorn_equals_lightly_and_the_official_code(epsilon, iterations):
  (scores,) = _prototype_scores(17, 1, n=12, k=5)
  ours = np.asarray(losses.sinkhorn(scores, epsilon=epsilon, iterations=iterations))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours.sum(axis=1), 1, rtol=1e-5)
  # lightly's sinkhorn omits the official `Q /= K` of the prototype step: a constant factor
  # the following column normalisation removes, so the codes are the same.
  ref = lightly_loss.swav_loss.sinkhorn(*_torch(scores), iterations=iterations,
                                        epsilon=epsilon).numpy()
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(ours, _official_sinkhorn([scores], epsilon, iterations)[0],
                             rtol=RTOL, atol=1e-7)


def test_sinkhorn_guards_the_exponential_against_overflow():
  # scores + 10 at epsilon 0.05: the official exp(out / epsilon) = exp(>200) is inf in float32
  # and the codes NaN. A constant shift does not change the codes mathematically.
  (scores,) = _prototype_scores(18, 1)
  with np.errstate(over='ignore'):
    assert np.isinf(np.exp((scores + 10) / np.float32(0.05))).any()
  shifted = np.asarray(losses.sinkhorn(scores + 10))
  assert np.all(np.isfinite(shifted))
  np.testing.assert_allclose(shifted, _official_sinkhorn([scores], 0.05, 3)[0], rtol=1e-4,
                             atol=1e-6)


def test_sinkhorn_of_a_concatenated_batch_is_the_official_distributed_sinkhorn():
  # The single-device codes of the global batch are the official distributed codes of its
  # shards (the all-reduced sums), not the codes of each shard alone.
  (scores,) = _prototype_scores(19, 1, n=12, k=5)
  ours = np.asarray(losses.sinkhorn(scores))
  shards = np.split(scores, 3)
  np.testing.assert_allclose(ours, np.concatenate(_official_sinkhorn(shards, 0.05, 3)),
                             rtol=RTOL, atol=1e-7)
  alone = np.concatenate([_official_sinkhorn([s], 0.05, 3)[0] for s in shards])
  assert np.abs(ours - alone).max() > 1e-3


@pytest.mark.parametrize('temperature, epsilon, iterations', [(0.1, 0.05, 3), (0.2, 0.08, 2)])
@pytest.mark.parametrize('with_queue', [False, True])
def test_swav_loss_equals_lightly(temperature, epsilon, iterations, with_queue):
  scores = _prototype_scores(20, 4)  # 2 global crops + 2 small crops
  queue = _prototype_scores(21, 2, n=6) if with_queue else None
  ours = float(losses.swav_loss(scores, temperature=temperature, epsilon=epsilon,
                                sinkhorn_iterations=iterations, queue_scores=queue))
  # lightly assigns every high-resolution crop (here crops 0 and 1, the official default) and
  # *appends* the queue rows after the batch where swav prepends them: Sinkhorn treats the
  # samples symmetrically, so the codes of the batch rows are the same.
  criterion = lightly_loss.SwaVLoss(temperature=temperature, sinkhorn_iterations=iterations,
                                    sinkhorn_epsilon=epsilon)
  ref = float(criterion(_torch(*scores[:2]), _torch(*scores[2:]),
                        _torch(*queue) if with_queue else None))
  assert ours == pytest.approx(ref, rel=RTOL)
  official = _official_swav(scores, (0, 1), temperature, epsilon, iterations, queue)
  assert ours == pytest.approx(official, rel=RTOL)


@pytest.mark.parametrize('crops_for_assign', [(0,), (1, 2), (0, 1, 2)])
def test_swav_loss_other_assigned_crops_equal_the_official_loop(crops_for_assign):
  # lightly cannot assign a subset or a small crop; the reference is swav's main loop.
  scores = _prototype_scores(22, 3)
  queue = _prototype_scores(23, len(crops_for_assign), n=4)
  ours = float(losses.swav_loss(scores, crops_for_assign=crops_for_assign, queue_scores=queue))
  ref = _official_swav(scores, crops_for_assign, 0.1, 0.05, 3, queue)
  assert ours == pytest.approx(ref, rel=RTOL)


# ---------------------------------------------------------------------------- DINO

def _dino_inputs(seed, crops=5, n=8, k=12):
  rng = np.random.default_rng(seed)
  student = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(crops)]
  teacher = [(s + rng.standard_normal((n, k)) * 0.5).astype(np.float32)
             for s in student[:2]]
  center = (rng.standard_normal(k) * 0.3).astype(np.float32)
  return student, teacher, center


@pytest.mark.parametrize('temperatures', [(0.1, 0.04), (0.2, 0.07)])
@pytest.mark.parametrize('crops', [2, 5])
def test_dino_loss_and_center_equal_lightly(temperatures, crops):
  student_t, teacher_t = temperatures
  student, teacher, center = _dino_inputs(24, crops)
  ours = float(losses.dino_loss(student, teacher, center, student_temperature=student_t,
                                teacher_temperature=teacher_t))
  # lightly's DINOLoss follows the official one: all (teacher crop, student crop) pairs but the
  # same crop, mean over the batch and the pairs, then the EMA of the center.
  criterion = lightly_loss.DINOLoss(output_dim=12, student_temp=student_t, center_momentum=0.8)
  criterion.center = torch.from_numpy(center.astype(np.float64)).reshape(1, 1, 12)
  ref = float(criterion(_torch(*teacher), _torch(*student), teacher_temp=teacher_t))
  assert ours == pytest.approx(ref, rel=RTOL)
  new_center = losses.dino_center(center, teacher, momentum=0.8)
  assert new_center.shape == (12,)
  np.testing.assert_allclose(new_center, criterion.center.reshape(12).numpy(), rtol=RTOL,
                             atol=1e-7)
  # a (1, K) center and one (N, K) array of teacher rows are accepted as well
  row = losses.dino_center(center[None], np.concatenate(teacher), momentum=0.8)
  assert row.shape == (1, 12)
  np.testing.assert_allclose(row[0], new_center, rtol=1e-6)
  assert float(losses.dino_loss(student, teacher, center[None], student_temperature=student_t,
                                teacher_temperature=teacher_t)) == pytest.approx(ours, rel=1e-6)


def test_dino_loss_equals_the_official_transcription():
  student, teacher, center = _dino_inputs(25)
  ours = float(losses.dino_loss(student, teacher, center))
  teacher_out = [np.exp(_log_softmax((np.float64(t) - center) / 0.04)) for t in teacher]
  total, n_terms = 0.0, 0
  for iq, q in enumerate(teacher_out):
    for v, s in enumerate(student):
      if v != iq:
        total += np.mean(np.sum(-q * _log_softmax(np.float64(s) / 0.1), axis=-1))
        n_terms += 1
  assert ours == pytest.approx(total / n_terms, rel=RTOL)


# ------------------------------------------------------------------ gradients, errors

def test_queues_keys_teachers_and_centers_get_no_gradient():
  q, k = _pair(26, n=4, d=8)
  queue = _unit(np.random.default_rng(27).standard_normal((6, 8))).astype(np.float32)
  g_q, g_k, g_queue = jax.grad(losses.moco_v2_loss, argnums=(0, 1, 2))(q, k, queue)
  assert float(jnp.abs(g_q).max()) > 0
  assert float(jnp.abs(g_k).max()) == 0 and float(jnp.abs(g_queue).max()) == 0

  grads = jax.grad(losses.moco_v3_loss, argnums=(0, 1, 2, 3))(q, q + 1, k, k - 1)
  assert float(jnp.abs(grads[0]).max()) > 0
  assert float(jnp.abs(grads[2]).max()) == 0 and float(jnp.abs(grads[3]).max()) == 0

  g_keys = jax.grad(lambda x: jnp.sum(losses.enqueue(queue, x, 0)[0]))(k[:2])
  assert float(jnp.abs(g_keys).max()) == 0

  scores = _prototype_scores(28, 3)
  g = jax.grad(lambda s: jnp.sum(losses.sinkhorn(s) * s))(scores[0])
  np.testing.assert_allclose(g, losses.sinkhorn(scores[0]), rtol=1e-6)  # codes are constants
  queue_scores = _prototype_scores(29, 2, n=4)
  g_scores, g_queue = jax.grad(
      lambda s, qs: losses.swav_loss(s, queue_scores=qs), argnums=(0, 1))(scores, queue_scores)
  assert all(float(jnp.abs(x).max()) > 0 for x in g_scores)
  assert all(float(jnp.abs(x).max()) == 0 for x in g_queue)

  student, teacher, center = _dino_inputs(30, crops=3)
  g_s, g_t, g_c = jax.grad(losses.dino_loss, argnums=(0, 1, 2))(student, teacher, center)
  assert all(float(jnp.abs(x).max()) > 0 for x in g_s)
  assert all(float(jnp.abs(x).max()) == 0 for x in g_t) and float(jnp.abs(g_c).max()) == 0
  g_t = jax.grad(lambda t: jnp.sum(losses.dino_center(center, t)))(teacher)
  assert all(float(jnp.abs(x).max()) == 0 for x in g_t)


def test_bad_inputs_of_the_queue_and_crop_losses_are_clear_errors():
  a = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match='same shape'):
    losses.moco_v2_loss(a, np.zeros((4, 9)), a)
  with pytest.raises(ValueError, match='8-d rows'):
    losses.moco_v2_loss(a, a, np.zeros((5, 7)))
  with pytest.raises(ValueError, match=r'queue as a \(K, d\) array'):
    losses.moco_v2_loss(a, a, np.zeros(8))
  with pytest.raises(ValueError, match='same shape'):
    losses.moco_v3_loss(a, a, a, np.zeros((3, 8)))
  with pytest.raises(ValueError, match='scalar pointer'):
    losses.enqueue(a, a, np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="queue's width 8"):
    losses.enqueue(a, np.zeros((2, 5)), 0)
  with pytest.raises(ValueError, match=r'scores as a \(B, K\)'):
    losses.sinkhorn(np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match='at least 1 iteration'):
    losses.sinkhorn(a, iterations=0)
  with pytest.raises(ValueError, match='single array of shape'):
    losses.swav_loss(a)
  with pytest.raises(ValueError, match='one \\(B, K\\) shape'):
    losses.swav_loss([a, np.zeros((4, 7))])
  with pytest.raises(ValueError, match='at least 2 crops'):
    losses.swav_loss([a])
  with pytest.raises(ValueError, match=r'crops_for_assign \(0, 2\) out of range for 2 crops'):
    losses.swav_loss([a, a], crops_for_assign=(0, 2))
  with pytest.raises(ValueError, match='one queue_scores array per crop'):
    losses.swav_loss([a, a], queue_scores=[a])
  with pytest.raises(ValueError, match='queue_scores of 8 prototypes'):
    losses.swav_loss([a, a], queue_scores=[a, np.zeros((4, 3))])
  with pytest.raises(ValueError, match="teacher crops of the student crops' shape"):
    losses.dino_loss([a, a], [np.zeros((4, 9))], np.zeros(8))
  with pytest.raises(ValueError, match='first of the student crops'):
    losses.dino_loss([a], [a, a], np.zeros(8))
  with pytest.raises(ValueError, match='at least 2 student crops'):
    losses.dino_loss([a], [a], np.zeros(8))
  with pytest.raises(ValueError, match=r'center of shape \(8,\) or \(1, 8\)'):
    losses.dino_loss([a, a], [a], np.zeros(7))
  with pytest.raises(ValueError, match=r'center of shape \(8,\) or \(1, 8\)'):
    losses.dino_center(np.zeros((2, 8)), [a])


# ------------------------------------------------------- 8 simulated devices = 1 device

PMAP_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from qscore_jax import losses
assert jax.device_count() == 8, jax.devices()
D, B = 8, 2  # 8 devices x 2 rows = a global batch of 16
rng = np.random.default_rng(0)
unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
f32 = lambda x: np.asarray(x, np.float32)
shard = lambda x: x.reshape(D, -1, *x.shape[1:])
def close(a, b, what, rtol=1e-5, atol=1e-7):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)
def same_on_every_device(values, single, what):
  for value in values:
    close(value, single, what)

def check_loss(name, fn, *args):
  # value: every device has the single-device value of the global batch; gradient w.r.t. the
  # first argument's rows: devices x the single-device gradient (the mean over devices of the
  # parameter gradients is then the single-device gradient, as for the other losses).
  value, grad = jax.value_and_grad(fn)(*args)
  shards = jax.tree.map(shard, args)
  pv, pg = jax.pmap(jax.value_and_grad(lambda *a: fn(*a, axis_name='i')), axis_name='i')(*shards)
  same_on_every_device(pv, value, name)
  close(jax.tree.map(lambda g: np.asarray(g).reshape(-1, *np.shape(g)[2:]) / D, pg), grad,
        name + ' gradient', atol=1e-6)

q, k, q2, k2 = (f32(rng.standard_normal((D * B, 6))) for _ in range(4))
queue = f32(unit(rng.standard_normal((20, 6))))
check_loss('moco_v2', lambda a, b, axis_name=None: losses.moco_v2_loss(
    a, b, queue, temperature=0.2, axis_name=axis_name), q, k)
check_loss('moco_v3', lambda a, b, c, d, axis_name=None: losses.moco_v3_loss(
    a, b, c, d, temperature=0.2, axis_name=axis_name), q, q2, k, k2)

# enqueue: the replicated queue gets the gathered keys, wrapping at K = 20
single_queue, single_pointer = losses.enqueue(queue, k, 14)
pq, pp = jax.pmap(lambda x, qu, p: losses.enqueue(qu, x, p, axis_name='i'), axis_name='i',
                  in_axes=(0, None, None))(shard(k), queue, jnp.int32(14))
same_on_every_device(pq, single_queue, 'enqueue')
assert all(int(p) == int(single_pointer) == 10 for p in pp), pp

# sinkhorn: global sums; the local codes are the rows of the single-device codes
prototypes = unit(rng.standard_normal((5, 6)))
scores = [f32(unit(rng.standard_normal((D * B, 6))) @ prototypes.T) for _ in range(4)]
single = losses.sinkhorn(scores[0])
codes = jax.pmap(lambda s: losses.sinkhorn(s, axis_name='i'), axis_name='i')(shard(scores[0]))
close(np.asarray(codes).reshape(D * B, -1), single, 'sinkhorn')
naive = jax.pmap(losses.sinkhorn)(shard(scores[0]))  # each device alone
assert np.abs(np.asarray(naive) - np.asarray(codes)).max() > 1e-2, 'sums are not global'

# swav: 2 global + 2 small crops, a queue of 3 rows per device (official per-GPU queue)
queue_scores = [f32(unit(rng.standard_normal((D * 3, 6))) @ prototypes.T) for _ in range(2)]
check_loss('swav', lambda s, qs, axis_name=None: losses.swav_loss(
    s, temperature=0.1, queue_scores=qs, axis_name=axis_name), scores, queue_scores)
check_loss('swav small crop assigned', lambda s, axis_name=None: losses.swav_loss(
    s, crops_for_assign=(2,), axis_name=axis_name), scores)

# dino: 2 global + 2 local crops; the center from the global mean of both teacher crops
student = [f32(rng.standard_normal((D * B, 7))) for _ in range(4)]
teacher = [f32(s + rng.standard_normal(s.shape)) for s in student[:2]]
center = f32(rng.standard_normal(7) * 0.2)
check_loss('dino', lambda s, t, axis_name=None: losses.dino_loss(
    s, t, center, axis_name=axis_name), student, teacher)
single_center = losses.dino_center(center, teacher)
pc = jax.pmap(lambda t: losses.dino_center(center, t, axis_name='i'), axis_name='i')(
    [shard(t) for t in teacher])
same_on_every_device(pc, single_center, 'dino_center')
local_means = np.mean([np.mean(np.concatenate([t[i * B:(i + 1) * B] for t in teacher]), 0)
                       for i in range(D)], 0)  # = the global mean, equal shards
close(single_center, center * 0.9 + local_means * 0.1, 'dino_center value')
print('ok')
"""


def test_eight_devices_equal_one_device_for_the_queue_and_crop_losses():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', PMAP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith('ok')

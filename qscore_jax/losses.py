"""The self-supervised objectives, as pure functions of the projections.

Every loss takes the outputs of the heads for the *global* batch: under
``jax.jit`` over a device mesh the arrays are global already; under
``jax.pmap`` pass ``axis_name`` and the per-device rows are all-gathered
first, so every device computes the same global value. Take the mean of the
gradients over devices (``lax.pmean``) in a pmapped step; the result equals the
gradient of the single-device loss on the whole batch (tested).

Conventions and defaults follow the official releases, except the scale of SimCLR's
loss (its row):

==============  =====================================================================
SimCLR          NT-Xent over 2N views, cosine similarity / temperature (0.1 on ImageNet
                with LARS, 0.5 for small data); mean over all 2N anchors, as in the
                SimCLR paper and lightly's NTXentLoss. That is half of what
                google-research/simclr's ``add_contrastive_loss`` returns,
                ``loss_a + loss_b`` (each a mean over N anchors): the official loss
                and its gradients are 2x this one at the same temperature.
BYOL            2 - 2 cos(p, sg(z_target)), both directions summed, mean over the batch.
SimSiam         -cos(p, sg(z)), both directions averaged.
VICReg          25 * MSE(z1, z2) + 25 * hinge(1 - std) + 1 * off-diagonal covariance^2 / d,
                std with the unbiased variance + 1e-4 under the root.
Barlow Twins    sum_i (1 - C_ii)^2 + 0.0051 * sum_{i != j} C_ij^2, C the cross-correlation
                of the batch-standardised projections (biased variance, eps 1e-5).
MoCo v2         InfoNCE of normalize(q) against [normalize(sg(k)), queue] / T (0.2; 0.07
                in v1), label 0, mean over the batch; FIFO queue of the global batch of
                keys (65536 rows), updated after the loss (:func:`enqueue`).
MoCo v3         ctr(q1, k2) + ctr(q2, k1), ctr = CE(normalize(q) normalize(sg(k))^T / T,
                arange) * 2T, keys of the global batch; T = 1.0 (ResNet-50), 0.2 (ViT).
SwAV            codes q = Sinkhorn-Knopp (eps 0.05, 3 iterations, sums over all devices)
                of sg(scores) of crops 0 and 1 (queue rows prepended, then dropped);
                -sum q log softmax(scores_v / 0.1) over every other crop v, averaged.
DINO            -sum softmax((sg(t) - c) / 0.04) log softmax(s / 0.1), mean over the batch
                and over the (teacher crop, other student crop) pairs; center c is an EMA
                (0.9) of the global batch mean of the teacher outputs (:func:`dino_center`).
==============  =====================================================================

Exceptions to "global batch in, global value out": :func:`sinkhorn` returns the
codes of the local rows (its sums are global), :func:`enqueue` and
:func:`dino_center` return buffers (the same on every device), not losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qscore_jax.models.heads import l2_normalize


def gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """All rows of the global batch: ``x`` itself, or all-gathered over ``axis_name``."""
  return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)


def _check_pair(a, b, what):
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'{what} expects two (N, d) arrays of the same shape, got {a.shape} and '
                     f'{b.shape}.')


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1,
            axis_name: str | None = None) -> jax.Array:
  """SimCLR's NT-Xent loss of two views' projections (N, d) each; scalar.

  For each of the 2N anchors, the positive is the other view of the same image
  and the negatives are the other 2N - 2 projections. The result is the mean of
  the 2N cross-entropies (the SimCLR paper's L, lightly's ``NTXentLoss``), which
  is half of google-research/simclr's ``add_contrastive_loss``: that returns
  ``loss_a + loss_b``, the mean over the N anchors of the first views plus the
  mean over the N of the second views. Multiply by 2 to reproduce the official
  loss and its gradients.

  Args:
    z1: (N, d) projections of the first views.
    z2: (N, d) projections of the second views, same images in the same order.
    temperature: divides the cosine similarities (default 0.1).
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  Returns:
    A scalar: the mean over the 2N anchors.
  """
  _check_pair(z1, z2, 'nt_xent')
  z = l2_normalize(jnp.concatenate([gather(z1, axis_name), gather(z2, axis_name)]))
  n = z.shape[0] // 2
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # not itself
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(log_prob[jnp.arange(2 * n), positives])


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity of (N, d) arrays, (N,).

  Args:
    a: (N, d).
    b: (N, d).
  """
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def byol_loss(p1: jax.Array, p2: jax.Array, target_z1: jax.Array, target_z2: jax.Array, *,
              axis_name: str | None = None) -> jax.Array:
  """BYOL: ``2 - 2 cos(p1, sg(z'2)) + 2 - 2 cos(p2, sg(z'1))``, mean over the batch.

  Args:
    p1: (N, d) online predictions of the first views.
    p2: (N, d) online predictions of the second views.
    target_z1: (N, d) target-network projections of the first views; no gradient.
    target_z2: (N, d) target-network projections of the second views; no gradient.
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  Returns:
    A scalar.
  """
  _check_pair(p1, target_z2, 'byol_loss')
  p1, p2, t1, t2 = (gather(x, axis_name) for x in (p1, p2, target_z1, target_z2))
  t1, t2 = lax.stop_gradient(t1), lax.stop_gradient(t2)
  return jnp.mean((2 - 2 * cosine_similarity(p1, t2)) + (2 - 2 * cosine_similarity(p2, t1)))


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array, *,
                 axis_name: str | None = None) -> jax.Array:
  """SimSiam: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, mean over the batch.

  Args:
    p1: (N, d) predictions of the first views.
    p2: (N, d) predictions of the second views.
    z1: (N, d) projections of the first views; no gradient.
    z2: (N, d) projections of the second views; no gradient.
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  Returns:
    A scalar.
  """
  _check_pair(p1, z2, 'simsiam_loss')
  p1, p2, z1, z2 = (gather(x, axis_name) for x in (p1, p2, z1, z2))
  z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
  return -0.5 * (jnp.mean(cosine_similarity(p1, z2)) + jnp.mean(cosine_similarity(p2, z1)))


def _off_diagonal_square_sum(m: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(m)) - jnp.sum(jnp.square(jnp.diagonal(m)))


def vicreg_terms(z1: jax.Array, z2: jax.Array, *, eps: float = 1e-4,
                 axis_name: str | None = None) -> dict[str, jax.Array]:
  """VICReg's three unweighted terms: ``invariance``, ``variance``, ``covariance``.

  Args:
    z1: (N, d) projections of the first views (N >= 2).
    z2: (N, d) projections of the second views.
    eps: added to the unbiased variance under the root (default 1e-4).
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  Returns:
    ``{'invariance', 'variance', 'covariance'}``, scalars: the MSE, the mean of
    the two views' std hinges, the sum of their off-diagonal covariance terms / d.
  """
  _check_pair(z1, z2, 'vicreg')
  z1, z2 = gather(z1, axis_name), gather(z2, axis_name)
  n, d = z1.shape
  if n < 2:
    raise ValueError('VICReg needs at least 2 samples in the batch (unbiased variance).')

  def variance(z):
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jnp.mean(jax.nn.relu(1.0 - std))

  def covariance(z):
    z = z - jnp.mean(z, axis=0)
    return _off_diagonal_square_sum(z.T @ z / (n - 1)) / d

  return {'invariance': jnp.mean(jnp.square(z1 - z2)),
          'variance': 0.5 * (variance(z1) + variance(z2)),
          'covariance': covariance(z1) + covariance(z2)}


def vicreg_loss(z1: jax.Array, z2: jax.Array, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
                axis_name: str | None = None) -> jax.Array:
  """VICReg: weighted sum of :func:`vicreg_terms` (defaults 25, 25, 1); scalar.

  Args:
    z1: (N, d) projections of the first views (N >= 2).
    z2: (N, d) projections of the second views.
    sim_coeff: weight of the invariance term (default 25).
    std_coeff: weight of the variance term (default 25).
    cov_coeff: weight of the covariance term (default 1).
    eps: added to the variance under the root (default 1e-4).
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  """
  terms = vicreg_terms(z1, z2, eps=eps, axis_name=axis_name)
  return (sim_coeff * terms['invariance'] + std_coeff * terms['variance']
          + cov_coeff * terms['covariance'])


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, *, lambd: float = 0.0051,
                      eps: float = 1e-5, axis_name: str | None = None) -> jax.Array:
  """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``; scalar.

  Args:
    z1: (N, d) projections of the first views.
    z2: (N, d) projections of the second views.
    lambd: weight of the off-diagonal (redundancy) term (default 0.0051).
    eps: added to the biased batch variance when standardising (default 1e-5).
    axis_name: the pmap axis, if any; the inputs are then the local rows and are
      all-gathered first.
  """
  _check_pair(z1, z2, 'barlow_twins_loss')
  z1, z2 = gather(z1, axis_name), gather(z2, axis_name)

  def standardize(z):  # BatchNorm1d(affine=False) in training mode
    return (z - jnp.mean(z, axis=0)) / jnp.sqrt(jnp.var(z, axis=0) + eps)

  c = standardize(z1).T @ standardize(z2) / z1.shape[0]
  on_diagonal = jnp.sum(jnp.square(jnp.diagonal(c) - 1))
  return on_diagonal + lambd * _off_diagonal_square_sum(c)


def _check_rows(x, what, name, shape='(N, d)'):
  if getattr(x, 'ndim', None) != 2:
    raise ValueError(f'{what} expects {name} as a {shape} array, got shape '
                     f'{getattr(x, "shape", type(x).__name__)}.')


def _check_crops(crops, what, name):
  """``crops`` as a list of (B, K) arrays of one shape, one per crop."""
  if getattr(crops, 'ndim', None) == 2:
    raise ValueError(f'{what} expects {name} as a sequence of (B, K) arrays, one per crop, '
                     f'got a single array of shape {crops.shape}.')
  crops = list(crops)
  if not crops:
    raise ValueError(f'{what} expects at least one crop in {name}.')
  for x in crops:
    _check_rows(x, what, f'each crop of {name}', '(B, K)')
  shapes = [tuple(x.shape) for x in crops]
  if len(set(shapes)) != 1:
    raise ValueError(f'{what} expects the crops of {name} to have one (B, K) shape, got '
                     f'{shapes}.')
  return crops


def moco_v2_loss(q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float = 0.2,
                 axis_name: str | None = None) -> jax.Array:
  """MoCo v2's InfoNCE loss; scalar.

  Args:
    q: (N, d) projections of the online (query) encoder.
    k: (N, d) projections of the momentum (key) encoder, same images, another
      view; no gradient flows into them.
    queue: (K, d) negatives from earlier batches, L2-normalised already (as
      stored by :func:`enqueue`), the same on every device; no gradient. With
      K = 0 rows the logits hold the positive alone and the loss is 0: no
      in-batch negatives are used in their place (that would be SimCLR).
    temperature: T, 0.2 in MoCo v2 (0.07 in v1).
    axis_name: the pmap axis, if any; ``q`` and ``k`` are then the local rows.

  ``logits = [q.k, q queue^T] / T`` for normalised q and k, cross-entropy with
  label 0, mean over the global batch. Update the queue with the keys *after*
  the loss (:func:`enqueue`), as the official code does.
  """
  _check_pair(q, k, 'moco_v2_loss')
  _check_rows(queue, 'moco_v2_loss', 'queue', '(K, d)')
  if queue.shape[1] != q.shape[1]:
    raise ValueError(f'moco_v2_loss expects a queue of {q.shape[1]}-d rows like q, got shape '
                     f'{queue.shape}.')
  q = l2_normalize(gather(q, axis_name))
  k = lax.stop_gradient(l2_normalize(gather(k, axis_name)))
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  negatives = q @ lax.stop_gradient(queue).T
  logits = jnp.concatenate([positive, negatives.astype(positive.dtype)], axis=1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def enqueue(queue: jax.Array, keys: jax.Array, pointer: jax.Array, *,
            axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """FIFO update of a MoCo / SwAV queue with the keys of the global batch.

  Args:
    queue: (K, d) stored rows, the same on every device.
    keys: (N, d) new rows (the local ones under pmap: all-gathered first, so
      N_global = N * devices rows are written). Written as given: normalise
      them first if the queue must hold unit vectors (MoCo).
    pointer: int32 scalar, the row where the oldest entry starts.
    axis_name: the pmap axis, if any.

  Returns:
    ``(new_queue, new_pointer)``: rows ``pointer, ..., pointer + N_global - 1``
    (modulo K: K need not be a multiple of N_global, the write wraps around)
    replaced by the keys in order, and ``(pointer + N_global) % K`` as int32.
    No gradient flows through it.
  """
  _check_rows(queue, 'enqueue', 'queue', '(K, d)')
  _check_rows(keys, 'enqueue', 'keys', '(N, d)')
  if keys.shape[1] != queue.shape[1]:
    raise ValueError(f'enqueue expects keys of the queue\'s width {queue.shape[1]}, got shape '
                     f'{keys.shape}.')
  if jnp.ndim(pointer) != 0:
    raise ValueError(f'enqueue expects a scalar pointer, got shape {jnp.shape(pointer)}.')
  keys = lax.stop_gradient(gather(keys, axis_name))
  size, n = queue.shape[0], keys.shape[0]
  if n > size:
    raise ValueError(f'enqueue: the global batch of {n} keys does not fit in a queue of {size} '
                     f'rows; use a queue of at least {n} rows.')
  pointer = jnp.asarray(pointer, jnp.int32)
  rows = (pointer + jnp.arange(n, dtype=jnp.int32)) % size
  new_queue = lax.stop_gradient(jnp.asarray(queue)).at[rows].set(keys.astype(queue.dtype),
                                                    unique_indices=True)
  return new_queue, (pointer + n) % size


def moco_v3_loss(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, *,
                 temperature: float = 1.0, axis_name: str | None = None) -> jax.Array:
  """MoCo v3: ``ctr(q1, k2) + ctr(q2, k1)``; scalar.

  Args:
    q1, q2: (N, d) predictor outputs of the online encoder for the two views.
    k1, k2: (N, d) momentum-encoder projections of the two views; no gradient.
    temperature: T, 1.0 in the official ResNet-50 recipe, 0.2 for ViTs.
    axis_name: the pmap axis, if any; all four are then the local rows.

  ``ctr(q, k) = CrossEntropy(normalize(q) normalize(k)^T / T, arange) * 2T``
  over the global batch: each query's positive is the key of its own image,
  the negatives are the keys of all other images of the global batch. The
  official code pairs each GPU's local queries with the all-gathered keys and
  averages over its local queries; the mean over the global batch of queries
  computed here equals that per-GPU value averaged over the GPUs (which is
  what DDP's averaged gradient optimises).
  """
  for a, b in ((q1, q2), (q1, k1), (q1, k2)):
    _check_pair(a, b, 'moco_v3_loss')

  def ctr(q, k):
    q = l2_normalize(gather(q, axis_name))
    k = lax.stop_gradient(l2_normalize(gather(k, axis_name)))
    log_prob = jax.nn.log_softmax(q @ k.T / temperature, axis=-1)
    return -jnp.mean(jnp.diagonal(log_prob)) * (2 * temperature)

  return ctr(q1, k2) + ctr(q2, k1)


def sinkhorn(scores: jax.Array, *, epsilon: float = 0.05, iterations: int = 3,
             axis_name: str | None = None) -> jax.Array:
  """SwAV's Sinkhorn-Knopp codes of prototype scores, (B, K) float32.

  Args:
    scores: (B, K) scores of the local samples against the K prototypes
      (cosine similarities in SwAV); no gradient.
    epsilon: the entropic regularisation, 0.05 in SwAV.
    iterations: Sinkhorn iterations (at least 1), 3 in SwAV.
    axis_name: the pmap axis, if any. The total and the per-prototype sums are
      then summed over all devices (``distributed_sinkhorn``): every prototype
      gets an equal share of the *global* batch.

  Returns:
    The soft assignments of the local rows, each row summing to 1 (the
    official ``Q *= B`` and transpose). Computed in float32 under stop_gradient.

  The official code takes ``exp(scores / epsilon)`` directly, which overflows
  float32 once a score exceeds 88 * epsilon (4.4 at 0.05). Here the global max
  of the scores is subtracted first: a common factor exp(-max / epsilon) that
  the first normalisation removes, so the result is mathematically identical.
  Scores spanning more than ~87 * epsilon can still underflow a whole row to
  zero (as in the official code); SwAV's cosine scores span at most 2.
  """
  _check_rows(scores, 'sinkhorn', 'scores', '(B, K)')
  if iterations < 1:
    raise ValueError(f'sinkhorn needs at least 1 iteration (rows sum to 1 after a column '
                     f'normalisation), got {iterations}.')

  def total(x):
    return x if axis_name is None else lax.psum(x, axis_name)

  s = lax.stop_gradient(scores).astype(jnp.float32)
  rows, prototypes = s.shape
  high = jnp.max(s)
  if axis_name is not None:
    high = lax.pmax(high, axis_name)
  q = jnp.exp((s - high) / epsilon)
  samples = total(jnp.asarray(rows, jnp.float32))  # B of the paper: the global batch
  q = q / total(jnp.sum(q))
  for _ in range(iterations):
    q = q / total(jnp.sum(q, axis=0, keepdims=True))  # each prototype: 1/K of the mass
    q = q / prototypes
    q = q / jnp.sum(q, axis=1, keepdims=True)  # each sample: 1/B of the mass
    q = q / samples
  return lax.stop_gradient(q * samples)


def swav_loss(scores, *, temperature: float = 0.1, epsilon: float = 0.05,
              sinkhorn_iterations: int = 3, crops_for_assign=(0, 1), queue_scores=None,
              axis_name: str | None = None) -> jax.Array:
  """SwAV's swapped-prediction loss; scalar.

  Args:
    scores: sequence of (B, K) prototype scores, one per crop, the global crops
      first (multi-crop: any number of smaller crops after them).
    temperature: softmax temperature of the predictions, 0.1.
    epsilon, sinkhorn_iterations: of :func:`sinkhorn` (0.05, 3).
    crops_for_assign: indices of the crops whose codes are computed (0, 1).
    queue_scores: ``None`` or one (Q, K) array per entry of
      ``crops_for_assign`` (the official ``queue[i]`` goes with the i-th crop
      assigned): scores of stored embeddings, prepended to the crop's scores
      for Sinkhorn only; no gradient. Under pmap each device passes its own
      share of the queue, as the official per-GPU queue; the single-device
      equivalent is the concatenation of the shares. Whether the queue is used
      yet (official: once full) is the caller's choice.
    axis_name: the pmap axis, if any; ``scores`` are then the local rows.

  For each assigned crop i: ``q = sinkhorn([queue_i; scores_i])[-B:]`` and the
  term ``mean over v != i of -mean_rows(sum(q * log_softmax(scores_v / T)))``;
  the loss is the mean of the terms over the assigned crops (the official main
  loop). Sinkhorn runs over all devices' rows, the means over the global batch.
  """
  scores = _check_crops(scores, 'swav_loss', 'scores')
  if len(scores) < 2:
    raise ValueError('swav_loss needs at least 2 crops (codes of one crop predict the others).')
  crops_for_assign = tuple(crops_for_assign)
  if not crops_for_assign:
    raise ValueError('swav_loss expects at least one crop in crops_for_assign.')
  for i in crops_for_assign:
    if not 0 <= i < len(scores):
      raise ValueError(f'swav_loss: crops_for_assign {crops_for_assign} out of range for '
                       f'{len(scores)} crops.')
  batch, prototypes = scores[0].shape
  if queue_scores is not None:
    queue_scores = list(queue_scores)
    if len(queue_scores) != len(crops_for_assign):
      raise ValueError(f'swav_loss expects one queue_scores array per crop in crops_for_assign '
                       f'({len(crops_for_assign)}), got {len(queue_scores)}.')
    for x in queue_scores:
      _check_rows(x, 'swav_loss', 'each of queue_scores', '(Q, K)')
      if x.shape[1] != prototypes:
        raise ValueError(f'swav_loss expects queue_scores of {prototypes} prototypes like the '
                         f'scores, got shape {x.shape}.')

  log_p = [jax.nn.log_softmax(gather(s, axis_name) / temperature, axis=-1) for s in scores]
  loss = 0.0
  for j, i in enumerate(crops_for_assign):
    out = scores[i]
    if queue_scores is not None:
      out = jnp.concatenate([lax.stop_gradient(queue_scores[j]).astype(out.dtype), out])
    q = sinkhorn(out, epsilon=epsilon, iterations=sinkhorn_iterations,
                 axis_name=axis_name)[out.shape[0] - batch:]
    q = gather(q, axis_name)
    terms = [-jnp.mean(jnp.sum(q * log_p[v], axis=-1)) for v in range(len(scores)) if v != i]
    loss = loss + sum(terms) / len(terms)
  return loss / len(crops_for_assign)


def dino_loss(student, teacher, center: jax.Array, *, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04, axis_name: str | None = None) -> jax.Array:
  """DINO's self-distillation loss; scalar.

  Args:
    student: sequence of (B, K) student head outputs, one per crop, the global
      crops first (then any number of local crops).
    teacher: sequence of (B, K) teacher head outputs of the global crops (2 in
      DINO), in the order of the student's first crops; no gradient.
    center: (K,) or (1, K) center of the teacher outputs (:func:`dino_center`);
      no gradient.
    student_temperature: 0.1.
    teacher_temperature: 0.04 (DINO warms it up from 0.04 to 0.04-0.07 over
      the first 30 epochs; pass the scheduled value).
    axis_name: the pmap axis, if any; the crops are then the local rows.

  Teacher probabilities ``softmax((t - center) / teacher_temperature)``; for
  every pair (teacher crop iq, student crop v != iq) the term is
  ``mean over the global batch of sum(-q * log_softmax(s_v / student_temperature))``;
  the loss is the mean over the pairs (the official ``DINOLoss``).
  """
  student = _check_crops(student, 'dino_loss', 'student')
  teacher = _check_crops(teacher, 'dino_loss', 'teacher')
  if teacher[0].shape != student[0].shape:
    raise ValueError(f'dino_loss expects teacher crops of the student crops\' shape '
                     f'{student[0].shape}, got {teacher[0].shape}.')
  if len(teacher) > len(student):
    raise ValueError(f'dino_loss expects the teacher crops to be the first of the student '
                     f'crops, got {len(teacher)} teacher and {len(student)} student crops.')
  if len(student) < 2:
    raise ValueError('dino_loss needs at least 2 student crops (a crop is never compared with '
                     'itself).')
  k = student[0].shape[1]
  if tuple(jnp.shape(center)) not in ((k,), (1, k)):
    raise ValueError(f'dino_loss expects a center of shape ({k},) or (1, {k}), got '
                     f'{jnp.shape(center)}.')
  center = lax.stop_gradient(jnp.reshape(center, (1, k)))
  probs = [lax.stop_gradient(jax.nn.softmax((gather(t, axis_name) - center)
                                            / teacher_temperature, axis=-1)) for t in teacher]
  log_p = [jax.nn.log_softmax(gather(s, axis_name) / student_temperature, axis=-1)
           for s in student]
  terms = [jnp.mean(jnp.sum(-q * log_p[v], axis=-1))
           for iq, q in enumerate(probs) for v in range(len(student)) if v != iq]
  return sum(terms) / len(terms)


def dino_center(center: jax.Array, teacher, *, momentum: float = 0.9,
                axis_name: str | None = None) -> jax.Array:
  """DINO's center update, ``center * m + batch_center * (1 - m)``, shaped as ``center``.

  Args:
    center: (K,) or (1, K) current center.
    teacher: the teacher outputs, a sequence of (B, K) crops (the 2 global
      crops in DINO) or one (N, K) array; no gradient.
    momentum: m, 0.9.
    axis_name: the pmap axis, if any; ``teacher`` is then the local rows.

  ``batch_center`` is the mean of the teacher outputs over all crops and the
  global batch (the official all-reduce of the sums, divided by the global
  count).
  """
  if getattr(teacher, 'ndim', None) == 2:
    teacher = [teacher]
  rows = jnp.concatenate(_check_crops(teacher, 'dino_center', 'teacher'))
  k = rows.shape[1]
  if tuple(jnp.shape(center)) not in ((k,), (1, k)):
    raise ValueError(f'dino_center expects a center of shape ({k},) or (1, {k}), got '
                     f'{jnp.shape(center)}.')
  rows = lax.stop_gradient(rows)
  sums, count = jnp.sum(rows, axis=0), jnp.asarray(rows.shape[0], rows.dtype)
  if axis_name is not None:
    sums, count = lax.psum(sums, axis_name), lax.psum(count, axis_name)
  return center * momentum + jnp.reshape(sums / count, jnp.shape(center)) * (1 - momentum)


__all__ = ['barlow_twins_loss', 'byol_loss', 'cosine_similarity', 'dino_center', 'dino_loss',
           'enqueue', 'gather', 'moco_v2_loss', 'moco_v3_loss', 'nt_xent', 'simsiam_loss',
           'sinkhorn', 'swav_loss', 'vicreg_loss', 'vicreg_terms']

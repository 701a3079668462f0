"""Linear probe on frozen representations (optax), jitted and reproducible for a seed.

The default recipe is the ImageNet-100 linear evaluation the paper builds on:
SGD with momentum 0.9, learning rate 0.1, 100 epochs, batch 256, step decay x0.1
at epochs 60 and 80, no weight decay. Differences, all options:

* the probe trains on stored representations of the evaluation-preprocessed
  images (no random-resized-crop/flip augmentation: that would need a forward
  pass per step), as "fast" linear evaluation does;
* features are standardised with the training split's mean and std by default
  (``feature_norm='standardize'``, like a non-affine BatchNorm before the
  linear layer), which makes the fixed learning rate work across backbones;
  ``'none'`` and ``'l2'`` are available.

Training keeps the features on the host and moves one block of minibatches at a
time to the devices, where a jitted ``lax.scan`` runs the optax updates; the
same seed gives the same permutation, initialisation and result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qscore_jax import validation

FEATURE_NORMS = ('standardize', 'l2', 'none')


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Linear-probe recipe (defaults: the paper's ImageNet-100 recipe).

  Attributes:
    epochs: passes over the training representations (default 100).
    batch_size: minibatch size (default 256; at most N).
    learning_rate: initial SGD learning rate (default 0.1).
    momentum: SGD momentum (default 0.9; 0 for plain SGD).
    weight_decay: L2 weight decay added to the gradient (default 0).
    schedule: ``'step'`` (multiply by ``decay`` at ``milestones``) or
      ``'cosine'`` (cosine decay to 0 over all steps).
    milestones: epochs of the step decays for a 100-epoch run (default 60, 80),
      rescaled to ``epochs`` (:meth:`scaled_milestones`).
    decay: factor applied at each milestone (default 0.1).
    feature_norm: ``'standardize'`` (training split's mean and std, default),
      ``'l2'`` or ``'none'``.
    label_smoothing: label smoothing of the cross-entropy (default 0).
    steps_per_block: minibatches moved to the devices and run by one jitted
      ``lax.scan`` (default 64).
    seed: seed of the initialisation and the minibatch order.
  """
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = 'step'  # 'step' (decay at milestones) or 'cosine'
  milestones: tuple[int, ...] = (60, 80)
  decay: float = 0.1
  feature_norm: str = 'standardize'
  label_smoothing: float = 0.0
  steps_per_block: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.feature_norm not in FEATURE_NORMS:
      raise ValueError(f'feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}.')
    if self.schedule not in ('step', 'cosine'):
      raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}.")
    validation.check_number(self.epochs, 'probe epochs', minimum=1, integer=True)
    validation.check_number(self.batch_size, 'probe batch_size', minimum=1, integer=True)
    validation.check_number(self.learning_rate, 'probe learning_rate', above=0)
    validation.check_number(self.momentum, 'probe momentum', minimum=0, below=1)
    validation.check_number(self.weight_decay, 'probe weight_decay', minimum=0)
    validation.check_number(self.decay, 'probe decay', above=0, maximum=1)
    validation.check_number(self.label_smoothing, 'probe label_smoothing', minimum=0, below=1)
    validation.check_number(self.steps_per_block, 'probe steps_per_block', minimum=1,
                            integer=True)

  def scaled_milestones(self) -> tuple[int, ...]:
    """Milestones rescaled when fewer/more epochs than the 100 of the recipe are run."""
    return tuple(max(1, round(m * self.epochs / 100)) for m in self.milestones)


@dataclasses.dataclass
class LinearProbe:
  """A trained probe: ``logits = normalize(h) @ kernel + bias``.

  Attributes:
    kernel: (d, C) float32 weights.
    bias: (C,) float32.
    mean: (d,) float32 training mean for ``'standardize'``, else None.
    scale: (d,) float32 training std (1 where it is ~0) for ``'standardize'``,
      else None.
    feature_norm: ``'standardize'``, ``'l2'`` or ``'none'``.
    losses: (epochs,) mean training loss per epoch.
  """
  kernel: np.ndarray  # (d, C)
  bias: np.ndarray  # (C,)
  mean: np.ndarray | None
  scale: np.ndarray | None
  feature_norm: str
  losses: np.ndarray  # mean training loss per epoch

  def normalize(self, h):
    """The probe's feature normalisation of representations (N, d) -> (N, d) float32.

    Args:
      h: representations (N, d).
    """
    h = jnp.asarray(h, jnp.float32)
    if self.feature_norm == 'standardize':
      return (h - self.mean) / self.scale
    if self.feature_norm == 'l2':
      return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    return h

  def logits(self, h, chunk_rows: int = 65536) -> np.ndarray:
    """Logits (N, C) of representations (N, d), in chunks.

    Args:
      h: representations (N, d) (an array or memory map).
      chunk_rows: rows per jitted call (default 65536).
    Returns:
      float32 (N, C) NumPy array.
    """
    apply = jax.jit(lambda x: self.normalize(x) @ self.kernel + self.bias)
    parts = [np.asarray(apply(np.asarray(h[i:i + chunk_rows], np.float32)))
             for i in range(0, len(h), chunk_rows)]
    return np.concatenate(parts) if parts else np.zeros((0, len(self.bias)), np.float32)


def _normalizer(h: np.ndarray, feature_norm: str):
  if feature_norm != 'standardize':
    return None, None
  mean = np.zeros(h.shape[1])
  square = np.zeros(h.shape[1])
  for i in range(0, len(h), 65536):  # float64 sums, chunked: bounded memory
    block = np.asarray(h[i:i + 65536], np.float64)
    mean += block.sum(0)
    square += np.square(block).sum(0)
  mean /= len(h)
  std = np.sqrt(np.maximum(square / len(h) - mean ** 2, 0))
  return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def train_linear_probe(h: np.ndarray, labels: np.ndarray, num_classes: int,
                       config: ProbeConfig = ProbeConfig()) -> LinearProbe:
  """Trains a linear classifier on frozen representations.

  Args:
    h: training representations (N, d) (an array or memory map).
    labels: int labels (N,) in ``0..num_classes-1``.
    num_classes: C.
    config: the recipe.
  """
  labels = np.asarray(labels, np.int32)
  if len(h) != len(labels) or len(h) == 0:
    raise ValueError(f'need as many labels as representations (> 0); got {len(h)} and {len(labels)}.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}.')
  n, d = h.shape
  batch = min(config.batch_size, n)
  steps_per_epoch = -(-n // batch)
  mean, scale = _normalizer(h, config.feature_norm)
  probe = LinearProbe(np.zeros((d, num_classes), np.float32), np.zeros(num_classes, np.float32),
                      mean, scale, config.feature_norm, np.zeros(0))
  if config.schedule == 'step':
    boundaries = {m * steps_per_epoch: config.decay for m in config.scaled_milestones()}
    schedule = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  else:
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
  optimizer = optax.sgd(schedule, momentum=config.momentum or None)
  if config.weight_decay:
    optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)

  rng = np.random.default_rng(config.seed)
  limit = 1.0 / np.sqrt(d)  # torch.nn.Linear's default initialisation
  params = {'kernel': jnp.asarray(rng.uniform(-limit, limit, (d, num_classes)), jnp.float32),
            'bias': jnp.asarray(rng.uniform(-limit, limit, num_classes), jnp.float32)}
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y, valid):
    logits = probe.normalize(x) @ params['kernel'] + params['bias']
    targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), config.label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)

  @jax.jit
  def run_block(params, opt_state, xs, ys, valids):
    def step(carry, inputs):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *inputs)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xs, ys, valids))
    return params, opt_state, losses

  epoch_losses = []
  for _ in range(config.epochs):
    order = rng.permutation(n)
    # The last minibatch wraps around to full size; its repeated rows are masked out.
    index = np.concatenate([order, order[:steps_per_epoch * batch - n]])
    valid = (np.arange(steps_per_epoch * batch) < n).astype(np.float32)
    losses = []
    for first in range(0, steps_per_epoch, config.steps_per_block):
      steps = min(config.steps_per_block, steps_per_epoch - first)  # <= 2 distinct block lengths
      rows = index[first * batch:(first + steps) * batch]
      xs = np.asarray(h[rows], np.float32).reshape(steps, batch, d)
      ys = labels[rows].reshape(steps, batch)
      vs = valid[first * batch:(first + steps) * batch].reshape(steps, batch)
      params, opt_state, block_losses = run_block(params, opt_state, xs, ys, vs)
      losses.append(np.asarray(block_losses))
    epoch_losses.append(float(np.mean(np.concatenate(losses))))
  probe.kernel = np.asarray(params['kernel'])
  probe.bias = np.asarray(params['bias'])
  probe.losses = np.asarray(epoch_losses)
  return probe


def evaluate_probe(probe: LinearProbe, h, labels) -> dict[str, Any]:
  """Top-1/top-5 accuracy and per-sample predictions of a probe.

  Args:
    probe: a trained :class:`LinearProbe`.
    h: evaluation representations (N, d) (an array or memory map).
    labels: (N,) integer labels.
  Returns:
    dict with ``top1``, ``top5`` (fractions), and per sample (N,):
    ``predictions``, ``correct`` (bool), ``max_softmax``, ``true_class_probability``.
  """
  labels = np.asarray(labels)
  logits = probe.logits(h)
  probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
  predictions = logits.argmax(-1)
  k = min(5, logits.shape[1])
  top5 = np.argsort(-logits, axis=-1)[:, :k]
  return {
      'top1': float(np.mean(predictions == labels)),
      'top5': float(np.mean((top5 == labels[:, None]).any(-1))),
      'predictions': predictions,
      'correct': predictions == labels,
      'max_softmax': probabilities.max(-1),
      'true_class_probability': probabilities[np.arange(len(labels)), labels],
  }

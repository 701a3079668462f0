"""The train state, the optimizer and the data-parallel train step.

:class:`TrainState` holds everything a method needs between steps: online
parameters and BatchNorm statistics (backbone and heads), the optax state, the
EMA target network (BYOL, MoCo, DINO), the method's buffers (MoCo's queue,
SwAV's queue, DINO's center), the discriminative set D of the regularizer, and
the step. :func:`train_step` is the pure step
``(state, views) -> (state, metrics)``; :meth:`Trainer.jit_step` jits it over a
device mesh (state replicated, views split along ``'data'``); with
``axis_name`` the very same function runs under ``jax.pmap``. Under both,
BatchNorm statistics, the losses and the regularizer's batch means are computed
over the *global* batch (every device of every host).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from qscore_jax import parallel, regularizer
from qscore_jax.finetune.methods import OUTPUT_KEYS, LossContext, Method
from qscore_jax.models.heads import HeadSpec, l2_normalize


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: ``{'backbone', 'projector'[, 'predictor' | 'prototypes']}``.
    batch_stats: BatchNorm running statistics, same keys (empty dicts where none).
    opt_state: the optax state.
    target_params, target_batch_stats: the EMA target (backbone and the method's
      ``target_heads``), or empty.
    buffers: the method's non-trained state (e.g. ``queue``, ``queue_pointer``,
      ``center``), or empty.
    discriminative: bool (d,), the fixed D of the regularizer (all False if unused).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any
  target_batch_stats: Any
  buffers: Any
  discriminative: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
  """The static parts of training: modules, method, optimizer, options.

  Frozen and hashed by identity, so jitted steps are cached per trainer.

  Attributes:
    backbone: the backbone module (``qscore_jax.models``).
    heads: the online head chain, ``(('projector', HeadSpec), ...)`` then
      ``predictor`` or ``prototypes`` as the method has them.
    method: the SSL :class:`~qscore_jax.finetune.methods.Method`.
    loss_options: ``(name, value)`` pairs of the method's loss options.
    optimizer: the optax transformation (:func:`make_optimizer`).
    schedule: the learning-rate schedule (logged as ``learning_rate``).
    regularizer: the regularizer's
      :class:`~qscore_jax.regularizer.RegularizerConfig` (default: off).
    total_steps: steps of the run (for schedules; default 1).
    ema_base: base momentum of the EMA target network (default 0).
  """
  backbone: nn.Module
  heads: tuple[tuple[str, HeadSpec], ...]  # the online chain: ('projector', spec), ...
  method: Method
  loss_options: tuple[tuple[str, Any], ...]
  optimizer: optax.GradientTransformation
  schedule: Any
  regularizer: regularizer.RegularizerConfig = regularizer.RegularizerConfig(kind='none')
  total_steps: int = 1
  ema_base: float = 0.0

  def head_modules(self, axis_name: str | None = None) -> dict[str, nn.Module]:
    """``{name: MLPHead}`` of the head chain.

    Args:
      axis_name: the pmap axis of their BatchNorm statistics (default None).
    """
    return {name: spec.build(bn_axis_name=axis_name) for name, spec in self.heads}

  def jit_step(self, mesh=None):
    """:func:`train_step` jitted over a mesh (state replicated, views split on ``'data'``).

    Args:
      mesh: the device mesh (default: every device of every process on ``'data'``).
    Returns:
      ``step(state, views) -> (state, metrics)``; the state argument is donated.
    """
    return _jitted_step(self, mesh or parallel.data_mesh())


@functools.lru_cache(maxsize=8)
def _jitted_step(trainer: Trainer, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.jit(functools.partial(train_step, trainer), in_shardings=(replicated, batch),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def ema_momentum(trainer: Trainer, step) -> jax.Array:
  """The target network's momentum at ``step``: constant (MoCo v2), or BYOL's cosine
  increase to 1, ``1 - (1 - base) (cos(pi k / K) + 1) / 2``.

  Args:
    trainer: gives the method's schedule, ``ema_base`` and K = ``total_steps``.
    step: k, the current step (int or scalar array).
  Returns:
    float32 scalar.
  """
  if trainer.method.ema_schedule == 'constant':
    return jnp.asarray(trainer.ema_base, jnp.float32)
  progress = jnp.minimum(step / max(trainer.total_steps, 1), 1.0)
  return 1 - (1 - trainer.ema_base) * (jnp.cos(jnp.pi * progress) + 1) / 2


def _forward(trainer: Trainer, params, batch_stats, views, axis_name, *, heads_used):
  """Backbone and the heads ``heads_used`` (a prefix of the chain) on every view, in
  training mode; returns ``{'h': [...], <output key>: [...]}`` and new statistics."""
  backbone = trainer.backbone
  if axis_name and hasattr(backbone, 'bn_axis_name'):  # ViTs have no BatchNorm
    backbone = backbone.clone(bn_axis_name=axis_name)
  modules = trainer.head_modules(axis_name)
  chain = [name for name, _ in trainer.heads if name in heads_used]
  outputs: dict[str, list] = {'h': [], **{OUTPUT_KEYS[name]: [] for name in chain}}
  stats = dict(batch_stats)
  for view in views:
    h, updated = backbone.apply({'params': params['backbone'],
                                 'batch_stats': stats['backbone']}, view, train=True,
                                mutable=['batch_stats'])
    stats['backbone'] = updated['batch_stats']
    outputs['h'].append(h)
    x = h
    for name in chain:
      # A predictor reads the projector's output; prototypes read it too (normalised).
      source = outputs['z'][-1] if name in ('predictor', 'prototypes') else x
      x, updated = modules[name].apply({'params': params[name],
                                        'batch_stats': stats.get(name, {})}, source, train=True,
                                       mutable=['batch_stats'])
      stats[name] = updated.get('batch_stats', {})
      outputs[OUTPUT_KEYS[name]].append(x)
  return outputs, stats


def train_step(trainer: Trainer, state: TrainState, views, *, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of the method's loss plus the regularizer.

  Args:
    trainer: the static parts.
    state: the train state (replicated).
    views: tuple of image batches, each (B, H_v, W_v, 3) (per device under pmap);
      the first ``method.global_views`` are the global crops.
    axis_name: the pmap axis, if any (statistics, losses and gradients are then
      reduced over it); None under ``jax.jit``.
  Returns:
    ``(new_state, metrics)``; metrics are global scalars: ``loss`` (total),
    ``ssl_loss``, ``regularizer`` and its terms, ``qscore_mean``/``qscore_min`` of the
    batch, ``learning_rate``, ``finite`` (1.0 when the loss is finite), and the
    method's own (e.g. DINO's ``teacher_temperature``).
  """
  method = trainer.method
  options = dict(trainer.loss_options)
  online_heads = tuple(name for name, _ in trainer.heads)
  global_views = tuple(views[:method.global_views])

  def loss_fn(params):
    outputs, stats = _forward(trainer, params, state.batch_stats, views, axis_name,
                              heads_used=online_heads)
    target_stats = state.target_batch_stats
    if method.target:
      target, target_stats = _forward(
          trainer, state.target_params, state.target_batch_stats, global_views, axis_name,
          heads_used=method.target_heads)
      outputs.update({f'target_{k}': [lax.stop_gradient(x) for x in v]
                      for k, v in target.items() if k != 'h'})
    context = LossContext(options, state.buffers, params, state.step, trainer.total_steps,
                          axis_name)
    ssl, buffers, extra = method.loss(outputs, context)
    reg, terms = regularizer.regularizer(outputs['h'][:method.global_views], trainer.regularizer,
                                         state.discriminative, axis_name=axis_name)
    return ssl + reg, (ssl, reg, terms, extra, stats, target_stats, buffers, outputs['h'][0])

  (loss, (ssl, reg, terms, extra, stats, target_stats, buffers, h0)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  frozen = _frozen(method, options, state.step)
  # A frozen head gets no gradient and no update (weight decay included): it stays as it is.
  grads = _zero_head_while(frozen, grads, method)
  updates, opt_state = trainer.optimizer.update(grads, state.opt_state, state.params)
  updates = _zero_head_while(frozen, updates, method)
  params = optax.apply_updates(state.params, updates)
  if method.unit_columns_head:
    params = unit_columns(params, method.unit_columns_head)
  target_params = state.target_params
  if method.target:
    tau = ema_momentum(trainer, state.step)
    online = {name: params[name] for name in target_params}
    target_params = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, target_params, online)
  metrics = {'loss': loss, 'ssl_loss': ssl, 'regularizer': reg,
             'learning_rate': trainer.schedule(state.step),
             'finite': jnp.isfinite(loss).astype(jnp.float32), **terms, **extra}
  if 'qscore_mean' not in metrics:  # monitor Q even when the regularizer is off
    h = lax.stop_gradient(h0 if axis_name is None else lax.all_gather(h0, axis_name, tiled=True))
    d = state.discriminative
    members = jnp.where(jnp.any(d), d, regularizer.batch_discriminative(h))
    q = regularizer.stats.qscore(h, members)
    metrics.update(qscore_mean=jnp.mean(q), qscore_min=jnp.min(q))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state, target_params=target_params,
                            target_batch_stats=target_stats, buffers=buffers)
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def _frozen(method: Method, options: Mapping[str, Any], step) -> jax.Array | None:
  """True while the method's frozen head must not move; None if it has none."""
  if method.frozen_head is None or not options.get(method.frozen_head[1]):
    return None
  return step < options[method.frozen_head[1]]


def _zero_head_while(frozen, tree, method: Method):
  """``tree`` (grads or updates) with the frozen head's leaves zeroed while ``frozen``."""
  if frozen is None:
    return tree
  head = method.frozen_head[0]
  return {**tree, head: jax.tree.map(lambda x: jnp.where(frozen, jnp.zeros_like(x), x),
                                     tree[head])}


def unit_columns(params, head: str):
  """``params`` with the last kernel of ``head`` renormalised to unit-norm columns
  (SwAV normalises its prototypes before every step)."""
  layers = params[head]
  last = sorted(layers, key=lambda name: int(name.rsplit('_', 1)[-1]))[-1]
  kernel = layers[last]['kernel']
  normalized = l2_normalize(kernel.T).T
  return {**params, head: {**layers, last: {**layers[last], 'kernel': normalized}}}


# --- the optimizer -------------------------------------------------------------------------

def _is_matrix(params):
  """True for weights (ndim > 1); biases and BatchNorm/LayerNorm parameters are excluded
  from weight decay and from LARS adaptation, as in the releases."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(name: str, learning_rate: float, *, weight_decay: float, momentum: float,
                   total_steps: int, warmup_steps: int, schedule: str = 'cosine'
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """LARS, SGD or AdamW with linear warm-up and cosine (or constant) decay.

  Weight decay (and LARS's trust ratio) applies to weights with more than one
  dimension only.

  Args:
    name: ``'lars'``, ``'sgd'`` or ``'adamw'``.
    learning_rate: peak learning rate.
    weight_decay: weight decay of the kernels.
    momentum: momentum (LARS, SGD; 0 gives plain SGD; unused by AdamW).
    total_steps: steps of the schedule.
    warmup_steps: linear warm-up from 0 (at most ``total_steps - 1``).
    schedule: ``'cosine'`` (decay to 0, default) or ``'constant'``.
  Returns:
    ``(optimizer, learning-rate schedule)``.
  """
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  if schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                            max(total_steps, warmup_steps + 1))
  elif schedule == 'constant':
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                               optax.constant_schedule(learning_rate)], [warmup_steps]) \
        if warmup_steps else optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"optimizer schedule must be 'cosine' or 'constant', got {schedule!r}.")
  if name == 'lars':
    tx = optax.lars(lr, weight_decay=weight_decay, weight_decay_mask=_is_matrix,
                    trust_ratio_mask=_is_matrix, momentum=momentum)
  elif name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=_is_matrix),
                     optax.sgd(lr, momentum=momentum or None))
  elif name == 'adamw':
    tx = optax.adamw(lr, weight_decay=weight_decay, mask=_is_matrix)
  else:
    raise ValueError(f"optimizer must be 'lars', 'sgd' or 'adamw', got {name!r}.")
  return tx, lr


# --- building a state ----------------------------------------------------------------------

def head_input_dim(trainer: Trainer, name: str, dim: int) -> int:
  """Input width of a head: the backbone's for the projector, the projector's output for
  a predictor or prototypes.

  Args:
    trainer: gives the head chain.
    name: the head (``'projector'``, ``'predictor'`` or ``'prototypes'``).
    dim: d, the backbone's representation size.
  """
  return dim if name == 'projector' else dict(trainer.heads)['projector'].layers[-1].features


def head_output_dims(trainer: Trainer) -> dict[str, int]:
  """Output width of every head.

  Args:
    trainer: gives the head chain.
  """
  return {name: spec.layers[-1].features for name, spec in trainer.heads}


def init_heads(trainer: Trainer, key: jax.Array, dim: int,
               given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Variables of every head: the given (converted/pre-trained) ones, else fresh.

  Args:
    trainer: gives the head chain.
    key: seeds the fresh heads (folded with each head's index).
    dim: d, the backbone's representation size.
    given: ``{name: {'params', 'batch_stats'}}`` of heads to keep as they are.
  Returns:
    ``{name: {'params', 'batch_stats'}}`` for every head of the chain.
  """
  given = dict(given or {})
  out = {}
  for index, (name, spec) in enumerate(trainer.heads):
    if name in given:
      out[name] = given[name]
      continue
    variables = jax.jit(spec.build().init)(
        jax.random.fold_in(key, index), jnp.zeros((2, head_input_dim(trainer, name, dim))))
    out[name] = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return out


def create_state(trainer: Trainer, backbone_variables: Mapping[str, Any],
                 head_variables: Mapping[str, Any], discriminative=None,
                 key: jax.Array | None = None) -> TrainState:
  """The initial state from backbone and head variables (host or device arrays).

  ``key`` seeds the method's buffers (MoCo v2's initial queue); default key 0.

  Args:
    trainer: the static parts.
    backbone_variables: ``{'params', 'batch_stats'}`` of the backbone.
    head_variables: ``{name: {'params', 'batch_stats'}}`` of every head
      (:func:`init_heads`).
    discriminative: (d,) bool, the regularizer's fixed D (default: all False).
    key: seeds the buffers.
  """
  names = [name for name, _ in trainer.heads]
  params = {'backbone': backbone_variables['params'],
            **{n: head_variables[n]['params'] for n in names}}
  batch_stats = {'backbone': backbone_variables.get('batch_stats', {}),
                 **{n: head_variables[n].get('batch_stats', {}) for n in names}}
  params = jax.tree.map(jnp.asarray, params)
  batch_stats = jax.tree.map(jnp.asarray, batch_stats)
  method = trainer.method
  if method.unit_columns_head:
    params = unit_columns(params, method.unit_columns_head)
  if method.target:
    names = ('backbone', *method.target_heads)
    target_params, target_stats = jax.tree.map(
        jnp.copy, ({n: params[n] for n in names}, {n: batch_stats[n] for n in names}))
  else:
    target_params, target_stats = {}, {}
  buffers = {}
  if method.init_buffers is not None:
    buffers = method.init_buffers(head_output_dims(trainer), dict(trainer.loss_options),
                                  jax.random.key(0) if key is None else key)
  dim = trainer.backbone.num_features
  d = np.zeros(dim, bool) if discriminative is None else np.asarray(discriminative, bool)
  if d.shape != (dim,):
    raise ValueError(f'the discriminative set has shape {d.shape}, expected ({dim},).')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=trainer.optimizer.init(params), target_params=target_params,
                    target_batch_stats=target_stats, buffers=buffers,
                    discriminative=jnp.asarray(d))


__all__ = ['TrainState', 'Trainer', 'create_state', 'ema_momentum', 'head_input_dim',
           'head_output_dims', 'init_heads', 'make_optimizer', 'train_step', 'unit_columns']

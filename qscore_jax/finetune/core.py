"""The train state, the optimizer and the data-parallel train step.

:class:`TrainState` holds everything a method needs between steps: online
parameters and BatchNorm statistics (backbone and heads), the optax state, the
EMA target network (BYOL-like methods), the discriminative set D of the
regularizer, and the step. :func:`train_step` is the pure step
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
from qscore_jax.finetune.methods import Method
from qscore_jax.models.heads import HeadSpec


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: ``{'backbone', 'projector'[, 'predictor']}``.
    batch_stats: BatchNorm running statistics, same keys (empty dicts where none).
    opt_state: the optax state.
    target_params, target_batch_stats: the EMA target (backbone, projector), or empty.
    discriminative: bool (d,), the fixed D of the regularizer (all False if unused).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any
  target_batch_stats: Any
  discriminative: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
  """The static parts of training: modules, method, optimizer, options.

  Frozen and hashed by identity, so jitted steps are cached per trainer.
  """
  backbone: nn.Module
  heads: tuple[tuple[str, HeadSpec], ...]  # ('projector', spec), ('predictor', spec)
  method: Method
  loss_options: tuple[tuple[str, Any], ...]
  optimizer: optax.GradientTransformation
  schedule: Any
  regularizer: regularizer.RegularizerConfig = regularizer.RegularizerConfig(kind='none')
  total_steps: int = 1
  ema_base: float = 0.0

  def head_modules(self, axis_name: str | None = None) -> dict[str, nn.Module]:
    return {name: spec.build(bn_axis_name=axis_name) for name, spec in self.heads}

  def jit_step(self, mesh=None):
    """:func:`train_step` jitted over a mesh (state replicated, views split on ``'data'``)."""
    return _jitted_step(self, mesh or parallel.data_mesh())


@functools.lru_cache(maxsize=8)
def _jitted_step(trainer: Trainer, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.jit(functools.partial(train_step, trainer), in_shardings=(replicated, batch),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def ema_momentum(trainer: Trainer, step) -> jax.Array:
  """BYOL's target momentum: 1 - (1 - base) (cos(pi k / K) + 1) / 2."""
  progress = jnp.minimum(step / max(trainer.total_steps, 1), 1.0)
  return 1 - (1 - trainer.ema_base) * (jnp.cos(jnp.pi * progress) + 1) / 2


def _forward(trainer: Trainer, params, batch_stats, views, axis_name, *, heads_used):
  """Backbone and heads on every view, training mode; returns outputs and new statistics."""
  backbone = trainer.backbone
  if axis_name and hasattr(backbone, 'bn_axis_name'):  # ViTs have no BatchNorm
    backbone = backbone.clone(bn_axis_name=axis_name)
  modules = trainer.head_modules(axis_name)
  outputs: dict[str, list] = {'h': [], 'z': [], 'p': []}
  stats = dict(batch_stats)
  for view in views:
    h, updated = backbone.apply({'params': params['backbone'],
                                 'batch_stats': stats['backbone']}, view, train=True,
                                mutable=['batch_stats'])
    stats['backbone'] = updated['batch_stats']
    outputs['h'].append(h)
    x = h
    for name, key in (('projector', 'z'), ('predictor', 'p')):
      if name not in heads_used:
        continue
      x, updated = modules[name].apply({'params': params[name],
                                        'batch_stats': stats.get(name, {})}, x, train=True,
                                       mutable=['batch_stats'])
      stats[name] = updated.get('batch_stats', {})
      outputs[key].append(x)
  return outputs, stats


def train_step(trainer: Trainer, state: TrainState, views, *, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of the method's loss plus the regularizer.

  Args:
    trainer: the static parts.
    state: the train state (replicated).
    views: tuple of image batches, each (B, H_v, W_v, 3) (per device under pmap).
    axis_name: the pmap axis name (None under jit over a mesh).
  Returns:
    ``(new_state, metrics)``; metrics are global scalars: ``loss`` (total),
    ``ssl_loss``, ``regularizer`` and its terms, ``qscore_mean``/``qscore_min`` of the
    batch, ``learning_rate``, ``finite`` (1.0 when the loss is finite).
  """
  method = trainer.method
  online_heads = ('projector', 'predictor') if method.predictor else ('projector',)
  options = dict(trainer.loss_options)

  def loss_fn(params):
    outputs, stats = _forward(trainer, params, state.batch_stats, views, axis_name,
                              heads_used=online_heads)
    if method.target:
      target, target_stats = _forward(
          trainer, state.target_params, state.target_batch_stats, views, axis_name,
          heads_used=('projector',))
      outputs['target_z'] = [lax.stop_gradient(z) for z in target['z']]
    else:
      target_stats = state.target_batch_stats
    ssl = method.loss(outputs, options, axis_name)
    reg, terms = regularizer.regularizer(outputs['h'], trainer.regularizer,
                                         state.discriminative, axis_name=axis_name)
    return ssl + reg, (ssl, reg, terms, stats, target_stats, outputs['h'][0])

  (loss, (ssl, reg, terms, stats, target_stats, h0)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  updates, opt_state = trainer.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  target_params = state.target_params
  if method.target:
    tau = ema_momentum(trainer, state.step)
    online = {'backbone': params['backbone'], 'projector': params['projector']}
    target_params = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, target_params, online)
  metrics = {'loss': loss, 'ssl_loss': ssl, 'regularizer': reg,
             'learning_rate': trainer.schedule(state.step),
             'finite': jnp.isfinite(loss).astype(jnp.float32), **terms}
  if 'qscore_mean' not in metrics:  # monitor Q even when the regularizer is off
    h = lax.stop_gradient(h0 if axis_name is None else lax.all_gather(h0, axis_name, tiled=True))
    d = state.discriminative
    members = jnp.where(jnp.any(d), d, regularizer.batch_discriminative(h))
    q = regularizer.stats.qscore(h, members)
    metrics.update(qscore_mean=jnp.mean(q), qscore_min=jnp.min(q))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state, target_params=target_params,
                            target_batch_stats=target_stats)
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# --- the optimizer -------------------------------------------------------------------------

def _is_matrix(params):
  """True for weights (ndim > 1); biases and BatchNorm/LayerNorm parameters are excluded
  from weight decay and from LARS adaptation, as in the releases."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(name: str, learning_rate: float, *, weight_decay: float, momentum: float,
                   total_steps: int, warmup_steps: int, schedule: str = 'cosine'
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """LARS, SGD or AdamW with linear warm-up and cosine (or constant) decay."""
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
  """Input width of a head: the backbone's for the projector, the projector's output after."""
  return dim if name == 'projector' else dict(trainer.heads)['projector'].layers[-1].features


def init_heads(trainer: Trainer, key: jax.Array, dim: int,
               given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Variables of every head: the given (converted/pre-trained) ones, else fresh."""
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
                 head_variables: Mapping[str, Any], discriminative=None) -> TrainState:
  """The initial state from backbone and head variables (host or device arrays)."""
  names = [name for name, _ in trainer.heads]
  params = {'backbone': backbone_variables['params'],
            **{n: head_variables[n]['params'] for n in names}}
  batch_stats = {'backbone': backbone_variables.get('batch_stats', {}),
                 **{n: head_variables[n].get('batch_stats', {}) for n in names}}
  params = jax.tree.map(jnp.asarray, params)
  batch_stats = jax.tree.map(jnp.asarray, batch_stats)
  if trainer.method.target:
    target_params = {'backbone': params['backbone'], 'projector': params['projector']}
    target_stats = {'backbone': batch_stats['backbone'], 'projector': batch_stats['projector']}
    target_params, target_stats = jax.tree.map(jnp.copy, (target_params, target_stats))
  else:
    target_params, target_stats = {}, {}
  dim = trainer.backbone.num_features
  d = np.zeros(dim, bool) if discriminative is None else np.asarray(discriminative, bool)
  if d.shape != (dim,):
    raise ValueError(f'the discriminative set has shape {d.shape}, expected ({dim},).')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=trainer.optimizer.init(params), target_params=target_params,
                    target_batch_stats=target_stats, discriminative=jnp.asarray(d))


__all__ = ['TrainState', 'Trainer', 'create_state', 'ema_momentum', 'head_input_dim', 'init_heads',
           'make_optimizer', 'train_step']

"""The SSL methods the training core runs: heads, objective, optimizer recipe.

A :class:`Method` says which heads a method trains (with the shapes of its
official release, so heads converted from the official checkpoint load as
they are), which of them an EMA target network has, how its loss is computed
from the per-view outputs and its buffers (queue, center), and its optimizer
recipe (scaled to the batch size the way the release does:
``lr = base_lr * batch / 256``).

Per-view outputs, each a list over the views that go through the network:

    h            backbone representations (B, d), every view
    z            projector outputs, every view
    p            predictor outputs (BYOL, SimSiam, MoCo v3)
    scores       prototype scores (SwAV) or DINO head outputs, every view
    target_<k>   the EMA target network's <k>, global views only (the first
                 ``Method.global_views``)

A loss is ``loss(outputs, ctx) -> (scalar, new_buffers, metrics)`` with ctx a
:class:`LossContext`; it sees the *global* batch (see :mod:`qscore_jax.losses`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from qscore_jax import losses
from qscore_jax._text import did_you_mean
from qscore_jax.models.heads import HeadLayer, HeadSpec, l2_normalize

HeadBuilder = Callable[[int, Mapping[str, Any]], HeadSpec]
# Online heads in order, each with the key of its outputs.
OUTPUT_KEYS = {'projector': 'z', 'predictor': 'p', 'prototypes': 'scores'}


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  """A method's optimizer as released (learning rates scale with batch / 256).

  Attributes:
    name: ``'lars'``, ``'sgd'`` or ``'adamw'``.
    base_learning_rate: learning rate for a batch of 256 (``lr = base * batch / 256``).
    weight_decay: the release's weight decay.
    momentum: the release's momentum (default 0.9).
    warmup_epochs: linear warm-up epochs (default 10).
  """
  name: str  # 'lars', 'sgd' or 'adamw'
  base_learning_rate: float
  weight_decay: float
  momentum: float = 0.9
  warmup_epochs: float = 10.0


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss may read besides the outputs.

  Attributes:
    options: the loss options (the method's defaults with the config's overrides).
    buffers: the method's non-trained state (queue, center, ...), replicated.
    params: the online parameters (stop-gradient them before use).
    step: int32 scalar, the step being taken (0-based).
    total_steps: steps of the whole run.
    axis_name: the pmap axis name, or None under jit over a mesh.
  """
  options: Mapping[str, Any]
  buffers: Mapping[str, jax.Array]
  params: Any
  step: jax.Array
  total_steps: int
  axis_name: str | None


@dataclasses.dataclass(frozen=True)
class Method:
  """One SSL method.

  Attributes:
    name: its id (``simclr``, ``byol``, ...).
    augmentation: the recipe name of :func:`qscore_jax.data.augment.recipe`.
    heads: the online heads in order, ``((name, builder), ...)`` with names from
      ``projector``, ``predictor``, ``prototypes``; ``builder(backbone_dim,
      options) -> HeadSpec`` gives the official shapes (``options``: the config's
      ``heads`` overrides).
    target_heads: the heads the EMA target network has (empty: no target).
    loss: ``(outputs, LossContext) -> (scalar, new_buffers, metrics)``.
    loss_defaults: the loss options and their official values.
    optimizer: the release's optimizer recipe.
    ema_base: base momentum of the target network.
    ema_schedule: ``'cosine'`` (increased to 1 over training: BYOL, MoCo v3, DINO)
      or ``'constant'`` (MoCo v2).
    global_views: views the target network sees and the regularizer uses; the
      others are multi-crop's small crops.
    init_buffers: ``(head_output_dims, options, key) -> buffers`` or None.
    frozen_head: ``(head name, option)``: that head's last layer gets no update
      while ``step < options[option]`` (SwAV's prototypes, DINO's last layer).
    unit_columns_head: a head whose last kernel's columns are renormalised to
      unit norm after every update (SwAV's prototypes).
  """
  name: str
  augmentation: str
  heads: tuple[tuple[str, HeadBuilder], ...]
  loss: Callable[..., Any]
  loss_defaults: Mapping[str, Any]
  optimizer: OptimizerRecipe
  target_heads: tuple[str, ...] = ()
  ema_base: float = 0.0
  ema_schedule: str = 'cosine'
  global_views: int = 2
  init_buffers: Callable[..., dict[str, jax.Array]] | None = None
  frozen_head: tuple[str, str] | None = None
  unit_columns_head: str | None = None

  @property
  def target(self) -> bool:
    """Whether the method has an EMA target network (``target_heads`` non-empty)."""
    return bool(self.target_heads)

  def build_heads(self, dim: int, options: Mapping[str, Any]) -> tuple[tuple[str, HeadSpec], ...]:
    """``((name, HeadSpec), ...)`` of the online heads for a backbone of width ``dim``.

    Args:
      dim: the backbone's representation size d.
      options: the config's ``heads`` overrides (``projector_hidden``,
        ``projector_out``, ``predictor_hidden``, ``prototypes``; None or absent:
        the official width).
    """
    return tuple((name, builder(dim, options)) for name, builder in self.heads)


def _mlp(dims, *, bias, norm, last_bias, last_norm, activation='relu') -> HeadSpec:
  layers = [HeadLayer(w, use_bias=bias, norm=norm, activation=activation) for w in dims[:-1]]
  layers.append(HeadLayer(dims[-1], use_bias=last_bias, norm=last_norm))
  return HeadSpec(tuple(layers))


def _dims(options, hidden_default, out_default, layers, prefix='projector'):
  """Layer widths; a predictor maps back to the projector's output width."""
  hidden = options.get(f'{prefix}_hidden') or hidden_default
  out = options.get('projector_out') or out_default
  return (hidden,) * (layers - 1) + (out,)


# Heads as released (see qscore_jax.models.heads). `d` is the backbone width.
def _simclr_projector(d, o):  # SimCLR v2: 3 layers, BN everywhere, last BN without shift
  return _mlp(_dims(o, d, 128, 3), bias=False, norm='batchnorm', last_bias=False,
              last_norm='batchnorm_no_shift')


def _byol_mlp(prefix):
  def build(d, o):  # BYOL projector and predictor: 4096 -> 256
    del d
    return _mlp(_dims(o, 4096, 256, 2, prefix), bias=True, norm='batchnorm', last_bias=False,
                last_norm=None)
  return build


def _simsiam_projector(d, o):
  del d
  return _mlp(_dims(o, 2048, 2048, 3), bias=False, norm='batchnorm', last_bias=True,
              last_norm='batchnorm_no_affine')


def _simsiam_predictor(d, o):
  del d
  out = o.get('projector_out') or 2048
  return _mlp((o.get('predictor_hidden') or 512, out), bias=False, norm='batchnorm',
              last_bias=True, last_norm=None)


def _vicreg_projector(d, o):
  del d
  return _mlp(_dims(o, 8192, 8192, 3), bias=True, norm='batchnorm', last_bias=False,
              last_norm=None)


def _barlow_projector(d, o):
  del d
  return _mlp(_dims(o, 8192, 8192, 3), bias=False, norm='batchnorm', last_bias=False,
              last_norm=None)


def _mocov2_projector(d, o):  # MoCo v2 --mlp: fc(d, d) relu fc(d, 128), biases, no BN
  return _mlp(_dims(o, d, 128, 2), bias=True, norm=None, last_bias=True, last_norm=None)


def _mocov3_projector(d, o):
  # moco-v3 _build_mlp: ResNet 2 layers, ViT 3; bias-free, BN, last BN without affine.
  layers = 3 if o.get('vit') else 2
  return _mlp(_dims(o, 4096, 256, layers), bias=False, norm='batchnorm', last_bias=False,
              last_norm='batchnorm_no_affine')


def _mocov3_predictor(d, o):  # 2 layers back to the projector width; last BN for ViT only
  del d
  return _mlp(_dims(o, 4096, 256, 2, 'predictor'), bias=False, norm='batchnorm',
              last_bias=False, last_norm='batchnorm_no_affine' if o.get('vit') else None)


def _swav_projector(d, o):  # projection_head: Linear(d, 2048), BN, ReLU, Linear(2048, 128)
  del d
  return _mlp(_dims(o, 2048, 128, 2), bias=True, norm='batchnorm', last_bias=True,
              last_norm=None)


def _swav_prototypes(d, o):  # Linear(128, 3000, bias=False) on L2-normalised z
  del d
  return HeadSpec((HeadLayer(o.get('prototypes') or 3000, use_bias=False),),
                  normalize_input=True)


def _dino_projector(d, o):  # DINOHead.mlp: d -> 2048 -> 2048 -> 256, GELU, no BN
  del d
  return _mlp(_dims(o, 2048, 256, 3), bias=True, norm=None, last_bias=True, last_norm=None,
              activation='gelu')


def _dino_prototypes(d, o):  # last_layer: weight-normalised, gain fixed at 1, no bias
  del d
  return HeadSpec((HeadLayer(o.get('prototypes') or 65536, use_bias=False, weight_norm=True),),
                  normalize_input=True)


# --- losses: (outputs, ctx) -> (loss, new buffers, metrics) ------------------------------

def _unchanged(ctx, loss):
  return loss, dict(ctx.buffers), {}


def _simclr_loss(out, ctx):
  z1, z2 = out['z'][:2]
  return _unchanged(ctx, losses.nt_xent(z1, z2, temperature=ctx.options['temperature'],
                                        axis_name=ctx.axis_name))


def _byol_loss(out, ctx):
  p1, p2 = out['p'][:2]
  t1, t2 = out['target_z'][:2]
  return _unchanged(ctx, losses.byol_loss(p1, p2, t1, t2, axis_name=ctx.axis_name))


def _simsiam_loss(out, ctx):
  p1, p2 = out['p'][:2]
  z1, z2 = out['z'][:2]
  return _unchanged(ctx, losses.simsiam_loss(p1, p2, z1, z2, axis_name=ctx.axis_name))


def _vicreg_loss(out, ctx):
  z1, z2 = out['z'][:2]
  return _unchanged(ctx, losses.vicreg_loss(z1, z2, axis_name=ctx.axis_name, **ctx.options))


def _barlow_loss(out, ctx):
  z1, z2 = out['z'][:2]
  return _unchanged(ctx, losses.barlow_twins_loss(z1, z2, axis_name=ctx.axis_name,
                                                  **ctx.options))


def _mocov2_buffers(dims, options, key):
  # The official queue starts as random unit vectors (randn normalised).
  queue = l2_normalize(jax.random.normal(key, (int(options['queue_size']), dims['projector'])))
  return {'queue': queue, 'queue_pointer': jnp.zeros((), jnp.int32)}


def _mocov2_loss(out, ctx):
  # Official MoCo v2: one direction, query = view 1, key = momentum encoder on view 2.
  q, k = out['z'][0], out['target_z'][1]
  loss = losses.moco_v2_loss(q, k, ctx.buffers['queue'], temperature=ctx.options['temperature'],
                             axis_name=ctx.axis_name)
  queue, pointer = losses.enqueue(ctx.buffers['queue'], l2_normalize(lax.stop_gradient(k)),
                                  ctx.buffers['queue_pointer'], axis_name=ctx.axis_name)
  return loss, {'queue': queue, 'queue_pointer': pointer}, {}


def _mocov3_loss(out, ctx):
  q1, q2 = out['p'][:2]
  k1, k2 = out['target_z'][:2]
  return _unchanged(ctx, losses.moco_v3_loss(q1, q2, k1, k2,
                                             temperature=ctx.options['temperature'],
                                             axis_name=ctx.axis_name))


def _swav_buffers(dims, options, key):
  del key
  length = int(options['queue_length'])
  if not length:
    return {}
  # The official queue holds the normalised projections of the assigned crops and is
  # used once full (its last row non-zero); rows are shifted in, newest first.
  return {'queue': jnp.zeros((2, length, dims['projector']), jnp.float32)}


def _local_queue_rows(queue, axis_name):
  """Under pmap every device holds the whole (replicated) queue; each contributes its
  own slice so that the global Sinkhorn sums count every queued row once."""
  if axis_name is None:
    return queue
  devices = lax.axis_size(axis_name)
  if queue.shape[-2] % devices:
    raise ValueError(f'the SwAV queue length {queue.shape[-2]} must be divisible by the '
                     f'{devices} devices under pmap; change loss.queue_length.')
  rows = queue.shape[-2] // devices
  return lax.dynamic_slice_in_dim(queue, lax.axis_index(axis_name) * rows, rows, axis=-2)


def _swav_loss(out, ctx):
  o, axis_name = ctx.options, ctx.axis_name
  scores, queue = out['scores'], ctx.buffers.get('queue')
  if queue is None:
    return _unchanged(ctx, _swav(scores, o, None, axis_name))
  prototypes = lax.stop_gradient(ctx.params['prototypes']['dense_0']['kernel'])
  local = _local_queue_rows(queue, axis_name)
  # The official code uses the queue from the first step its last row is filled.
  loss = lax.cond(jnp.any(queue[:, -1] != 0),
                  lambda: _swav(scores, o, [local[i] @ prototypes for i in range(2)], axis_name),
                  lambda: _swav(scores, o, None, axis_name))
  newest = [losses.gather(l2_normalize(lax.stop_gradient(z)), axis_name) for z in out['z'][:2]]
  queue = jnp.stack([jnp.concatenate([e, queue[i]])[:queue.shape[1]]
                     for i, e in enumerate(newest)])
  return loss, {'queue': queue}, {}


def _swav(scores, o, queue_scores, axis_name):
  return losses.swav_loss(scores, temperature=o['temperature'], epsilon=o['epsilon'],
                          sinkhorn_iterations=o['sinkhorn_iterations'],
                          queue_scores=queue_scores, axis_name=axis_name)


def _dino_buffers(dims, options, key):
  del options, key
  return {'center': jnp.zeros((dims['prototypes'],), jnp.float32)}


def dino_teacher_temperature(options, step) -> jax.Array:
  """Linear warm-up from ``warmup_teacher_temperature`` over ``warmup_teacher_steps``.

  Args:
    options: DINO's loss options (``warmup_teacher_temperature``,
      ``teacher_temperature``, ``warmup_teacher_steps``).
    step: the current step (int or scalar array).
  Returns:
    float32 scalar: the teacher temperature at ``step``.
  """
  warm = max(int(options['warmup_teacher_steps']), 0)
  start, end = options['warmup_teacher_temperature'], options['teacher_temperature']
  if not warm:
    return jnp.asarray(end, jnp.float32)
  return jnp.where(step < warm, start + (end - start) * step / warm, end).astype(jnp.float32)


def _dino_loss(out, ctx):
  o = ctx.options
  teacher = [lax.stop_gradient(t) for t in out['target_scores']]
  temperature = dino_teacher_temperature(o, ctx.step)
  loss = losses.dino_loss(out['scores'], teacher, ctx.buffers['center'],
                          student_temperature=o['student_temperature'],
                          teacher_temperature=temperature, axis_name=ctx.axis_name)
  center = losses.dino_center(ctx.buffers['center'], teacher, momentum=o['center_momentum'],
                              axis_name=ctx.axis_name)
  return loss, {'center': center}, {'teacher_temperature': temperature}


METHODS: dict[str, Method] = {m.name: m for m in (
    # SimCLR v2: LARS, lr 0.3 x B/256 (v1: same), wd 1e-6, temperature 0.1, 10 warm-up epochs.
    Method('simclr', 'simclr', (('projector', _simclr_projector),), _simclr_loss,
           {'temperature': 0.1}, OptimizerRecipe('lars', 0.3, 1e-6)),
    # BYOL: LARS, lr 0.2 x B/256, wd 1.5e-6, EMA 0.996 -> 1 (cosine).
    Method('byol', 'byol', (('projector', _byol_mlp('projector')),
                            ('predictor', _byol_mlp('predictor'))), _byol_loss,
           {}, OptimizerRecipe('lars', 0.2, 1.5e-6), target_heads=('projector',),
           ema_base=0.996),
    # SimSiam: SGD, lr 0.05 x B/256, momentum 0.9, wd 1e-4, cosine, no warm-up.
    Method('simsiam', 'simsiam', (('projector', _simsiam_projector),
                                  ('predictor', _simsiam_predictor)), _simsiam_loss,
           {}, OptimizerRecipe('sgd', 0.05, 1e-4, warmup_epochs=0.0)),
    # VICReg: LARS, lr 0.2 x B/256, wd 1e-6, coefficients 25 / 25 / 1.
    Method('vicreg', 'vicreg', (('projector', _vicreg_projector),), _vicreg_loss,
           {'sim_coeff': 25.0, 'std_coeff': 25.0, 'cov_coeff': 1.0},
           OptimizerRecipe('lars', 0.2, 1e-6)),
    # Barlow Twins: LARS, lr 0.2 x B/256 for weights, wd 1.5e-6, lambda 0.0051.
    Method('barlowtwins', 'barlowtwins', (('projector', _barlow_projector),), _barlow_loss,
           {'lambd': 0.0051}, OptimizerRecipe('lars', 0.2, 1.5e-6)),
    # MoCo v2 (--mlp --aug-plus --cos): SGD lr 0.03 x B/256, wd 1e-4, T 0.2, queue 65536,
    # key encoder momentum 0.999 (constant).
    Method('mocov2', 'mocov2', (('projector', _mocov2_projector),), _mocov2_loss,
           {'temperature': 0.2, 'queue_size': 65536},
           OptimizerRecipe('sgd', 0.03, 1e-4, warmup_epochs=0.0), target_heads=('projector',),
           ema_base=0.999, ema_schedule='constant', init_buffers=_mocov2_buffers),
    # MoCo v3, ResNet-50: LARS lr 0.6 x B/256, wd 1e-6, T 1.0, momentum 0.99 -> 1 (cosine),
    # 10 warm-up epochs. (ViT: AdamW lr 1.5e-4 x B/256, wd 0.1, T 0.2: set them in the config.)
    Method('mocov3', 'mocov3', (('projector', _mocov3_projector),
                                ('predictor', _mocov3_predictor)), _mocov3_loss,
           {'temperature': 1.0}, OptimizerRecipe('lars', 0.6, 1e-6),
           target_heads=('projector',), ema_base=0.99),
    # SwAV: LARS lr 4.8 at batch 4096 (0.3 x B/256), wd 1e-6, T 0.1, eps 0.05, 3 Sinkhorn
    # iterations, 3000 prototypes (frozen the first 313 steps), 2 x 224 + 6 x 96 crops.
    Method('swav', 'swav', (('projector', _swav_projector), ('prototypes', _swav_prototypes)),
           _swav_loss, {'temperature': 0.1, 'epsilon': 0.05, 'sinkhorn_iterations': 3,
                        'queue_length': 0, 'freeze_prototypes_steps': 313},
           OptimizerRecipe('lars', 0.3, 1e-6), init_buffers=_swav_buffers,
           frozen_head=('prototypes', 'freeze_prototypes_steps'),
           unit_columns_head='prototypes'),
    # DINO (main_dino defaults): AdamW lr 5e-4 x B/256, wd 0.04, student T 0.1, teacher T
    # 0.04 (warm-up from 0.04), center momentum 0.9, teacher 0.996 -> 1 (cosine), last layer
    # frozen the first epoch, 2 global + 8 local crops. (ResNet-50 release: SGD lr 0.03, wd 1e-4.)
    Method('dino', 'dino', (('projector', _dino_projector), ('prototypes', _dino_prototypes)),
           _dino_loss, {'student_temperature': 0.1, 'teacher_temperature': 0.04,
                        'warmup_teacher_temperature': 0.04, 'warmup_teacher_steps': 0,
                        'center_momentum': 0.9, 'freeze_last_layer_steps': 0},
           OptimizerRecipe('adamw', 5e-4, 0.04), target_heads=('projector', 'prototypes'),
           ema_base=0.996, init_buffers=_dino_buffers,
           frozen_head=('prototypes', 'freeze_last_layer_steps')),
)}


def get_method(name: str) -> Method:
  """The :class:`Method` called ``name``; a clear error listing the known ones otherwise."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}{did_you_mean(name, METHODS)}; known methods: '
                     f'{", ".join(sorted(METHODS))}.')
  return METHODS[name]


__all__ = ['METHODS', 'LossContext', 'Method', 'OptimizerRecipe', 'dino_teacher_temperature',
           'get_method']

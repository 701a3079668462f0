"""The SSL methods the training core runs: heads, objective, optimizer recipe.

A :class:`Method` says which heads a method trains (with the shapes of its
official release, so heads converted from the official checkpoint load as
they are), whether it keeps an EMA target network, how its loss is computed
from the per-view outputs, and its optimizer recipe (scaled to the batch size
the way the release does: ``lr = base_lr * batch / 256``).

Per-view outputs, each a list over the views that go through the online network:

    h          backbone representations (B, d)
    z          projector outputs
    p          predictor outputs (methods with a predictor)
    target_z   projector outputs of the EMA target network (methods with a target)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from qscore_jax import losses
from qscore_jax.models.heads import HeadLayer, HeadSpec


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  """A method's optimizer as released (learning rates scale with batch / 256)."""
  name: str  # 'lars', 'sgd' or 'adamw'
  base_learning_rate: float
  weight_decay: float
  momentum: float = 0.9
  warmup_epochs: float = 10.0


@dataclasses.dataclass(frozen=True)
class Method:
  """One SSL method.

  Attributes:
    name: its id (``simclr``, ``byol``, ...).
    augmentation: the recipe name of :func:`qscore_jax.data.augment.recipe`.
    projector, predictor: ``(backbone_dim, options) -> HeadSpec`` of the official
      shapes (``options``: the config's ``heads`` overrides); predictor may be None.
    target: whether an EMA copy of backbone + projector produces the targets.
    loss: ``(outputs, loss_options, axis_name) -> scalar``.
    loss_defaults: the loss options and their official values.
    optimizer: the release's optimizer recipe.
    ema_base: base EMA momentum of the target network (cosine-increased to 1).
  """
  name: str
  augmentation: str
  projector: Callable[[int, Mapping[str, Any]], HeadSpec]
  predictor: Callable[[int, Mapping[str, Any]], HeadSpec] | None
  target: bool
  loss: Callable[..., jax.Array]
  loss_defaults: Mapping[str, Any]
  optimizer: OptimizerRecipe
  ema_base: float = 0.0


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


def _simclr_loss(out, options, axis_name):
  z1, z2 = out['z'][:2]
  return losses.nt_xent(z1, z2, temperature=options['temperature'], axis_name=axis_name)


def _byol_loss(out, options, axis_name):
  del options
  p1, p2 = out['p'][:2]
  t1, t2 = out['target_z'][:2]
  return losses.byol_loss(p1, p2, t1, t2, axis_name=axis_name)


def _simsiam_loss(out, options, axis_name):
  del options
  p1, p2 = out['p'][:2]
  z1, z2 = out['z'][:2]
  return losses.simsiam_loss(p1, p2, z1, z2, axis_name=axis_name)


def _vicreg_loss(out, options, axis_name):
  z1, z2 = out['z'][:2]
  return losses.vicreg_loss(z1, z2, axis_name=axis_name, **options)


def _barlow_loss(out, options, axis_name):
  z1, z2 = out['z'][:2]
  return losses.barlow_twins_loss(z1, z2, axis_name=axis_name, **options)


METHODS: dict[str, Method] = {m.name: m for m in (
    # SimCLR v2: LARS, lr 0.3 x B/256 (v1: same), wd 1e-6, temperature 0.1, 10 warm-up epochs.
    Method('simclr', 'simclr', _simclr_projector, None, False, _simclr_loss,
           {'temperature': 0.1}, OptimizerRecipe('lars', 0.3, 1e-6)),
    # BYOL: LARS, lr 0.2 x B/256, wd 1.5e-6, EMA 0.996 -> 1 (cosine).
    Method('byol', 'byol', _byol_mlp('projector'), _byol_mlp('predictor'), True, _byol_loss,
           {}, OptimizerRecipe('lars', 0.2, 1.5e-6), ema_base=0.996),
    # SimSiam: SGD, lr 0.05 x B/256, momentum 0.9, wd 1e-4, cosine, no warm-up.
    Method('simsiam', 'simsiam', _simsiam_projector, _simsiam_predictor, False, _simsiam_loss,
           {}, OptimizerRecipe('sgd', 0.05, 1e-4, warmup_epochs=0.0)),
    # VICReg: LARS, lr 0.2 x B/256, wd 1e-6, coefficients 25 / 25 / 1.
    Method('vicreg', 'vicreg', _vicreg_projector, None, False, _vicreg_loss,
           {'sim_coeff': 25.0, 'std_coeff': 25.0, 'cov_coeff': 1.0},
           OptimizerRecipe('lars', 0.2, 1e-6)),
    # Barlow Twins: LARS, lr 0.2 x B/256 for weights, wd 1.5e-6, lambda 0.0051.
    Method('barlowtwins', 'barlowtwins', _barlow_projector, None, False, _barlow_loss,
           {'lambd': 0.0051}, OptimizerRecipe('lars', 0.2, 1.5e-6)),
)}


def get_method(name: str) -> Method:
  """The :class:`Method` called ``name``; a clear error listing the known ones otherwise."""
  if name not in METHODS:
    from qscore_jax.models.registry import did_you_mean  # pylint: disable=import-outside-toplevel
    raise ValueError(f'unknown method {name!r}{did_you_mean(name, METHODS)}; known methods: '
                     f'{", ".join(sorted(METHODS))}.')
  return METHODS[name]


__all__ = ['METHODS', 'Method', 'OptimizerRecipe', 'get_method']

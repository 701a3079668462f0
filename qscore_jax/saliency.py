r"""Interpretability: heatmaps of discriminative features and their overlap with core / spurious masks.

The paper's last claim: the discriminative features of a sample sit on the
object (*core*), not on the background (*spurious*). For a sample i with
representation h_i, the *target* is the sum of its discriminative
activations, T_i = sum_{j in L_i ∩ D} h_ij (or any given set of features),
and its heatmap is

* ``'gradcam'`` (default): Grad-CAM at a stage A (N, h, w, C), the last
  convolutional stage of a ResNet (``layer4``) or the patch tokens of a
  ViT's last block (at its input; see :func:`default_stage`): channel
  weights = spatial mean of dT_i/dA, heatmap = ReLU(sum_c w_c A_c),
  bilinearly upsampled to the image;
* ``'input_gradient'``: max over colour channels of |dT_i/dx| at the input
  pixels (the normalised network input), a vanilla saliency map.

Each heatmap is divided by its maximum. The metric binarises it (pixels >=
``heatmap_threshold`` x max; or the top ``heatmap_threshold`` fraction of
pixels with ``threshold_mode='top_fraction'``) and the masks (soft masks >=
``mask_threshold``) and takes the IoU with the core mask and, separately,
with the spurious mask. Images whose target is empty (no discriminative
feature highly active), whose heatmap is zero, or whose mask is empty are
*counted* and left out of the means, never turned into NaN.

Everything here is a pure array function (no files, no datasets):
:func:`selection_of`, :func:`heatmaps`, :func:`mask_ious` and
:func:`interpret_batch` work inside users' own jit/pmap; :func:`make_interpret_step`
jits :func:`interpret_batch` over a device mesh; :func:`summarize_ious` and
:func:`compare_ious` summarise per-image IoUs. :mod:`qscore_jax.interpret` is
the ``qscore interpret`` driver built on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qscore_jax import metrics, parallel, stats, validation
from qscore_jax.models.features import keep_state

METHODS = ('gradcam', 'input_gradient')
THRESHOLD_MODES = ('max_fraction', 'top_fraction')


class InterpretError(ValueError):
  """A bad input to the interpretability functions."""


@dataclasses.dataclass(frozen=True)
class InterpretConfig:
  """How heatmaps are made and compared with masks.

  Attributes:
    stage: the feature map of Grad-CAM; ``None``: :func:`default_stage`
      (``layer4`` of a ResNet, the patch tokens entering a ViT's last block).
    method: ``'gradcam'`` or ``'input_gradient'``.
    eps: the highly-active threshold of L_i (as in the analysis).
    heatmap_threshold: with ``'max_fraction'`` (default, the paper's 0.6)
      pixels >= this x the heatmap's max are "on"; with ``'top_fraction'``
      the top this fraction of pixels are.
    threshold_mode: ``'max_fraction'`` or ``'top_fraction'``.
    mask_threshold: a (soft) mask pixel >= this is inside the region.
  """
  stage: str | None = None
  method: str = 'gradcam'
  eps: float = stats.DEFAULT_EPS
  heatmap_threshold: float = 0.6
  threshold_mode: str = 'max_fraction'
  mask_threshold: float = 0.5

  def __post_init__(self):
    if self.method not in METHODS:
      raise InterpretError(f'method must be one of {METHODS}, got {self.method!r}.')
    if self.threshold_mode not in THRESHOLD_MODES:
      raise InterpretError(f'threshold_mode must be one of {THRESHOLD_MODES}, got '
                           f'{self.threshold_mode!r}.')
    if not 0 < self.heatmap_threshold <= 1:
      raise InterpretError(f'heatmap_threshold must be in (0, 1], got {self.heatmap_threshold}.')
    if not 0 < self.mask_threshold <= 1:
      raise InterpretError(f'mask_threshold must be in (0, 1], got {self.mask_threshold}.')
    validation.eps(self.eps)


def _is_token_model(model: nn.Module) -> bool:
  return hasattr(model, 'patch_size')


def default_stage(model: nn.Module) -> str:
  """``layer4`` for a ResNet; for a ViT the tokens *entering* its last block (``block{depth-2}``).

  A ViT's representation is the class token after the last block, which sees
  no other token of that block's output: the patch tokens reach it only
  through the last block's attention, so Grad-CAM taps them at its input (as
  pytorch-grad-cam's ``blocks[-1].norm1``).

  Args:
    model: a backbone exposing ``feature_names`` (ResNet or VisionTransformer).
  """
  return model.feature_names[-2] if _is_token_model(model) else model.feature_names[-1]


def check_stage(model: nn.Module, stage: str | None) -> str:
  """``stage`` (or the default) if ``model`` exposes it; else an error listing the names."""
  stage = stage or default_stage(model)
  names = model.feature_names
  if stage not in names:
    raise InterpretError(f'{type(model).__name__} has no stage {stage!r}; its stages are '
                         f'{", ".join(names)} (default: {default_stage(model)}).')
  if _is_token_model(model) and stage == names[-1]:
    raise InterpretError(f"{stage}'s patch tokens do not reach the class token (the "
                         'representation), so their gradients are zero; use the tokens entering '
                         f'the last block, {default_stage(model)} (the default), or an earlier '
                         'block.')
  return stage


def selection_of(h: jax.Array, discriminative: jax.Array,
                 eps: float = stats.DEFAULT_EPS) -> jax.Array:
  """L_i ∩ D as a float mask: (N, d) representations, (d,) bool D -> (N, d) in {0, 1}.

  Args:
    h: representations (N, d).
    discriminative: (d,) bool membership of D (or, outside a trace, feature indices;
      see :func:`qscore_jax.validation.feature_mask`).
    eps: the highly-active threshold of L_i in per-sample stds (default 4).
  Returns:
    float32 (N, d).
  """
  members = validation.feature_mask(discriminative, jnp.shape(h)[-1])
  return (stats.highly_active(h, eps) & members[None, :]).astype(jnp.float32)


def _as_selection(selection, h):
  """A given (d,) or (N, d) feature selection, broadcast to (N, d) float."""
  selection = jnp.asarray(selection, jnp.float32)
  return jnp.broadcast_to(selection, h.shape)


def _stage_grid(model: nn.Module, stage_map: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
  """A stage's feature map as a (N, h, w, C) grid (ViT: patch tokens, prefix tokens dropped)."""
  if stage_map.ndim == 4:
    return stage_map
  patch = model.patch_size
  grid_h, grid_w = image_hw[0] // patch, image_hw[1] // patch
  tokens = stage_map[:, stage_map.shape[1] - grid_h * grid_w:]
  return tokens.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1])


def heatmaps(model: nn.Module, variables: Any, images: jax.Array, *,
             discriminative: jax.Array | None = None, selection: jax.Array | None = None,
             eps: float = stats.DEFAULT_EPS, stage: str | None = None,
             method: str = 'gradcam') -> dict[str, jax.Array]:
  """Gradient heatmaps of each sample's target features (inference mode).

  Args:
    model, variables: a backbone (``qscore_jax.models``) and its variables.
    images: (N, H, W, 3), the network input (normalised as the model expects).
    discriminative: (d,) bool, the set D; the target of sample i is then
      sum over j in L_i ∩ D of h_ij (L_i from ``eps``).
    selection: instead of ``discriminative``, the features to explain: (d,)
      (the same for every sample: one feature, a class's top features) or
      (N, d), weights in {0, 1} (or any non-negative weights).
    stage: Grad-CAM's feature map (default: :func:`default_stage`).
    method: ``'gradcam'`` or ``'input_gradient'``.

  Returns:
    dict with ``heatmap`` (N, H, W) float32 in [0, 1] (divided by its max; all
    zero when there is nothing to show), ``peak`` (N,) the max before
    normalisation, ``num_targets`` (N,) the number of selected features and
    ``representation`` (N, d).
  """
  if (discriminative is None) == (selection is None):
    raise InterpretError('give exactly one of discriminative (the set D) or selection '
                         '(the features to explain).')
  if method not in METHODS:
    raise InterpretError(f'method must be one of {METHODS}, got {method!r}.')
  stage = check_stage(model, stage)
  state = keep_state(variables)
  n, height, width = images.shape[:3]

  def target_of(h):
    chosen = (selection_of(h, discriminative, eps) if selection is None
              else _as_selection(selection, h))
    # The selection is a set (or fixed weights), not something to differentiate.
    chosen = jax.lax.stop_gradient(chosen)
    return jnp.sum(chosen * h), chosen

  if method == 'input_gradient':
    def objective(x):
      h = model.apply(state, x, train=False)
      total, chosen = target_of(h)
      return total, (h, chosen)

    grads, (h, chosen) = jax.grad(objective, has_aux=True)(images)
    raw = jnp.max(jnp.abs(grads), axis=-1)
  else:
    shapes = jax.eval_shape(
        lambda x: model.apply(state, x, train=False, mutable=['intermediates'])[1], images)
    # Every exposed map needs a perturbation; only the stage's is differentiated, so the
    # backward pass stops there.
    zeros = {name: jnp.zeros(value[0].shape, value[0].dtype)
             for name, value in shapes['intermediates'].items()}

    def objective(perturbation):
      h, sown = model.apply({**state, 'perturbations': {**zeros, stage: perturbation}}, images,
                            train=False, mutable=['intermediates'])
      total, chosen = target_of(h)
      return total, (h, chosen, sown['intermediates'][stage][0])

    grid_hw = _stage_grid(model, zeros[stage], (height, width)).shape[1:3]
    if grid_hw == (1, 1):
      grids = {name: _stage_grid(model, zeros[name], (height, width)).shape[1:3]
               for name in model.feature_names if name in zeros}
      sizes = ', '.join(f'{name} {h}x{w}' for name, (h, w) in grids.items())
      raise InterpretError(f'{stage} is 1x1 for {height}x{width} images, so its Grad-CAM '
                           f'would be constant; choose a stage with a spatial grid ({sizes}) '
                           "or method='input_gradient'.")
    grads, (h, chosen, stage_map) = jax.grad(objective, has_aux=True)(zeros[stage])
    grid = _stage_grid(model, stage_map, (height, width)).astype(jnp.float32)
    grad_grid = _stage_grid(model, grads, (height, width)).astype(jnp.float32)
    weights = jnp.mean(grad_grid, axis=(1, 2))                    # (N, C)
    cam = jax.nn.relu(jnp.einsum('nhwc,nc->nhw', grid, weights))  # (N, h, w)
    raw = jax.image.resize(cam, (n, height, width), method='bilinear')
    raw = jax.nn.relu(raw)
  peak = jnp.max(raw, axis=(1, 2))
  heatmap = jnp.where(peak[:, None, None] > 0, raw / jnp.where(peak > 0, peak, 1)[:, None, None],
                      0.0)
  num_targets = jnp.sum(chosen > 0, axis=1)
  return {'heatmap': heatmap, 'peak': peak, 'num_targets': num_targets, 'representation': h}


def binarize_heatmap(heatmap: jax.Array, threshold: float = 0.6,
                     mode: str = 'max_fraction') -> jax.Array:
  """(N, H, W) heatmaps in [0, 1] (max 1) -> bool regions (see :class:`InterpretConfig`).

  Args:
    heatmap: (N, H, W) float in [0, 1], each divided by its max.
    threshold: with ``'max_fraction'`` pixels >= this are on; with
      ``'top_fraction'`` the top this fraction of each image's pixels (default 0.6).
    mode: ``'max_fraction'`` (default) or ``'top_fraction'``.
  Returns:
    bool (N, H, W); zero pixels are never on.
  """
  if mode == 'max_fraction':
    return (heatmap >= threshold) & (heatmap > 0)
  if mode == 'top_fraction':
    flat = heatmap.reshape(heatmap.shape[0], -1)
    cut = jnp.quantile(flat, 1.0 - threshold, axis=1)
    return (heatmap >= cut[:, None, None]) & (heatmap > 0)
  raise InterpretError(f'threshold_mode must be one of {THRESHOLD_MODES}, got {mode!r}.')


def iou(region: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image IoU of two (N, H, W) bool arrays: ``(iou, defined)``; 0 where the union is empty.

  Args:
    region: (N, H, W) bool, e.g. a binarised heatmap.
    mask: (N, H, W) bool.
  Returns:
    ``iou`` (N,) float32 and ``defined`` (N,) bool (the union is non-empty).
  """
  inter = jnp.sum(region & mask, axis=(1, 2))
  union = jnp.sum(region | mask, axis=(1, 2))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0), union > 0


def mask_ious(heatmap: jax.Array, core_mask: jax.Array, spurious_mask: jax.Array, *,
              heatmap_threshold: float = 0.6, threshold_mode: str = 'max_fraction',
              mask_threshold: float = 0.5) -> dict[str, jax.Array]:
  """IoU of the binarised heatmaps with the core and the spurious masks.

  Args:
    heatmap: (N, H, W) in [0, 1]; core_mask, spurious_mask: (N, H, W) soft
      masks in [0, 1], the same size as the heatmaps.
    heatmap_threshold: see :func:`binarize_heatmap` (default 0.6).
    threshold_mode: ``'max_fraction'`` (default) or ``'top_fraction'``.
    mask_threshold: a mask pixel >= this is inside the mask (default 0.5).

  Returns:
    ``core_iou``, ``spurious_iou`` (N,) and ``core_defined`` /
    ``spurious_defined`` (N,) bool: False where the mask is empty (its IoU
    means nothing) or the heatmap is all zero.
  """
  if heatmap.shape != core_mask.shape or heatmap.shape != spurious_mask.shape:
    raise InterpretError(f'masks must have the heatmaps\' shape {tuple(heatmap.shape)} (N, H, W); '
                         f'got core {tuple(core_mask.shape)}, spurious '
                         f'{tuple(spurious_mask.shape)}. Resize the masks with the images '
                         '(qscore_jax.data.eval_batches(..., with_masks=True) does).')
  region = binarize_heatmap(heatmap, heatmap_threshold, threshold_mode)
  has_region = jnp.any(region, axis=(1, 2))
  out = {}
  for name, mask in (('core', core_mask), ('spurious', spurious_mask)):
    inside = mask >= mask_threshold
    value, _ = iou(region, inside)
    out[f'{name}_iou'] = value
    out[f'{name}_defined'] = has_region & jnp.any(inside, axis=(1, 2))
  return out


def interpret_batch(model: nn.Module, variables: Any, images: jax.Array, core_mask: jax.Array,
                    spurious_mask: jax.Array, discriminative: jax.Array, *,
                    config: InterpretConfig = InterpretConfig()) -> dict[str, jax.Array]:
  """Heatmaps of L_i ∩ D and their IoUs with the masks, for one batch (pure, jittable).

  Returns :func:`heatmaps`' ``peak`` and ``num_targets`` and :func:`mask_ious`'
  arrays, all (N,); ``has_target`` (N,) bool is False where no discriminative
  feature is highly active (or the heatmap is zero). ``*_baseline`` are the
  same IoUs against the image's masks rotated by 180 degrees (the same areas
  elsewhere): what the heatmap region scores by chance, since IoU grows with
  the mask's area (a large textured patch collects IoU by its size alone).

  Args:
    model: a backbone (``qscore_jax.models``).
    variables: its variables.
    images: (N, H, W, 3) network input (normalised as the model expects).
    core_mask: (N, H, W) soft core masks in [0, 1].
    spurious_mask: (N, H, W) soft spurious masks in [0, 1].
    discriminative: (d,) bool, the set D.
    config: stage, method, eps and thresholds (:class:`InterpretConfig`).
  """
  maps = heatmaps(model, variables, images, discriminative=discriminative, eps=config.eps,
                  stage=config.stage, method=config.method)
  options = dict(heatmap_threshold=config.heatmap_threshold,
                 threshold_mode=config.threshold_mode, mask_threshold=config.mask_threshold)
  ious = mask_ious(maps['heatmap'], core_mask, spurious_mask, **options)
  # Rotated within each image: no op across the batch, so any sharding or pmap gives the same.
  other = mask_ious(maps['heatmap'], jnp.flip(core_mask, axis=(1, 2)),
                    jnp.flip(spurious_mask, axis=(1, 2)), **options)
  ious.update({k.replace('_iou', '_iou_baseline').replace('_defined', '_baseline_defined'): v
               for k, v in other.items()})
  has_target = (maps['num_targets'] > 0) & (maps['peak'] > 0)
  return {'peak': maps['peak'], 'num_targets': maps['num_targets'], 'has_target': has_target,
          **{k: (v & has_target if k.endswith('_defined') else v) for k, v in ious.items()}}


def make_interpret_step(model: nn.Module, config: InterpretConfig, mesh=None):
  """:func:`interpret_batch` jitted over a mesh: variables and D replicated, batch on ``'data'``.

  Args:
    model: a backbone (``qscore_jax.models``); its stage is checked first.
    config: the :class:`InterpretConfig`.
    mesh: the device mesh (default: every device of every process on ``'data'``).
  Returns:
    ``step(variables, images, core_mask, spurious_mask, discriminative)``,
    cached per (model, config, mesh).
  """
  check_stage(model, config.stage)
  return _cached_interpret_step(model, config, mesh or parallel.data_mesh())


@functools.lru_cache(maxsize=8)
def _cached_interpret_step(model, config, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.jit(functools.partial(interpret_batch, model, config=config),
                 in_shardings=(replicated, batch, batch, batch, replicated),
                 out_shardings=batch)


# --------------------------------------------------------------------------- summaries


def _mean_sd(values: np.ndarray, interval: bool = False) -> dict[str, Any]:
  if len(values) == 0:
    return {'mean': None, 'std': None, 'sem': None, 'count': 0,
            **({'interval': None} if interval else {})}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  out = {'mean': float(np.mean(values)), 'std': std, 'sem': std / np.sqrt(len(values)),
         'count': int(len(values))}
  if interval:  # 95% bootstrap interval of the mean over images
    out['interval'] = metrics.bootstrap_mean(values)
  return out


def summarize_ious(per_image: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Mean IoU with the core and spurious masks, over all / correct / misclassified images.

  ``per_image`` holds (N,) arrays ``core_iou``, ``spurious_iou``,
  ``core_defined``, ``spurious_defined``, ``has_target``, ``num_targets`` and
  ``correct`` (and, optionally, the ``*_baseline`` IoUs of :func:`interpret_batch`).
  Means are over images whose IoU is defined, with 95% bootstrap intervals; the
  counts of left-out images are reported beside them: ``no_discriminative_feature``
  (no feature of D highly active: L_i ∩ D empty) and ``empty_heatmap`` (some are,
  but their heatmap is zero everywhere, e.g. a negative Grad-CAM).
  With the baselines, ``<name>_over_chance`` is the paired mean of IoU minus its
  chance level over the images where both are defined.

  Args:
    per_image: the per-image arrays.
  Returns:
    ``{'all' | 'correct' | 'misclassified': row}``.
  """
  correct = np.asarray(per_image['correct'], bool)
  has_target = np.asarray(per_image['has_target'], bool)
  no_feature = np.asarray(per_image['num_targets']) == 0
  groups = {'all': np.ones_like(correct), 'correct': correct, 'misclassified': ~correct}
  out: dict[str, Any] = {}
  for group, members in groups.items():
    row = {'images': int(members.sum()),
           'no_discriminative_feature': int((members & no_feature).sum()),
           'empty_heatmap': int((members & ~no_feature & ~has_target).sum())}
    for name in ('core', 'spurious'):
      defined = members & np.asarray(per_image[f'{name}_defined'], bool)
      values = np.asarray(per_image[f'{name}_iou'])
      row[name] = _mean_sd(values[defined], interval=True)
      if f'{name}_iou_baseline' in per_image:
        chance_defined = members & np.asarray(per_image[f'{name}_baseline_defined'], bool)
        chance = np.asarray(per_image[f'{name}_iou_baseline'])
        row[f'{name}_baseline'] = _mean_sd(chance[chance_defined], interval=True)
        paired = defined & chance_defined
        row[f'{name}_over_chance'] = _mean_sd((values - chance)[paired], interval=True)
    both = (members & np.asarray(per_image['core_defined'], bool)
            & np.asarray(per_image['spurious_defined'], bool))
    row['core_minus_spurious'] = _mean_sd(
        (np.asarray(per_image['core_iou']) - np.asarray(per_image['spurious_iou']))[both])
    out[group] = row
  return out


def compare_ious(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]
                 ) -> dict[str, Any]:
  """Paired change of core / spurious IoU between two models on the same images (by id).

  Args:
    before: per-image arrays (as in ``ious.npz``: ``ids``, ``core_iou``,
      ``core_defined``, ``spurious_iou``, ``spurious_defined``) of the first model.
    after: the same arrays of the second model.
  Returns:
    ``images`` (ids in common) and, for ``core`` and ``spurious``, mean, std,
    s.e. and count of ``after - before`` over images defined for both.
  """
  common, a_index, b_index = np.intersect1d(before['ids'], after['ids'], return_indices=True)
  out: dict[str, Any] = {'images': int(len(common))}
  for name in ('core', 'spurious'):
    both = (np.asarray(before[f'{name}_defined'])[a_index]
            & np.asarray(after[f'{name}_defined'])[b_index])
    delta = (np.asarray(after[f'{name}_iou'])[b_index] - np.asarray(before[f'{name}_iou'])[a_index])
    out[name] = _mean_sd(delta[both])
  return out


__all__ = ['METHODS', 'THRESHOLD_MODES', 'InterpretConfig', 'InterpretError', 'binarize_heatmap',
           'check_stage', 'compare_ious', 'default_stage', 'heatmaps', 'interpret_batch', 'iou',
           'make_interpret_step', 'mask_ious', 'selection_of', 'summarize_ious']

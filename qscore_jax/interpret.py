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

Pure functions (:func:`selection_of`, :func:`heatmaps`, :func:`mask_ious`,
:func:`interpret_batch`) work inside users' own jit/pmap;
:func:`make_interpret_step` jits :func:`interpret_batch` over a device mesh;
:func:`interpret_model` is the ``qscore interpret`` driver.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qscore_jax import parallel, stats
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
    discriminative: (d,) membership of D (cast to bool).
    eps: the highly-active threshold of L_i in per-sample stds (default 4).
  Returns:
    float32 (N, d).
  """
  return (stats.highly_active(h, eps) & discriminative.astype(bool)[None, :]).astype(jnp.float32)


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


def _mean_sd(values: np.ndarray) -> dict[str, Any]:
  if len(values) == 0:
    return {'mean': None, 'std': None, 'sem': None, 'count': 0}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(np.mean(values)), 'std': std, 'sem': std / np.sqrt(len(values)),
          'count': int(len(values))}


def summarize_ious(per_image: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Mean IoU with the core and spurious masks, over all / correct / misclassified images.

  ``per_image`` holds (N,) arrays ``core_iou``, ``spurious_iou``,
  ``core_defined``, ``spurious_defined``, ``has_target`` and ``correct`` (and,
  optionally, the ``*_baseline`` IoUs of :func:`interpret_batch`).
  Means are over images whose IoU is defined; the counts of left-out images
  are reported beside them.
  """
  correct = np.asarray(per_image['correct'], bool)
  groups = {'all': np.ones_like(correct), 'correct': correct, 'misclassified': ~correct}
  out: dict[str, Any] = {}
  for group, members in groups.items():
    row = {'images': int(members.sum()),
           'no_discriminative_feature': int((members & ~per_image['has_target']).sum())}
    for name in ('core', 'spurious'):
      defined = members & np.asarray(per_image[f'{name}_defined'], bool)
      row[name] = _mean_sd(np.asarray(per_image[f'{name}_iou'])[defined])
      if f'{name}_iou_baseline' in per_image:
        defined = members & np.asarray(per_image[f'{name}_baseline_defined'], bool)
        row[f'{name}_baseline'] = _mean_sd(np.asarray(per_image[f'{name}_iou_baseline'])[defined])
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


# --------------------------------------------------------------------------- driver


def _examples(dataset: str, split: str, ids: Sequence[int], *, preprocessing, image_size,
              data_dir) -> dict[str, np.ndarray]:
  """Network inputs and masks of a few examples of a split, by id (in the given order)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import datasets as data  # pylint: disable=import-outside-toplevel
  from qscore_jax.data.preprocess import eval_transform, mask_transform  # pylint: disable=import-outside-toplevel
  transform = eval_transform(preprocessing, image_size=image_size)
  masks = mask_transform(preprocessing, image_size=image_size)
  rows: dict[str, list] = {'image': [], 'core_mask': [], 'spurious_mask': [], 'id': []}
  for i in ids:
    example = next(iter(tfds.as_numpy(
        data.read_split(dataset, split, data_dir=data_dir, start=int(i), end=int(i) + 1,
                        with_masks=True)
        .map(lambda e: {'image': transform(e['image']), 'core_mask': masks(e['core_mask']),
                        'spurious_mask': masks(e['spurious_mask']), 'id': e['id']}))))
    for key in rows:
      rows[key].append(example[key])
  return {k: np.stack(v) if v else np.zeros((0,)) for k, v in rows.items()}


def _display_images(images: np.ndarray, preprocessing) -> np.ndarray:
  """Network inputs back to [0, 1] RGB for figures."""
  if preprocessing is None or preprocessing.mean is None:
    return np.clip(images, 0, 1)
  return np.clip(images * np.asarray(preprocessing.std) + np.asarray(preprocessing.mean), 0, 1)


def figure_samples(q: np.ndarray, correct: np.ndarray, ids: np.ndarray, has_target: np.ndarray,
                   per_group: int = 4) -> dict[str, np.ndarray]:
  """Ids to draw: the highest Q-Scores, the lowest, and the misclassified with the lowest Q.

  The last two prefer images with a target (Q = 0 images have no discriminative
  feature active, hence an empty heatmap); they fall back to any image.
  """
  order = np.argsort(-q, kind='stable')
  shown = order[has_target[order]] if has_target.any() else order
  wrong = shown[~correct[shown]]
  if not len(wrong):
    wrong = order[~correct[order]]
  return {'highest Q': ids[order[:per_group]], 'lowest Q': ids[shown[::-1][:per_group]],
          'misclassified': ids[wrong[::-1][:per_group]]}


def interpret_model(model_ref: str, dataset: str, out_dir: str | pathlib.Path, *,
                    split: str = 'test', reference_dataset: str | None = None,
                    reference_split: str = 'train', config: InterpretConfig = InterpretConfig(),
                    batch_size: int = 64, feature: int | None = None,
                    samples_per_group: int = 4, data_dir: str | None = None,
                    probe_epochs: int = 100, compression=None, analysis_plots: bool = False,
                    progress: bool = True) -> dict[str, Any]:
  """Heatmaps, IoUs and figures of one model on a dataset with masks (``qscore interpret``).

  1. Embeds ``reference_dataset``/``reference_split`` (default: ``dataset``'s
     train split) and ``dataset``/``split``, and runs the analysis: D and the
     linear probe come from the reference split, Q-Scores and correct /
     misclassified labels from the evaluated split.
  2. Makes every evaluated image's heatmap of L_i ∩ D and its IoU with the
     core and spurious masks; summarises them (:func:`summarize_ious`).
  3. Draws the figures: a grid of samples chosen by Q-Score (highest, lowest,
     misclassified) and, for one discriminative feature (``feature``, default
     the one highly active most often), its most activating images.

  Writes ``<out>/interpret.json``, ``<out>/ious.npz`` and the PNGs; stores and
  the analysis go to ``<out>/store_*`` and ``<out>/analysis`` (reused when present
  and made with the same settings).

  Args:
    model_ref: a saved model directory, finetune workdir, converted or shipped id.
    dataset: the dataset to explain; it must have core/spurious masks.
    out_dir: output directory.
    split: split of ``dataset`` to explain.
    reference_dataset: dataset of the reference split (D, the probe); default ``dataset``.
    reference_split: its split.
    config: heatmap method, stage, thresholds, eps.
    batch_size: global batch of the embedding and heatmap passes.
    feature: the feature of the "most activating images" figure (default: the
      discriminative feature highly active most often).
    samples_per_group: images per row group (highest Q, lowest Q, misclassified).
    data_dir: tfds data directory.
    probe_epochs: epochs of the linear probe that labels samples correct / misclassified.
    compression: a ``compression.CompressionConfig`` to add the compression
      curve to the analysis (default: none).
    analysis_plots: also draw the analysis plots (``<out>/analysis/*.png``).
    progress: progress bars.

  Returns:
    The ``interpret.json`` content.
  """
  from qscore_jax import analysis, report  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import eval_batches  # pylint: disable=import-outside-toplevel
  from qscore_jax.data.datasets import dataset_info  # pylint: disable=import-outside-toplevel
  from qscore_jax.embed import embed_model_on_dataset  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import registry  # pylint: disable=import-outside-toplevel
  from qscore_jax.models.weights import load_model, resolve_model_dir  # pylint: disable=import-outside-toplevel
  from qscore_jax.probe import ProbeConfig  # pylint: disable=import-outside-toplevel
  from qscore_jax.store import RepresentationStore  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  info = dataset_info(dataset, data_dir)
  if not info.has_masks:
    raise InterpretError(f'{dataset} has no core/spurious masks; qscore interpret needs a '
                         'dataset with masks: synthetic_shapes (built in) or salient_imagenet '
                         '(`qscore prepare salient_imagenet`).')
  model_dir = resolve_model_dir(model_ref)
  model, variables, meta = load_model(model_dir)
  config = dataclasses.replace(config, stage=check_stage(model, config.stage))
  if feature is not None and not 0 <= feature < model.num_features:
    raise InterpretError(f'feature {feature} is outside 0..{model.num_features - 1} (the '
                         f'model has {model.num_features} features).')
  reference_dataset = reference_dataset or dataset
  pre = meta.get('preprocessing')
  preprocessing = registry.Preprocessing.from_json(pre) if pre else None
  image_size = preprocessing.image_size if preprocessing else info.image_shape[0]
  if image_size:  # bad stage/size combinations fail now, not after embedding everything
    jax.eval_shape(functools.partial(heatmaps, model, selection=np.ones(model.num_features),
                                     stage=config.stage, method=config.method),
                   keep_state(variables), jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                               jnp.float32))

  stores = {}
  for name, (ds, sp) in {'reference': (reference_dataset, reference_split),
                         'evaluated': (dataset, split)}.items():
    stores[name] = embed_model_on_dataset(str(model_dir), ds, sp, out / f'store_{name}',
                                          batch_size=batch_size, data_dir=data_dir,
                                          progress=progress)
  scores_path = out / 'analysis' / 'scores.npz'
  # The analysis is reused only if it was made with the same settings.
  settings = {'eps': config.eps, 'probe_epochs': probe_epochs,
              'reference': f'{reference_dataset}/{reference_split}', 'split': f'{dataset}/{split}',
              'compression': dataclasses.asdict(compression) if compression else None,
              'plots': analysis_plots}
  settings = json.loads(json.dumps(settings))  # tuples as lists, as they are read back
  settings_path = out / 'analysis' / 'interpret_settings.json'
  if not scores_path.is_file() or not settings_path.is_file() or json.loads(
      settings_path.read_text()) != settings:
    analysis.analyze(analysis.Split.from_store(stores['reference']),
                     analysis.Split.from_store(stores['evaluated']), out / 'analysis',
                     config=analysis.AnalysisConfig(eps=config.eps, compression=compression,
                                                    probe=ProbeConfig(epochs=probe_epochs)),
                     class_names=info.class_names, plots=analysis_plots)
    settings_path.write_text(json.dumps(settings))
  scores = dict(np.load(scores_path))
  discriminative = scores['discriminative'].astype(bool)
  if not discriminative.any():
    raise InterpretError(f'{model_ref} has no discriminative feature on {reference_dataset}/'
                         f'{reference_split} (D is empty): there is nothing to explain.')

  mesh = parallel.data_mesh()
  step = make_interpret_step(model, config, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  state = jax.device_put(jax.device_get(keep_state(variables)), replicated)
  d_array = jax.device_put(discriminative, replicated)
  batches = eval_batches(dataset, split, batch_size=batch_size, preprocessing=preprocessing,
                         data_dir=data_dir, with_masks=True)
  keys = ('core_iou', 'spurious_iou', 'core_defined', 'spurious_defined', 'core_iou_baseline',
          'spurious_iou_baseline', 'core_baseline_defined', 'spurious_baseline_defined',
          'has_target', 'num_targets')
  collected: dict[str, list] = {k: [] for k in keys + ('ids',)}
  bar = tqdm(total=batches.num_examples, unit='img', disable=not progress or
             jax.process_index() != 0, desc=f'heatmaps {dataset}/{split}')
  for batch in batches:
    inputs = parallel.global_batch({k: batch[k] for k in ('image', 'core_mask', 'spurious_mask')},
                                   mesh)
    result = step(state, inputs['image'], inputs['core_mask'], inputs['spurious_mask'], d_array)
    keep = batch['mask']
    for key in keys:
      collected[key].append(parallel.local_rows(result[key])[keep])
    collected['ids'].append(batch['id'][keep])
    bar.update(int(keep.sum()))
  bar.close()
  per_image = {k: np.concatenate(v) for k, v in collected.items()}
  per_image = _gather_processes(per_image)
  order = np.argsort(per_image['ids'])
  per_image = {k: v[order] for k, v in per_image.items()}
  position = {int(i): p for p, i in enumerate(scores['ids'])}
  rows = np.array([position[int(i)] for i in per_image['ids']])
  per_image['correct'] = scores['correct'][rows].astype(bool)
  per_image['qscore'] = scores['score_qscore'][rows]
  summary = summarize_ious(per_image)

  result = {'model': str(model_dir), 'dataset': dataset, 'split': split,
            'reference': f'{reference_dataset}/{reference_split}',
            'config': dataclasses.asdict(config), 'num_discriminative': int(discriminative.sum()),
            'probe_top1': float(per_image['correct'].mean()), 'summary': summary}
  if jax.process_index() == 0:
    np.savez_compressed(out / 'ious.npz', **per_image)
    figures = {}
    groups = figure_samples(per_image['qscore'], per_image['correct'], per_image['ids'],
                            per_image['has_target'], samples_per_group)
    figures['samples'] = _draw_samples(model, variables, groups, discriminative, config,
                                       dataset, split, preprocessing, image_size, data_dir,
                                       out / 'heatmaps_by_qscore.png', report)
    evaluated = RepresentationStore.open(stores['evaluated'])
    h = np.asarray(evaluated.representations())
    # The discriminative feature highly active most often on the reference split.
    chosen = int(feature) if feature is not None else int(
        np.argmax(np.where(discriminative, scores['activation_counts'], -1)))
    top = np.asarray(evaluated.ids)[np.argsort(-h[:, chosen], kind='stable')[:2 * samples_per_group]]
    figures['feature'] = _draw_feature(model, variables, chosen, top, config, dataset, split,
                                       preprocessing, image_size, data_dir,
                                       out / f'feature_{chosen}_top_images.png', report)
    result['feature'] = {'index': chosen, 'in_D': bool(discriminative[chosen]),
                         'top_ids': [int(i) for i in top]}
    result['figures'] = {k: v.name for k, v in figures.items()}
    report.write_json(result, out / 'interpret.json')
  return result


def _gather_processes(per_image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows, on every process (one process: unchanged)."""
  if jax.process_count() == 1:
    return per_image
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  counts = multihost_utils.process_allgather(np.asarray([len(per_image['ids'])]))
  most = int(np.max(counts))
  out = {}
  for key, value in per_image.items():
    padded = np.zeros((most,) + value.shape[1:], value.dtype)
    padded[:len(value)] = value
    gathered = multihost_utils.process_allgather(padded)
    out[key] = np.concatenate([gathered[p][:int(counts[p][0])] for p in range(len(counts))])
  return out


def _explain(model, variables, images, config, **target) -> np.ndarray:
  fn = jax.jit(functools.partial(heatmaps, model, eps=config.eps, stage=config.stage,
                                 method=config.method))
  return np.asarray(fn(keep_state(variables), jnp.asarray(images), **target)['heatmap'])


def _draw_samples(model, variables, groups, discriminative, config, dataset, split,
                  preprocessing, image_size, data_dir, path, report):
  rows = []
  for group, ids in groups.items():
    if len(ids) == 0:
      continue
    ex = _examples(dataset, split, ids, preprocessing=preprocessing, image_size=image_size,
                   data_dir=data_dir)
    maps = _explain(model, variables, ex['image'], config,
                    discriminative=jnp.asarray(discriminative))
    images = _display_images(ex['image'], preprocessing)
    for i, example_id in enumerate(ex['id']):
      rows.append({'title': f'{group}, #{int(example_id)}', 'image': images[i],
                   'heatmap': maps[i], 'core_mask': ex['core_mask'][i],
                   'spurious_mask': ex['spurious_mask'][i]})
  return report.plot_heatmap_rows(rows, path, threshold=config.heatmap_threshold
                                  if config.threshold_mode == 'max_fraction' else None)


def _draw_feature(model, variables, feature, ids, config, dataset, split, preprocessing,
                  image_size, data_dir, path, report):
  ex = _examples(dataset, split, ids, preprocessing=preprocessing, image_size=image_size,
                 data_dir=data_dir)
  one_hot = np.zeros(model.num_features, np.float32)
  one_hot[feature] = 1
  maps = _explain(model, variables, ex['image'], config, selection=jnp.asarray(one_hot))
  return report.plot_feature_images(_display_images(ex['image'], preprocessing), maps,
                                    [int(i) for i in ex['id']], feature, path)


def comparison(before: Mapping[str, Any], after: Mapping[str, Any],
               before_ious: Mapping[str, np.ndarray], after_ious: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
  """Two ``interpret.json`` results (and their ``ious.npz``) side by side, with paired deltas.

  Args:
    before: the first model's ``interpret.json`` dict.
    after: the second model's.
    before_ious: the first model's ``ious.npz`` arrays (:func:`load_result`).
    after_ious: the second model's.
  """
  return {'before': before['model'], 'after': after['model'],
          'groups': {g: {name: {'before': before['summary'][g][name]['mean'],
                                'after': after['summary'][g][name]['mean']}
                         for name in ('core', 'spurious')} for g in before['summary']},
          'paired_delta': compare_ious(before_ious, after_ious)}


def comparison_lines(compared: Mapping[str, Any]) -> list[str]:
  """A short text table of :func:`comparison`.

  Args:
    compared: the dict returned by :func:`comparison`.
  """
  def cell(value):
    return f'{value:.3f}' if value is not None else 'n/a'
  lines = [f"{'group':<14}{'core before':>12}{'after':>8}{'spurious before':>17}{'after':>8}"]
  for group, row in compared['groups'].items():
    lines.append(f"{group:<14}{cell(row['core']['before']):>12}{cell(row['core']['after']):>8}"
                 f"{cell(row['spurious']['before']):>17}{cell(row['spurious']['after']):>8}")
  delta = compared['paired_delta']
  parts = [f"{name} {cell(delta[name]['mean'])} ± {cell(delta[name]['sem'])} "
           f"({delta[name]['count']} images)" for name in ('core', 'spurious')]
  lines.append('paired change (after - before, mean ± s.e.): ' + '; '.join(parts))
  return lines


def summary_lines(result: Mapping[str, Any]) -> list[str]:
  """A short text table of one ``interpret.json``.

  Args:
    result: the dict returned by :func:`interpret_model` (or read back).
  """
  lines = [f"model        {result['model']}",
           f"heatmaps     {result['config']['method']} at {result['config']['stage']}, "
           f"|D|={result['num_discriminative']}, probe top-1 {100 * result['probe_top1']:.1f}%",
           f"{'group':<14}{'images':>7}{'no target':>11}{'core mIoU':>11}{'(chance)':>10}"
           f"{'spurious mIoU':>15}{'(chance)':>10}"]
  def cell(stat):
    return f"{stat['mean']:.3f}" if stat and stat['mean'] is not None else 'n/a'
  for group, row in result['summary'].items():
    lines.append(f"{group:<14}{row['images']:>7}{row['no_discriminative_feature']:>11}"
                 f"{cell(row['core']):>11}{cell(row.get('core_baseline')):>10}"
                 f"{cell(row['spurious']):>15}{cell(row.get('spurious_baseline')):>10}")
  lines.append('(chance: the same heatmap regions against the masks rotated by 180 degrees)')
  return lines


def load_result(out_dir: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``interpret.json`` and ``ious.npz`` of a finished :func:`interpret_model` run.

  Args:
    out_dir: the run's output directory.
  Returns:
    ``(result dict, {name: per-image array})``.
  """
  out = pathlib.Path(out_dir)
  return json.loads((out / 'interpret.json').read_text()), dict(np.load(out / 'ious.npz'))


__all__ = ['InterpretConfig', 'InterpretError', 'binarize_heatmap', 'check_stage',
           'compare_ious', 'comparison', 'comparison_lines', 'default_stage', 'heatmaps', 'interpret_batch',
           'interpret_model', 'iou', 'load_result', 'make_interpret_step', 'mask_ious',
           'selection_of', 'summarize_ious', 'summary_lines']

r"""``qscore interpret``: where an encoder's discriminative features look, against core / spurious masks.

The driver on top of :mod:`qscore_jax.saliency` (the pure heatmap and IoU
functions, re-exported here) and of the analysis pipeline
(:func:`qscore_jax.analysis.analyze_encoder`): :func:`interpret` takes an
analysis result and makes every evaluated image's heatmap, its IoUs, their
summary and figures; :func:`interpret_model` runs the pipeline first. The
comparison of two models (before / after fine-tuning) and the text tables are
here too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qscore_jax import analysis, findings, outputs, parallel, report
from qscore_jax.data import eval_batches
from qscore_jax.data.datasets import dataset_info, read_split
from qscore_jax.data.preprocess import eval_transform, mask_transform
from qscore_jax.models.encoder import Encoder, as_encoder
from qscore_jax.models.features import keep_state
from qscore_jax.probe import ProbeConfig
# The pure functions, under their historical names here.
from qscore_jax.saliency import (METHODS, THRESHOLD_MODES, InterpretConfig, InterpretError,  # pylint: disable=unused-import
                                 binarize_heatmap, check_stage, compare_ious, default_stage,
                                 heatmaps, interpret_batch, iou, make_interpret_step, mask_ious,
                                 selection_of, summarize_ious)


def _examples(dataset: str, split: str, ids: Sequence[int], *, preprocessing, image_size,
              data_dir) -> dict[str, np.ndarray]:
  """Network inputs and masks of a few examples of a split, by id (in the given order)."""
  transform = eval_transform(preprocessing, image_size=image_size)
  masks = mask_transform(preprocessing, image_size=image_size)
  rows: dict[str, list] = {'image': [], 'core_mask': [], 'spurious_mask': [], 'id': []}
  for i in ids:
    example = next(
        read_split(dataset, split, data_dir=data_dir, start=int(i), end=int(i) + 1,
                   with_masks=True)
        .map(lambda e: {'image': transform(e['image']), 'core_mask': masks(e['core_mask']),
                        'spurious_mask': masks(e['spurious_mask']), 'id': e['id']})
        .as_numpy_iterator())
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
  feature active, hence an empty heatmap); they fall back to any image. No id is
  in two groups: a group skips the ids of the groups before it.

  Args:
    q: (N,) Q-Scores.
    correct: (N,) bool, the probe classified the sample correctly.
    ids: (N,) example ids.
    has_target: (N,) bool, the sample has a highly active discriminative feature.
    per_group: ids per group (default 4).
  Returns:
    ``{'highest Q', 'lowest Q', 'misclassified'}``, each an array of up to ``per_group`` ids.
  """
  order = np.argsort(-q, kind='stable')
  shown = order[has_target[order]] if has_target.any() else order
  wrong = shown[~correct[shown]]
  if not len(wrong):
    wrong = order[~correct[order]]
  taken: set[int] = set()
  groups = {}
  for name, candidates in (('highest Q', order), ('lowest Q', shown[::-1]),
                           ('misclassified', wrong[::-1])):
    rows = [int(r) for r in candidates if int(r) not in taken][:per_group]
    taken.update(rows)
    groups[name] = ids[np.asarray(rows, int)]
  return groups


def check_inputs(encoder: Encoder, dataset: str, config: InterpretConfig = InterpretConfig(), *,
                 feature: int | None = None, data_dir: str | None = None) -> InterpretConfig:
  """Fails now, before anything is embedded, on inputs the heatmaps cannot take.

  Checks that ``dataset`` has core/spurious masks, that the encoder has the
  stage (and that the stage is not 1x1 at the input size), and that ``feature``
  is one of its features.

  Args:
    encoder: the encoder to explain.
    dataset: the dataset to explain.
    config: heatmap options.
    feature: the feature of the top-images figure (None: chosen later).
    data_dir: tfds data directory.
  Returns:
    ``config`` with its stage resolved (the model's default when None).
  """
  info = dataset_info(dataset, data_dir)
  if not info.has_masks:
    raise InterpretError(f'{dataset} has no core/spurious masks; qscore interpret needs a '
                         'dataset with masks: synthetic_shapes (built in) or salient_imagenet '
                         '(`qscore prepare salient_imagenet`).')
  model = encoder.module
  config = dataclasses.replace(config, stage=check_stage(model, config.stage))
  if feature is not None and not 0 <= feature < model.num_features:
    raise InterpretError(f'feature {feature} is outside 0..{model.num_features - 1} (the '
                         f'model has {model.num_features} features).')
  image_size = _image_size(encoder, dataset, data_dir)
  if image_size:  # bad stage/size combinations fail now, not after embedding everything
    jax.eval_shape(functools.partial(heatmaps, model, selection=np.ones(model.num_features),
                                     stage=config.stage, method=config.method),
                   keep_state(encoder.variables),
                   jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return config


def _image_size(encoder: Encoder, dataset: str, data_dir: str | None) -> int | None:
  """The network input side: the encoder's preprocessing, else the dataset's native size."""
  if encoder.preprocessing:
    return encoder.preprocessing.image_size
  return dataset_info(dataset, data_dir).image_shape[0]


def interpret(result: analysis.AnalysisResult, out_dir: str | pathlib.Path, *,
              config: InterpretConfig = InterpretConfig(), batch_size: int = 64,
              feature: int | None = None, samples_per_group: int = 4,
              progress: bool = True) -> dict[str, Any]:
  """Heatmaps, IoUs and figures of an analysed encoder (the part of ``qscore interpret`` that
  is its own).

  1. Makes every evaluated image's heatmap of L_i ∩ D (D, Q and the probe's
     correct / misclassified labels from ``result``) and its IoU with the core
     and spurious masks; summarises them (:func:`summarize_ious`).
  2. Draws the figures: a grid of samples chosen by Q-Score (highest, lowest,
     misclassified) and, for one feature (``feature``, default the
     discriminative feature highly active most often), its most activating images.

  Writes ``<out>/interpret.json``, ``<out>/ious.npz`` and the PNGs.

  Args:
    result: :func:`qscore_jax.analysis.analyze_encoder`'s result on a dataset
      with core/spurious masks.
    out_dir: output directory: new, or an interpretation qscore_jax wrote (rewritten in
      place), or one holding only qscore_jax's outputs (e.g. the analysis' stores).
    config: heatmap method, stage, thresholds; its ``eps`` must be the analysis'.
    batch_size: global batch of the heatmap pass.
    feature: the feature of the "most activating images" figure.
    samples_per_group: images per row group (highest Q, lowest Q, misclassified).
    progress: progress bars.

  Returns:
    The ``interpret.json`` content.
  Raises:
    qscore_jax.outputs.OutputError: ``out_dir`` holds files qscore_jax did not write.
  """
  encoder = result.encoder
  if encoder is None:
    raise InterpretError('interpret needs the analysis of an encoder '
                         '(qscore_jax.analysis.analyze_encoder), not of stores alone.')
  if config.eps != result.eps:
    raise InterpretError(f'the heatmaps would use eps={config.eps:g} but D and Q were found '
                         f'with eps={result.eps:g}; give the analysis\' eps to InterpretConfig.')
  dataset, split = result.evaluated
  data_dir = result.data_dir
  config = check_inputs(encoder, dataset, config, feature=feature, data_dir=data_dir)
  model, variables, preprocessing = encoder.module, encoder.variables, encoder.preprocessing
  image_size = _image_size(encoder, dataset, data_dir)
  out = pathlib.Path(out_dir).expanduser().resolve()
  outputs.prepare_output(out, 'interpretation')
  if jax.process_index() == 0:  # a run killed midway leaves no interpret.json beside new files
    (out / 'interpret.json').unlink(missing_ok=True)
  scores = result.scores
  discriminative = result.discriminative
  reference = '/'.join(result.reference)
  if not discriminative.any():
    raise InterpretError(f'{encoder.name} has no discriminative feature on {reference} (D is '
                         'empty): there is nothing to explain.')

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
    step_out = step(state, inputs['image'], inputs['core_mask'], inputs['spurious_mask'], d_array)
    keep = batch['mask']
    for key in keys:
      collected[key].append(parallel.local_rows(step_out[key])[keep])
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
  per_image['label'] = scores['labels'][rows]
  per_image['prediction'] = scores['predictions'][rows]
  summary = summarize_ious(per_image)

  interpretation = {
      'model': str(encoder.directory) if encoder.directory else encoder.name,
      'compute_dtype': encoder.compute_dtype,
      'dataset': dataset, 'split': split, 'reference': reference,
      'config': dataclasses.asdict(config), 'num_discriminative': int(discriminative.sum()),
      'probe_top1': float(per_image['correct'].mean()), 'summary': summary}
  interpretation['findings'] = [f for f in [findings.localisation_finding(
      summary['all'], 'heatmaps_by_qscore.png')] if f]
  if jax.process_index() == 0:
    np.savez_compressed(out / 'ious.npz', **per_image)
    figures = {}
    groups = figure_samples(per_image['qscore'], per_image['correct'], per_image['ids'],
                            per_image['has_target'], samples_per_group)
    names = analysis.class_names_of(dataset, data_dir)
    figures['samples'] = _draw_samples(model, variables, groups, per_image, names,
                                       discriminative, config, dataset, split, preprocessing,
                                       image_size, data_dir, out / 'heatmaps_by_qscore.png')
    evaluated = result.evaluated_store()
    h = np.asarray(evaluated.representations())
    # The discriminative feature highly active most often on the reference split.
    chosen = int(feature) if feature is not None else int(
        np.argmax(np.where(discriminative, scores['activation_counts'], -1)))
    top_rows = np.argsort(-h[:, chosen], kind='stable')[:2 * samples_per_group]
    top = np.asarray(evaluated.ids)[top_rows]
    counts = scores['activation_counts']
    reference_rows = result.report['feature_stats'].get('num_rows') or 0
    why = (f'chosen with --feature' if feature is not None else
           f'the discriminative feature highly active most often on {reference}')
    why += (f"; {'in' if discriminative[chosen] else 'not in'} D, highly active on "
            f'{int(counts[chosen])} of {reference_rows} reference images')
    position = {int(i): p for p, i in enumerate(per_image['ids'])}
    titles = []
    for i, value in zip(top, h[top_rows, chosen]):
      p = position.get(int(i))
      label = _class(names, per_image['label'][p]) if p is not None else '?'
      titles.append(f'#{int(i)} h={value:.2f}\n{label}')
    figures['feature'] = _draw_feature(model, variables, chosen, top, titles,
                                       f'feature {chosen}: its most activating {split} images '
                                       f'and their heatmaps ({why})', config, dataset, split,
                                       preprocessing, image_size, data_dir,
                                       out / f'feature_{chosen}_top_images.png')
    interpretation['feature'] = {'index': chosen, 'in_D': bool(discriminative[chosen]),
                                 'why': why, 'top_ids': [int(i) for i in top]}
    interpretation['figures'] = {k: v.name for k, v in figures.items()}
    report.write_json(interpretation, out / 'interpret.json')
  return interpretation


def interpret_model(encoder: Encoder, dataset: str, out_dir: str | pathlib.Path, *,
                    split: str = 'test', reference_dataset: str | None = None,
                    reference_split: str = 'train', config: InterpretConfig = InterpretConfig(),
                    batch_size: int = 64, feature: int | None = None,
                    samples_per_group: int = 4, data_dir: str | None = None,
                    probe_epochs: int = 100, compression=None, analysis_plots: bool = False,
                    progress: bool = True) -> dict[str, Any]:
  """``qscore interpret``: the analysis pipeline, then :func:`interpret` of its result.

  Stores and the analysis go to ``<out>/store_*`` and ``<out>/analysis``
  (reused when present and made with the same encoder and settings); the
  heatmaps' files to ``<out>`` (:func:`interpret`).

  Args:
    encoder: the :class:`~qscore_jax.models.encoder.Encoder` (a model reference is
      loaded once, with a deprecation warning).
    dataset: the dataset to explain; it must have core/spurious masks.
    out_dir: output directory: new, or an interpretation qscore_jax wrote (its stores and
      analysis reused when they match).
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
  Raises:
    qscore_jax.outputs.OutputError: ``out_dir`` holds files qscore_jax did not write.
  """
  encoder = as_encoder(encoder, caller='interpret_model')
  config = check_inputs(encoder, dataset, config, feature=feature, data_dir=data_dir)
  outputs.prepare_output(out_dir, 'interpretation')  # before the embedding
  result = analysis.analyze_encoder(
      encoder, dataset, out_dir, split=split, reference_dataset=reference_dataset,
      reference_split=reference_split,
      config=analysis.AnalysisConfig(eps=config.eps, compression=compression,
                                     probe=ProbeConfig(epochs=probe_epochs)),
      batch_size=batch_size, data_dir=data_dir, plots=analysis_plots, progress=progress)
  return interpret(result, out_dir, config=config, batch_size=batch_size, feature=feature,
                   samples_per_group=samples_per_group, progress=progress)


def _gather_processes(per_image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows, on every process (one process: unchanged)."""
  if jax.process_count() == 1:
    return per_image
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


def _class(names: Sequence[str] | None, label) -> str:
  label = int(label)
  return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)


def heatmap_caption(config: Mapping[str, Any]) -> str:
  """The caption of the heatmap figures: what the colours and the contour are.

  Args:
    config: the run's heatmap options as in ``interpret.json``
      (``dataclasses.asdict`` of its :class:`InterpretConfig`).
  """
  target = 'its highly active discriminative features (L_i ∩ D)'
  outline = (f"The white contour outlines the binarised region (heatmap >= "
             f"{config['heatmap_threshold']:g} of its maximum) whose IoU with the masks is "
             'measured.' if config['threshold_mode'] == 'max_fraction' else
             f"The region whose IoU is measured is binarised by {config['threshold_mode']} "
             f"({config['heatmap_threshold']:g}); no contour is drawn.")
  return (f"{config['method']} heatmap at {config['stage']} of the sum of {target}, upsampled "
          f'to the image and divided by its maximum (colour bar). {outline} Masks: white = the '
          'object (core) or the background (spurious), binarised at '
          f"{config['mask_threshold']:g}. Rows: Q = the sample's Q-Score; true / predicted: "
          "its class and the linear probe's.")


def _draw_samples(model, variables, groups, per_image, names, discriminative, config, dataset,
                  split, preprocessing, image_size, data_dir, path):
  position = {int(i): p for p, i in enumerate(per_image['ids'])}
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
      p = position[int(example_id)]
      title = (f"{group}, #{int(example_id)}\nQ={per_image['qscore'][p]:.3f}\n"
               f"true {_class(names, per_image['label'][p])}\n"
               f"pred. {_class(names, per_image['prediction'][p])}")
      rows.append({'title': title, 'image': images[i], 'heatmap': maps[i],
                   'core_mask': ex['core_mask'][i], 'spurious_mask': ex['spurious_mask'][i]})
  return report.plot_heatmap_rows(rows, path, threshold=config.heatmap_threshold
                                  if config.threshold_mode == 'max_fraction' else None,
                                  caption=heatmap_caption(dataclasses.asdict(config)))


def _draw_feature(model, variables, feature, ids, titles, title, config, dataset, split,
                  preprocessing, image_size, data_dir, path):
  ex = _examples(dataset, split, ids, preprocessing=preprocessing, image_size=image_size,
                 data_dir=data_dir)
  one_hot = np.zeros(model.num_features, np.float32)
  one_hot[feature] = 1
  maps = _explain(model, variables, ex['image'], config, selection=jnp.asarray(one_hot))
  caption = (f'Top row: the {len(ids)} {split} images on which feature {feature} is largest '
             f'(h = its activation; the class). Bottom row: {config.method} heatmap at '
             f'{config.stage} of that feature alone, divided by its maximum.')
  return report.plot_feature_images(_display_images(ex['image'], preprocessing), maps,
                                    titles, title, path, caption=caption)


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


def summary_lines(result: Mapping[str, Any], with_findings: bool = True) -> list[str]:
  """A short text table of one ``interpret.json``, after what it shows.

  Args:
    result: the dict returned by :func:`interpret_model` (or read back).
    with_findings: begin with the judged claim (:mod:`qscore_jax.findings`).
  """
  lines = findings.finding_lines(result.get('findings') or []) if with_findings else []
  lines += [f"model        {result['model']}",
           f"heatmaps     {result['config']['method']} at {result['config']['stage']}, "
           f"|D|={result['num_discriminative']}, probe top-1 {100 * result['probe_top1']:.1f}%",
           f"{'group':<14}{'images':>7}{'no disc.':>9}{'empty map':>10}{'core mIoU':>11}"
           f"{'(chance)':>10}{'spurious mIoU':>15}{'(chance)':>10}"]
  def cell(stat):
    return f"{stat['mean']:.3f}" if stat and stat['mean'] is not None else 'n/a'
  for group, row in result['summary'].items():
    lines.append(f"{group:<14}{row['images']:>7}{row['no_discriminative_feature']:>9}"
                 f"{row.get('empty_heatmap', 0):>10}"
                 f"{cell(row['core']):>11}{cell(row.get('core_baseline')):>10}"
                 f"{cell(row['spurious']):>15}{cell(row.get('spurious_baseline')):>10}")
  lines.append('(no disc.: no discriminative feature highly active; empty map: some are, but '
               'their heatmap is zero; chance: the same heatmap regions against the masks '
               'rotated by 180 degrees)')
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


__all__ = ['InterpretConfig', 'InterpretError', 'binarize_heatmap', 'check_inputs', 'check_stage',
           'compare_ious', 'comparison', 'comparison_lines', 'default_stage', 'figure_samples',
           'heatmap_caption', 'heatmaps', 'interpret', 'interpret_batch', 'interpret_model', 'iou',
           'load_result', 'make_interpret_step', 'mask_ious', 'selection_of', 'summarize_ious', 'summary_lines']

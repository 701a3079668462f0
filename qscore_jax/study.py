"""When does a per-sample score find a probe's mistakes? (``qscore study``)

For every dataset of the config (synthetic-shapes configurations whose errors have a
known source) and every method:

1. Pre-train an encoder from scratch with the experiment's recipe
   (:func:`qscore_jax.experiment.run_config`), keeping ``config.checkpoints``
   checkpoints along the way (``qscore track`` reads them). The method
   ``supervised`` is the control: the same architecture and batch trained with
   the labels (:mod:`qscore_jax.supervised`), a representation known to encode the
   objects, where the self-supervised ones may not.
2. Embed the train and test splits, train the linear probe and score every test
   sample (:func:`qscore_jax.analysis.analyze_encoder`): Q-Score, Q v1, kNN agreement,
   L2 norm, Hoyer sparsity and the probe's max-softmax (which uses the probe, hence
   the labels: the ceiling); then neighbourhood consistency across the dataset's
   encoders (:func:`qscore_jax.metrics.neighbourhood_consistency`), label-free.
3. Join the scores with the images' ground truth by id
   (:func:`qscore_jax.data.split_attributes`) and measure, per score:

   * AUPRC (error = positive) and AUROC for finding the probe's errors, with 95%
     bootstrap intervals, over all errors and by **error source**. An error is a
     *cue conflict* when the background texture is not the class's own on a dataset
     where the texture predicts the class (it agrees with the label on more than
     twice the chance rate of the training images), else *weak evidence*. The
     errors of one source are the positives and every correctly classified sample
     the negatives, so the chance AUPRC of a source is its errors' share of that set.
   * Spearman's rho with the image's **evidence**: the visible object area times its
     contrast, ``object_area * (1 - occlusion) * contrast`` (and with each factor in
     ``results.json``), with a bootstrap interval.

Output in ``<workdir>``: one pre-training workdir per dataset and method
(``<dataset>-<method>/``, its analysis in ``eval/``), ``results.json``, ``table.md``
and ``study.png``. A finished run is reused and an interrupted one resumes, so the
command can be rerun after a crash; results are recomputed from the runs every time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from qscore_jax import analysis, experiment, findings, metrics, outputs, report, supervised
from qscore_jax.configs import finetune
from qscore_jax.data import dataset_info, split_attributes
from qscore_jax.models import load_encoder
from qscore_jax.models.weights import read_metadata

# The control among the study's methods: the same architecture trained with the labels.
SUPERVISED = 'supervised'

# The per-sample scores, in table order: (key in the analysis' scores.npz or added here,
# name in the table). Higher = predicted correct for every one. kNN agreement and max-softmax
# use the probe's predictions (hence the labels); the others use the representation alone.
SCORES = (('qscore', 'Q-Score'), ('qscore_v1', 'Q v1'),
          ('knn_agreement', 'kNN agreement (uses the probe)'),
          ('neighbourhood_consistency', 'neighbourhood consistency'), ('l2_norm', 'L2 norm'),
          ('hoyer_sparsity', 'Hoyer sparsity'), ('max_softmax', 'max-softmax (uses the probe)'))
SOURCES = ('all', 'weak evidence', 'cue conflict')
LABEL_FREE = ('qscore', 'qscore_v1', 'neighbourhood_consistency', 'l2_norm', 'hoyer_sparsity')
DIFFICULTY = ('evidence', 'object_area', 'occlusion', 'contrast')
# A background cue "predicts the class" when it agrees with the label on more than this
# many times the chance rate (1 / classes) of the training images.
PREDICTIVE_CUE = 2.0


def pretrain_config(config: ml_collections.ConfigDict, dataset: str,
                    method: str) -> ml_collections.ConfigDict:
  """The ``qscore finetune`` config of one pre-training run of the study.

  Args:
    config: a study config (``qscore_jax/configs/study.py``).
    dataset: the training data.
    method: the SSL method.
  """
  c = experiment.run_config(config, method, steps=config.pretrain_steps, seed=0,
                            regularizer='none', learning_rate=config.learning_rate,
                            warmup_epochs=1.0, dataset=dataset)
  c.checkpoint_every_steps = max(config.pretrain_steps // config.checkpoints, 1)
  c.keep_checkpoints = config.checkpoints
  return c


def supervised_config(config: ml_collections.ConfigDict, dataset: str) -> supervised.SupervisedConfig:
  """The study's supervised control on ``dataset``: its architecture and batch, trained with
  cross-entropy for ``config.supervised_steps`` (:mod:`qscore_jax.supervised`'s defaults
  otherwise).

  Args:
    config: a study config.
    dataset: the training data.
  """
  return supervised.SupervisedConfig(
      arch=config.arch, arch_options=(('width_multiplier', float(config.width_multiplier)),),
      dataset=dataset, steps=config.supervised_steps, batch_size=config.batch_size)


def _train_supervised(config, dataset: str, directory: pathlib.Path, log) -> pathlib.Path:
  """The supervised control's model (trained, or reused when it was made by this config)."""
  wanted = supervised_config(config, dataset)
  model = directory / 'model'
  expected = json.loads(json.dumps(dataclasses.asdict(wanted)))
  if model.is_dir():
    recorded = (read_metadata(model).get('provenance') or {}).get('config')
    if recorded != expected:
      raise ValueError(f'{model} holds a supervised model of another config ({recorded}); the '
                       f'study asks for {expected}. Use another --workdir, or delete {directory} '
                       'to train it again.')
    log(f'  {directory.name}: done earlier, reused')
    return model
  start = time.perf_counter()
  directory.mkdir(parents=True, exist_ok=True)
  with contextlib.redirect_stdout(io.StringIO()):  # its per-step lines; the study logs its own
    path = supervised.train_supervised(wanted, model, log_every=wanted.steps)
  log(f'  {directory.name}: {wanted.steps} supervised steps in '
      f'{time.perf_counter() - start:.0f} s')
  return path


def run_name(dataset: str, method: str) -> str:
  """The directory of a dataset's run of ``method`` (``weak_evidence-simclr``).

  Args:
    dataset: the dataset (``synthetic_shapes/weak_evidence``).
    method: the SSL method.
  """
  return f"{dataset.split('/')[-1]}-{method}"


def error_sources(correct: np.ndarray, misleading: np.ndarray, cue_predictive: bool
                  ) -> dict[str, np.ndarray]:
  """The samples each source's AUPRC ranks: its errors and every correct sample.

  Args:
    correct: (N,) bool, the probe's correct samples.
    misleading: (N,) bool, the texture is not the class's own.
    cue_predictive: whether the texture predicts the class on this dataset (else
      every error is weak evidence).
  Returns:
    ``{source: (N,) bool}`` for :data:`SOURCES`.
  """
  conflict = ~correct & misleading & cue_predictive
  return {'all': np.ones_like(correct), 'weak evidence': correct | (~correct & ~conflict),
          'cue conflict': correct | conflict}


def difficulty(attributes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The images' ground-truth difficulty factors and their product, the evidence.

  Args:
    attributes: :func:`~qscore_jax.data.split_attributes` (``object_area``,
      ``occlusion``, ``contrast``), rows in one order.
  Returns:
    ``{name: (N,) float64}`` for :data:`DIFFICULTY`.
  """
  area = np.asarray(attributes['object_area'], np.float64)
  occlusion = np.asarray(attributes['occlusion'], np.float64)
  contrast = np.asarray(attributes['contrast'], np.float64)
  return {'evidence': area * (1 - occlusion) * contrast, 'object_area': area,
          'occlusion': occlusion, 'contrast': contrast}


def measure(scores: dict[str, np.ndarray], correct: np.ndarray, sources: dict[str, np.ndarray],
            factors: dict[str, np.ndarray], *, resamples: int) -> dict[str, dict[str, Any]]:
  """Every score's error-finding areas by source and its rho with each difficulty factor.

  Args:
    scores: ``{name: (N,)}``, higher = predicted correct.
    correct: (N,) bool.
    sources: :func:`error_sources`.
    factors: :func:`difficulty`.
    resamples: bootstrap resamples of every interval.
  Returns:
    ``{score: {'by_source': {source: metrics.score_table row}, 'spearman': {factor:
    metrics.spearman}}}``.
  """
  out = {}
  for name, values in scores.items():
    by_source = {}
    for source, rows in sources.items():
      by_source[source] = metrics.score_table({name: values[rows]}, correct[rows],
                                              resamples=resamples)[name]
      by_source[source].pop('bootstrap', None)
    out[name] = {'by_source': by_source,
                 'spearman': {f: metrics.spearman(values, factor, resamples=resamples)
                              for f, factor in factors.items()}}
  return out


def _evaluate(config, model_dir: pathlib.Path, dataset: str, out: pathlib.Path):
  analysis_config = analysis.AnalysisConfig(eps=config.eps, compression=None, knn_k=config.knn_k,
                                            bootstrap_resamples=0)
  return analysis.analyze_encoder(
      load_encoder(model_dir), dataset, out, split='test', reference_split='train',
      config=analysis_config, plots=True, progress=False, analysis_dir=out,
      store_dirs={'reference': out / 'store_train', 'evaluated': out / 'store_test'})


def dataset_results(config, dataset: str, evaluations: dict[str, Any]) -> dict[str, Any]:
  """The study's measurements on one dataset from its encoders' analyses.

  Args:
    config: the study config.
    dataset: the dataset.
    evaluations: ``{method: AnalysisResult}`` of the test split.
  Returns:
    ``{'dataset', 'cue_agreement', 'cue_predictive', 'encoders': {method: {...}}}``.
  """
  train_cue = split_attributes(dataset, 'train', keys=('misleading',))['misleading']
  agreement = float(np.mean(~train_cue.astype(bool)))
  num_classes = dataset_info(dataset).num_classes
  predictive = agreement > PREDICTIVE_CUE / num_classes
  attributes = split_attributes(dataset, 'test')
  factors = difficulty(attributes)
  misleading = attributes['misleading'].astype(bool)
  spaces, orders = {}, {}
  for method, result in evaluations.items():
    ids = np.asarray(result.scores['ids'])
    if not np.array_equal(np.sort(ids), np.arange(len(misleading))):
      raise ValueError(f'the test store of {method} on {dataset} does not hold every test '
                       f'example once ({len(ids)} rows for {len(misleading)} examples): '
                       'delete its eval/ directory and run the study again.')
    orders[method] = np.argsort(ids, kind='stable')  # store rows -> id order
    spaces[method] = np.asarray(analysis.Split.from_store(
        result.stores['evaluated']).representations[:])[orders[method]]
  consistency = (metrics.neighbourhood_consistency(list(spaces.values()), config.consistency_k)
                 if len(spaces) > 1 else None)
  encoders = {}
  for method, result in evaluations.items():
    order = orders[method]
    correct = result.scores['correct'][order].astype(bool)
    scores = {key: result.scores[f'score_{key}'][order].astype(np.float64)
              for key, _ in SCORES if f'score_{key}' in result.scores}
    if consistency is not None:
      scores['neighbourhood_consistency'] = consistency
    scores = {key: scores[key] for key, _ in SCORES if key in scores}
    sources = error_sources(correct, misleading, predictive)
    encoders[method] = {
        'top1': result.report['probe']['top1'],
        'errors': {source: int((~correct & rows).sum()) for source, rows in sources.items()},
        'num_correct': int(correct.sum()),
        'num_discriminative': result.report['feature_stats']['num_discriminative'],
        'qscore_zero_fraction': result.report['qscore_summary']['zero_fraction'],
        'model_fingerprint': result.encoder.fingerprint,
        'scores': measure(scores, correct, sources, factors, resamples=config.bootstrap_resamples)}
  return {'dataset': dataset, 'cue_agreement': agreement, 'cue_predictive': bool(predictive),
          'evidence_range': [float(factors['evidence'].min()), float(factors['evidence'].max())],
          'encoders': encoders}


def run_study(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Runs (or resumes) the study; returns ``results.json``'s content.

  Args:
    config: a study config (``qscore_jax/configs/study.py``).
    workdir: directory of every run and of ``results.json``, ``table.md``, ``study.png``
      (new, or a study qscore_jax wrote; finished runs in it are reused).
    log: called with each progress line (default ``print``).
  Returns:
    ``{'config', 'datasets': [dataset_results], 'seconds'}``.
  Raises:
    qscore_jax.outputs.OutputError: ``workdir`` holds something else.
  """
  finetune.check_config(config)  # before anything is trained
  if not config.datasets or not config.methods:
    raise ValueError('the study needs at least one dataset and one method (config fields '
                     'datasets and methods).')
  root = pathlib.Path(workdir).expanduser().resolve()
  outputs.prepare_output(root, 'study', option='--workdir')
  if jax.config.jax_compilation_cache_dir is None:
    # Every run compiles the same step again: the persistent cache turns that into reads.
    jax.config.update('jax_compilation_cache_dir', str(root / 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  start = time.perf_counter()
  per_dataset = []
  for dataset in config.datasets:
    evaluations = {}
    for method in config.methods:
      name = run_name(dataset, method)
      log(f'{name}: ' + (f'supervised training, {config.supervised_steps} steps'
                         if method == SUPERVISED else
                         f'pre-training {config.pretrain_steps} steps from scratch'))
      model = (_train_supervised(config, dataset, root / name, log) if method == SUPERVISED
               else experiment.train_run(pretrain_config(config, dataset, method), root / name,
                                         'random', log))
      evaluations[method] = _evaluate(config, model, dataset, root / name / 'eval')
      log(f"{name}: linear top-1 {100 * evaluations[method].report['probe']['top1']:.1f}%")
    per_dataset.append(dataset_results(config, dataset, evaluations))
  results = {'config': json.loads(config.to_json()), 'datasets': per_dataset,
             'seconds': round(time.perf_counter() - start, 1)}
  report.write_json(results, root / 'results.json')
  (root / 'table.md').write_text('\n'.join(table_lines(results)) + '\n')
  report.plot_study(figure_rows(results), root / 'study.png',
                    title=f"AUROC of each score for telling the probe's errors from its correct "
                          f"samples, by the errors' source (Q-Score eps = {config.eps:g})")
  return results


def _estimate(value: float | None, interval, digits: int = 2) -> str:
  """``0.74 [0.69, 0.79]``; ``–`` for a missing or NaN value."""
  if value is None or not np.isfinite(value):
    return '–'
  return f'{value:.{digits}f}' + (f' {findings.format_interval(interval, digits)}' if interval
                                  else '')


def _cell(row: dict[str, Any], key: str, digits: int = 3) -> str:
  return _estimate(row[key], row.get(f'{key}_interval'), digits)


def summary_lines(results: dict[str, Any]) -> list[str]:
  """The README's condensed table: per dataset and encoder, Q-Score by error source beside
  the best label-free rival and the probe's max-softmax.

  Args:
    results: :func:`run_study`'s result (``results.json``).
  """
  names = dict(SCORES)
  lines = ['| data | encoder | top-1 % | errors: weak / cue | D; Q = 0 | Q-Score AUROC | '
           'Q-Score AUPRC, weak evidence (chance) | Q-Score AUPRC, cue conflict (chance) | '
           'best label-free rival, AUROC | max-softmax AUROC | rho(Q-Score, evidence) | '
           'best label-free rho with evidence |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for entry in results['datasets']:
    for method, encoder in entry['encoders'].items():
      scores = encoder['scores']

      def auroc(key):
        cell = scores[key]['by_source']['all']
        return _estimate(cell['auroc'], cell.get('auroc_interval'))

      def auprc(key, source):
        cell = scores[key]['by_source'][source]
        if not cell['num_errors']:
          return '– (no errors)'
        return (f"{_cell(cell, 'auprc_error_positive', 2)}"
                f" ({cell['chance_auprc_error_positive']:.2f})")

      def rho(key):
        cell = scores[key]['spearman']['evidence']
        return _estimate(cell['rho'], cell['interval'])

      rivals = [k for k in LABEL_FREE if k != 'qscore' and k in scores]
      best = max(rivals, key=lambda k: np.nan_to_num(scores[k]['by_source']['all']['auroc'],
                                                     nan=-1))
      best_rho = max(LABEL_FREE, key=lambda k: np.nan_to_num(
          scores[k]['spearman']['evidence']['rho'], nan=-2) if k in scores else -2)
      errors = encoder['errors']
      lines.append(
          f"| {entry['dataset'].split('/')[-1]} | {method} | {100 * encoder['top1']:.1f} | "
          f"{errors['weak evidence']} / {errors['cue conflict']} | "
          f"{encoder['num_discriminative']}; {100 * encoder['qscore_zero_fraction']:.0f}% | "
          f"{auroc('qscore')} | {auprc('qscore', 'weak evidence')} | "
          f"{auprc('qscore', 'cue conflict')} | {names[best]}: {auroc(best)} | "
          f"{auroc('max_softmax')} | {rho('qscore')} | {names[best_rho]}: {rho(best_rho)} |")
  return lines


def figure_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The bars of ``study.png``: one per dataset, encoder, score and error source.

  Args:
    results: :func:`run_study`'s result (``results.json``).
  """
  rows = []
  for entry in results['datasets']:
    for method, encoder in entry['encoders'].items():
      for key, name in SCORES:
        if key not in encoder['scores']:
          continue
        for source, cell in encoder['scores'][key]['by_source'].items():
          if cell['num_errors'] and np.isfinite(cell['auroc']):
            rows.append({'label': f"{entry['dataset'].split('/')[-1]}, {method}",
                         'score': name.split(' (')[0], 'source': source,
                         'auroc': cell['auroc'], 'interval': cell.get('auroc_interval')})
  return rows


def table_lines(results: dict[str, Any]) -> list[str]:
  """The study's Markdown tables: one per dataset, a row per encoder and score.

  Args:
    results: :func:`run_study`'s result (``results.json``).
  """
  config = results['config']
  lines = [f"Q-Score with eps = {config['eps']:g}; {config['pretrain_steps']} pre-training steps, "
           f"{config['supervised_steps']} supervised; kNN agreement k = {config['knn_k']}, "
           f"neighbourhood consistency k = {config['consistency_k']} across "
           f"{', '.join(config['methods'])}.", '']
  for entry in results['datasets']:
    cue = ('predicts the class' if entry['cue_predictive'] else 'is unrelated to the class')
    lines += [f"### {entry['dataset']}", '',
              f"The texture agrees with the label on {100 * entry['cue_agreement']:.0f}% of the "
              f"training images: it {cue}.", '']
    for method, encoder in entry['encoders'].items():
      errors = encoder['errors']
      lines.append(f"- {method}: linear top-1 {100 * encoder['top1']:.1f}%; errors: "
                   f"{errors['weak evidence']} of weak evidence, {errors['cue conflict']} of "
                   f"cue conflict ({encoder['num_correct']} correct); {encoder['num_discriminative']}"
                   f" discriminative features, Q = 0 on "
                   f"{100 * encoder['qscore_zero_fraction']:.0f}% of the test images.")
    lines += ['', '| encoder | score | AUPRC, all errors (chance) | AUPRC, weak evidence (chance) '
              '| AUPRC, cue conflict (chance) | AUROC, all | rho with evidence |',
              '|---|---|---|---|---|---|---|']
    for method, encoder in entry['encoders'].items():
      for key, name in SCORES:
        if key not in encoder['scores']:
          continue
        cells = encoder['scores'][key]
        row = [method, name]
        for source in SOURCES:
          cell = cells['by_source'][source]
          row.append(f"{_cell(cell, 'auprc_error_positive')} "
                     f"({cell['chance_auprc_error_positive']:.3f})" if cell['num_errors']
                     else '– (no errors)')
        row.append(_cell(cells['by_source']['all'], 'auroc'))
        rho = cells['spearman']['evidence']
        row.append(_estimate(rho['rho'], rho['interval']))
        lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  lines += ['AUPRC with the errors as positives, ranked by a low score first; the chance level '
            'of a source is its errors\' share of (its errors + every correct sample). '
            '[lo, hi]: 95% bootstrap intervals over the test images. Evidence = object area x '
            '(1 - occlusion) x contrast; rho > 0: the score rises with the evidence.']
  return lines


__all__ = ['SCORES', 'SOURCES', 'SUPERVISED', 'difficulty', 'error_sources', 'measure',
           'pretrain_config', 'run_name', 'run_study', 'summary_lines', 'supervised_config',
           'table_lines']

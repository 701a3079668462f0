"""The paper's central experiment, end to end with the project's own code (``qscore experiment``).

1. Pre-train an encoder from scratch with each method (no regularizer); a
   randomly initialised encoder is evaluated too, as the floor.
2. From each pre-trained checkpoint, fine-tune with the method's loss alone
   (``plain``) and with the Q-Score regularizer added (``qscore``): same steps,
   learning rate, data order and seed, for every seed.
3. Embed every model (train and test splits), train a linear probe, and measure
   linear accuracy, the AUPRC of a low Q-Score for finding the probe's mistakes,
   sparsity (Hoyer, active features, zeros) and the compression curve.
4. Aggregate over seeds (mean, sample standard deviation) and write
   ``<workdir>/results.json`` and ``<workdir>/table.md``.

Every run lives in its own workdir below ``<workdir>``; a finished run (its
``model/`` exists) is reused, an interrupted one resumes from its checkpoint,
so the command can be rerun after a crash.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from qscore_jax import analysis, compression
from qscore_jax.configs import finetune
from qscore_jax.data import dataset_info, native_preprocessing
from qscore_jax.finetune import loop
from qscore_jax.models import build_model, init_variables, load_encoder, save_model

VARIANTS = ('plain', 'qscore')


def run_config(config: ml_collections.ConfigDict, method: str, *, steps: int, seed: int,
               regularizer: str, learning_rate: float, warmup_epochs: float,
               dataset: str | None = None) -> ml_collections.ConfigDict:
  """The ``qscore finetune`` config of one run of the experiment ``config``.

  Args:
    config: an experiment config (``qscore_jax/configs/experiment.py``).
    method: the SSL method of the run (``simclr``, ``byol``, ...).
    steps: optimisation steps.
    seed: data order, augmentations and head initialisation.
    regularizer: ``'none'`` or ``'qscore'``.
    learning_rate: peak learning rate (cosine schedule).
    warmup_epochs: linear warm-up length in epochs.
    dataset: the training data (default ``config.dataset``).
  """
  c = finetune.get_config(f'method={method}')
  c.dataset = dataset or config.dataset
  c.arch = config.arch
  with c.unlocked():
    c.arch_options.width_multiplier = float(config.width_multiplier)
  c.batch_size = config.batch_size
  c.num_steps = steps
  c.seed = seed
  c.min_crop_scale = config.min_crop_scale
  c.optimizer.name = config.optimizer
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_epochs = warmup_epochs
  for key, value in config.loss.get(method, {}).items():
    c.loss[key] = value
  c.regularizer.kind = regularizer
  c.regularizer.lambda1 = config.regularizer.lambda1
  c.regularizer.lambda2 = config.regularizer.lambda2
  c.regularizer.reference_examples = config.regularizer.reference_examples
  c.checkpoint_every_steps = max(steps // 2, 1)
  c.log_every_steps = max(steps // 4, 1)
  c.progress = False
  return c


def pretrain_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """The experiment's pre-training run of ``method``: from scratch, no regularizer, seed 0,
  ``config.pretrain_steps`` steps at ``config.learning_rate`` with one warm-up epoch."""
  return run_config(config, method, steps=config.pretrain_steps, seed=0, regularizer='none',
                    learning_rate=config.learning_rate, warmup_epochs=1.0)


def train_run(config, workdir: pathlib.Path, init: str, log) -> pathlib.Path:
  """Trains (or resumes, or reuses when its ``model/`` exists) one run; returns its model.

  Args:
    config: the run's ``qscore finetune`` config.
    workdir: its workdir.
    init: ``'random'`` or a model reference.
    log: called with a progress line.
  """
  if (workdir / 'model').is_dir():
    log(f'  {workdir.name}: done earlier, reused')
    return workdir / 'model'
  start = time.perf_counter()
  result = loop.run(config, workdir, init=init)
  log(f"  {workdir.name}: {result['step']} steps in {time.perf_counter() - start:.0f} s, "
      f"last ssl_loss {result['metrics'].get('ssl_loss', float('nan')):.3f}")
  return pathlib.Path(result['model'])


def _random_encoder(config, workdir: pathlib.Path) -> pathlib.Path:
  """The architecture with random weights (seed 0), saved: what pre-training must beat."""
  if (workdir / 'model').is_dir():
    return workdir / 'model'
  options = {'width_multiplier': float(config.width_multiplier)}
  model = build_model(config.arch, **options)
  preprocessing = native_preprocessing(dataset_info(config.dataset))
  size = preprocessing.image_size
  variables = init_variables(model, jax.random.key(0), (1, size, size, 3))
  return save_model(workdir / 'model', variables, arch=config.arch, arch_options=options,
                    preprocessing=preprocessing,
                    provenance={'trained_by': 'nothing: random initialisation (seed 0)'})


def _evaluate(config, model_dir: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  """The run's metrics: the analysis pipeline on its model (read back when done earlier)."""
  analysis_config = analysis.AnalysisConfig(compression=compression.CompressionConfig(
      fractions_removed=tuple(config.compression_removed), random_seeds=(0,)))
  report = analysis.analyze_encoder(
      load_encoder(model_dir), config.eval_dataset, out, split='test', reference_split='train',
      config=analysis_config, plots=False, progress=False, analysis_dir=out,
      store_dirs={'reference': out / 'store_train', 'evaluated': out / 'store_test'}).report
  curve = {row['removed']: row for row in report['compression']}
  row = {'top1': report['probe']['top1'],
         # Misclassification detection: positives are the probe's errors, ranked by low Q.
         'auprc_q': report['misclassification']['qscore']['auprc_error_positive'],
         'auprc_chance': report['misclassification']['qscore']['chance_auprc_error_positive'],
         'mean_q': report['qscore_summary']['mean'],
         'num_discriminative': report['feature_stats']['num_discriminative'],
         'hoyer': report['sparsity']['hoyer_mean'],
         'active_features': report['sparsity']['active_features_mean'],
         'zero_fraction': report['sparsity']['zero_fraction']}
  for removed in config.compression_removed:
    row[f'top1_removed_{removed:g}'] = curve[float(removed)]['ranked']
  return row


def run_experiment(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                   log=print) -> dict[str, Any]:
  """Runs (or resumes) the whole experiment; returns ``results.json``'s content.

  Args:
    config: an experiment config (``qscore_jax/configs/experiment.py``).
    workdir: directory of every run, ``results.json`` and ``table.md``
      (created; finished runs in it are reused).
    log: called with each progress line (default ``print``).
  Returns:
    ``{'config', 'runs', 'summary', 'seconds'}``; ``summary`` is :func:`summarize`
    of ``runs``.
  """
  finetune.check_config(config)  # before anything is trained
  root = pathlib.Path(workdir).expanduser().resolve()
  root.mkdir(parents=True, exist_ok=True)
  if jax.config.jax_compilation_cache_dir is None:
    # Every fine-tuning run compiles the same step again (new trainer, same program): the
    # persistent cache turns those compilations into reads.
    jax.config.update('jax_compilation_cache_dir', str(root / 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  start = time.perf_counter()
  runs: list[dict[str, Any]] = []
  for method in config.methods:
    log(f'{method}: pre-training {config.pretrain_steps} steps from scratch')
    pretrain = train_run(pretrain_config(config, method), root / f'{method}-pretrain', 'random',
                      log)
    runs.append({'method': method, 'variant': 'pretrained', 'seed': None,
                 'metrics': _evaluate(config, pretrain, root / f'{method}-pretrain' / 'eval')})
    learning_rate = config.finetune_lr_fraction * config.learning_rate
    for seed in config.seeds:
      for variant in VARIANTS:
        name = f'{method}-{variant}-seed{seed}'
        log(f'{method}: fine-tuning {config.finetune_steps} steps, {variant}, seed {seed}')
        model = train_run(run_config(config, method, steps=config.finetune_steps, seed=seed,
                                  regularizer='qscore' if variant == 'qscore' else 'none',
                                  learning_rate=learning_rate, warmup_epochs=0.0),
                       root / name, str(pretrain), log)
        runs.append({'method': method, 'variant': variant, 'seed': seed,
                     'metrics': _evaluate(config, model, root / name / 'eval')})
  runs.append({'method': 'none', 'variant': 'random init', 'seed': None,
               'metrics': _evaluate(config, _random_encoder(config, root / 'random-init'),
                                    root / 'random-init' / 'eval')})
  results = {'config': json.loads(config.to_json()), 'runs': runs,
             'summary': summarize(runs), 'seconds': round(time.perf_counter() - start, 1)}
  (root / 'results.json').write_text(json.dumps(results, indent=2))
  (root / 'table.md').write_text('\n'.join(table_lines(results)) + '\n')
  return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
  """``{method: {variant: {metric: [mean, std over seeds, n]}}}`` (std: ddof=1, 0 if n=1).

  Args:
    runs: ``{'method', 'variant', 'seed', 'metrics': {metric: value}}`` per run.
  """
  out: dict[str, Any] = {}
  for run in runs:
    per_variant = out.setdefault(run['method'], {}).setdefault(run['variant'], {})
    for key, value in run['metrics'].items():
      per_variant.setdefault(key, []).append(value)
  for method in out.values():
    for variant, metrics in method.items():
      method[variant] = {k: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                             len(v)] for k, v in metrics.items()}
  return out


COLUMNS = (('linear top-1 %', 'top1', 100, 1), ('AUPRC of Q, error = positive', 'auprc_q', 1, 3),
           ('mean Q', 'mean_q', 1, 4), ('size of D', 'num_discriminative', 1, 1),
           ('Hoyer sparsity', 'hoyer', 1, 3), ('zeros %', 'zero_fraction', 100, 1))


def table_lines(results: dict[str, Any]) -> list[str]:
  """The Markdown table of ``results``: mean ± std over seeds per method and variant."""
  removed = results['config']['compression_removed']
  columns = list(COLUMNS) + [(f'top-1 % with {100 * r:g}% removed', f'top1_removed_{r:g}', 100, 1)
                             for r in removed]
  lines = ['| method | model | seeds | ' + ' | '.join(c[0] for c in columns) + ' |',
           '|---|---|---|' + '---|' * len(columns)]
  for method, variants in results['summary'].items():
    for variant in ('random init', 'pretrained', *VARIANTS):
      if variant not in variants:
        continue
      metrics = variants[variant]
      cells = []
      for _, key, scale, digits in columns:
        mean, std, n = metrics[key]
        cells.append(f'{scale * mean:.{digits}f}' + (f' ± {scale * std:.{digits}f}' if n > 1
                                                     else ''))
      n = metrics['top1'][2]
      lines.append(f'| {method} | {variant} | {n} | ' + ' | '.join(cells) + ' |')
  chance = np.mean([r['metrics']['auprc_chance'] for r in results['runs']])
  lines.append('')
  lines.append('AUPRC of Q, error = positive: how well a low Q-Score ranks the samples the linear '
               'probe misclassifies first; its chance level is the error rate, '
               f'{chance:.3f} on average over these models.')
  return lines


__all__ = ['pretrain_config', 'run_config', 'run_experiment', 'summarize', 'table_lines',
           'train_run']

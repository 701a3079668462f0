"""Label-free scores along training (``qscore track WORKDIR``).

A checkpoint is usually chosen by its linear accuracy, which needs labels. The
dataset-level scores of the field are meant to choose it without them: RankMe
(the effective rank of the representations), alpha-ReQ (the decay of their
eigenspectrum), LiDAR (the effective rank of the SSL task's linear discriminant
matrix, from augmented views) and, here, the mean Q-Score and the size of D. This
module computes each of them and the linear accuracy at step 0 (the initialisation)
and at every checkpoint a ``qscore finetune`` (or ``qscore experiment`` /
``qscore study`` pre-training) run saved, and reports Kendall's tau between each
score and the accuracy over the checkpoints: a score that ranks the checkpoints as
the accuracy does has tau = 1.

Each step's row is kept in ``<out>/steps/<step>.json`` with the fingerprint of the
weights and the settings that made it; a rerun recomputes only the rows whose
checkpoint or settings changed, so a run can be tracked while it trains. The
representation stores of a step are deleted once its row is written (they are
rebuilt from the checkpoint) unless ``keep_stores``.

Output (``<out>``, default ``<workdir>/track``): ``track.json`` (rows, tau, what made
them), ``track.md`` (the table) and ``track.png`` (every score and the accuracy
against the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
from scipy import stats as scipy_stats

from qscore_jax import analysis, metrics, outputs, report
from qscore_jax.data import augment, dataset_info, ssl_batches
from qscore_jax.finetune import loop
from qscore_jax.models import Encoder

TRACK_VERSION = 1
# The dataset-level scores, in table order: (key, column title, what a higher value means).
SCORES = (('rankme', 'RankMe', 'higher rank'),
          ('alpha_req', 'alpha-ReQ', 'slower spectral decay is lower'),
          ('lidar', 'LiDAR', 'higher rank of the SSL task'),
          ('mean_qscore', 'mean Q', 'higher Q-Score'),
          ('num_discriminative', 'size of D', 'more discriminative features'))


@dataclasses.dataclass(frozen=True)
class TrackConfig:
  """What ``qscore track`` measures at each checkpoint.

  Attributes:
    dataset: the data the scores and the probe use (None: the run's training dataset).
    split: the scored split, whose linear accuracy is reported (None, the default:
      ``'test'``, or ``'validation'`` for a dataset without one, as ImageNet).
    reference_split: the split that trains the probe and gives D (default ``'train'``).
    lidar_examples: examples whose views enter LiDAR (default 512).
    lidar_views: augmented views of each (default 8; the run's method's first view).
    lidar_seed: seed of those views (the same views at every checkpoint).
    batch_size: embedding batch, a multiple of the device count (default 256).
    probe_epochs: passes of the linear probe over the reference split (None: the
      analysis default).
  """
  dataset: str | None = None
  split: str | None = None
  reference_split: str = 'train'
  lidar_examples: int = 512
  lidar_views: int = 8
  lidar_seed: int = 0
  batch_size: int = 256
  probe_epochs: int | None = None

  def __post_init__(self):
    if self.lidar_examples < 2 or self.lidar_views < 2:
      raise ValueError(f'LiDAR needs at least 2 examples and 2 views each, got '
                       f'lidar_examples={self.lidar_examples}, lidar_views={self.lidar_views}.')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {self.batch_size}.')


def lidar_views(encoder: Encoder, dataset: str, split: str, *, recipe: augment.Recipe,
                num_examples: int, num_views: int, seed: int, batch_size: int,
                data_dir: str | None = None) -> np.ndarray:
  """Representations of ``num_views`` augmented views of the first examples of a split.

  Every view is drawn with ``recipe``'s first view (the method's global crop), from a
  seed that depends only on ``seed`` and the example, so that every checkpoint sees
  the same views.

  Args:
    encoder: the encoder.
    dataset: dataset name.
    split: its split.
    recipe: the training recipe (its first view spec is used for every view).
    num_examples: n, examples: the first n of the split (at most the split's size, and
      rounded down to equal batches of a multiple of the device count).
    num_views: q, views of each.
    seed: the views' seed.
    batch_size: examples embedded at once (their q views together).
    data_dir: tfds data directory.
  Returns:
    (n, q, d) float32.
  """
  views_recipe = augment.Recipe(f'{recipe.name}-lidar', (recipe.views[0],) * num_views)
  devices = jax.device_count()
  splits = dataset_info(dataset, data_dir).splits
  if split not in splits:
    raise ValueError(f'{dataset} has no split {split!r}; its splits: {", ".join(splits)}.')
  size = splits[split]
  wanted = min(num_examples, size)
  # Batches of equal size that cover `wanted` (the pipeline drops an incomplete last one).
  count = math.ceil(wanted / max(batch_size, devices))
  batch = max(devices, wanted // count // devices * devices)
  batches = ssl_batches(dataset, split, recipe=views_recipe, batch_size=batch, seed=seed,
                        preprocessing=encoder.preprocessing, image_size=recipe.views[0].size,
                        data_dir=data_dir, epochs=1, shuffle_buffer=1)
  out = []
  for item in batches:
    out.append(np.stack([np.asarray(encoder.embed(v)) for v in item['views']], axis=1))
    if sum(len(v) for v in out) >= wanted:
      break
  return np.concatenate(out)[:num_examples]


def _settings(config: TrackConfig, dataset: str) -> dict[str, Any]:
  return {**dataclasses.asdict(config), 'dataset': dataset, 'track_version': TRACK_VERSION}


def _analysis_config(config: TrackConfig) -> analysis.AnalysisConfig:
  probe = analysis.ProbeConfig() if config.probe_epochs is None else analysis.ProbeConfig(
      epochs=config.probe_epochs)
  return analysis.AnalysisConfig(probe=probe, compression=None, bootstrap_resamples=0)


def step_row(encoder: Encoder, step: int, out: pathlib.Path, config: TrackConfig, *,
             dataset: str, recipe: augment.Recipe, data_dir: str | None = None,
             keep_stores: bool = False) -> dict[str, Any]:
  """Every dataset-level score and the linear accuracy of one checkpoint's encoder.

  Args:
    encoder: the checkpoint's backbone.
    step: its step.
    out: the tracking directory (the step's analysis goes in ``<out>/step-<step>``).
    config: the :class:`TrackConfig`.
    dataset: the dataset scored.
    recipe: the run's augmentation recipe (LiDAR's views).
    data_dir: tfds data directory.
    keep_stores: keep the step's representation stores (default: deleted after).
  Returns:
    ``{'step', 'model_fingerprint', 'top1', 'rankme', 'alpha_req', 'lidar',
    'mean_qscore', 'num_discriminative'}``.
  """
  where = out / f'step-{step:09d}'
  result = analysis.analyze_encoder(
      encoder, dataset, where, split=config.split, reference_split=config.reference_split,
      config=_analysis_config(config), batch_size=config.batch_size, data_dir=data_dir,
      plots=False, progress=False)
  rep = result.report
  views = lidar_views(encoder, dataset, config.split, recipe=recipe,
                      num_examples=config.lidar_examples, num_views=config.lidar_views,
                      seed=config.lidar_seed, batch_size=config.batch_size, data_dir=data_dir)
  row = {'step': int(step), 'model_fingerprint': encoder.fingerprint,
         'top1': rep['probe']['top1'],
         'rankme': rep['dataset_level']['rankme'],
         'alpha_req': rep['dataset_level']['alpha_req'],
         'lidar': metrics.lidar(views), 'lidar_examples_used': int(len(views)),
         'mean_qscore': rep['qscore_summary']['mean'],
         'num_discriminative': rep['feature_stats']['num_discriminative']}
  if not keep_stores:
    for store in result.stores.values():
      if (outputs.read_marker(store) or {}).get('kind') == 'store':  # only what we wrote
        shutil.rmtree(store)
  return row


def kendall(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
  """Kendall's tau-b (and its two-sided p-value) between each score and ``top1``.

  Args:
    rows: one dict per checkpoint with ``top1`` and every key of :data:`SCORES`.
  Returns:
    ``{score: {'tau', 'p_value', 'n'}}``; tau and p None with fewer than 3 finite
    pairs or a constant column.
  """
  out = {}
  accuracy = np.array([r['top1'] for r in rows], np.float64)
  for key, _, _ in SCORES:
    values = np.array([r[key] for r in rows], np.float64)
    finite = np.isfinite(values) & np.isfinite(accuracy)
    tau = p_value = None
    if finite.sum() >= 3 and np.ptp(values[finite]) > 0 and np.ptp(accuracy[finite]) > 0:
      result = scipy_stats.kendalltau(values[finite], accuracy[finite])
      tau, p_value = float(result.statistic), float(result.pvalue)
    out[key] = {'tau': tau, 'p_value': p_value, 'n': int(finite.sum())}
  return out


def table_lines(result: dict[str, Any]) -> list[str]:
  """The Markdown table of a tracking result: one row per step, then tau per score.

  Args:
    result: :func:`track`'s result (``track.json``).
  """
  titles = [title for _, title, _ in SCORES]
  lines = ['| step | linear top-1 % | ' + ' | '.join(titles) + ' |',
           '|---|---|' + '---|' * len(titles)]
  for row in result['rows']:
    cells = [f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key])
             for key, _, _ in SCORES]
    lines.append(f"| {row['step']} | {100 * row['top1']:.1f} | " + ' | '.join(cells) + ' |')
  taus = result['kendall']
  lines.append('| Kendall tau with top-1 | | ' + ' | '.join(
      '–' if taus[key]['tau'] is None else f"{taus[key]['tau']:+.2f}" for key, _, _ in SCORES)
               + ' |')
  lines += ['', f"{result['workdir']}: {result['method']} on {result['dataset']}, scored on "
            f"{result['settings']['split']} (probe and D from "
            f"{result['settings']['reference_split']}); LiDAR from "
            f"{result['settings']['lidar_views']} views of "
            f"{min(r['lidar_examples_used'] for r in result['rows'])} examples. Step 0 is the initialisation ({result['init']}). tau over "
            f"{len(result['rows'])} checkpoints; with so few, |tau| < 1 is weak evidence."]
  return lines


def track(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None, *,
          config: TrackConfig = TrackConfig(), data_dir: str | None = None,
          keep_stores: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Computes (or reads back) every checkpoint's row, then tau, the table and the plot.

  Args:
    workdir: a local ``qscore finetune`` workdir (also a pre-training run of
      ``qscore experiment`` or ``qscore study``).
    out: output directory (default ``<workdir>/track``; new, or one ``qscore track``
      wrote).
    config: the :class:`TrackConfig`.
    data_dir: tfds data directory.
    keep_stores: keep every step's representation stores.
    log: called with each progress line.
  Returns:
    ``track.json``'s content: ``{'rows', 'kendall', 'workdir', 'method', 'dataset',
    'init', 'settings', 'skipped'}``.
  Raises:
    TrainingError: ``workdir`` is not a fine-tuning workdir, or holds no checkpoint.
    qscore_jax.outputs.OutputError: ``out`` holds something else.
  """
  source = pathlib.Path(workdir).expanduser().resolve()
  target = pathlib.Path(out).expanduser().resolve() if out else source / 'track'
  outputs.check_output(target, 'track')  # before the run is rebuilt
  previous = target / 'track.json'
  if previous.is_file():
    recorded_workdir = json.loads(previous.read_text()).get('workdir')
    if recorded_workdir != str(source):
      raise outputs.OutputError(f'{target} holds the tracking of another run ({recorded_workdir}); '
                                f'give another --out for {source}.')
  saved_run = loop.saved_states(source)
  built, restorers, run_config = saved_run.setup, saved_run.restorers, saved_run.config
  if not restorers:
    raise loop.TrainingError(f'{source} holds no checkpoint yet: there is nothing to track. '
                             'Run qscore finetune in it first (or wait for its first '
                             'checkpoint).')
  outputs.prepare_output(target, 'track')
  dataset = config.dataset or run_config.dataset
  if config.split is None:
    splits = dataset_info(dataset, data_dir).splits
    config = dataclasses.replace(config, split='test' if 'test' in splits or
                                 'validation' not in splits else 'validation')
  settings = _settings(config, dataset)
  recipe = augment.recipe(built.trainer.method.augmentation, image_size=built.image_size,
                          min_crop_scale=run_config.min_crop_scale)
  steps_dir = target / 'steps'
  steps_dir.mkdir(exist_ok=True)
  rows, skipped = [], []
  states = {0: lambda: built.state, **restorers}
  for step, restore in states.items():
    try:
      state = restore()
    # orbax and TensorStore raise many kinds of error on damaged or missing files.
    except Exception as error:  # pylint: disable=broad-except
      skipped.append({'step': step, 'reason': f'{type(error).__name__}: {error}'[:300]})
      log(f'  step {step}: cannot be restored, skipped ({skipped[-1]["reason"][:120]})')
      continue
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    encoder = Encoder.from_variables(
        built.trainer.backbone,
        {'params': params['backbone'], 'batch_stats': batch_stats['backbone']},
        arch=built.arch, arch_options=built.arch_options, method=run_config.method,
        preprocessing=built.preprocessing, name=f'{source.name} step {step}')
    saved = steps_dir / f'{step}.json'
    if saved.is_file():
      previous = json.loads(saved.read_text())
      if previous.get('settings') == settings and (
          previous['row']['model_fingerprint'] == encoder.fingerprint):
        rows.append(previous['row'])
        log(f'  step {step}: read back')
        continue
    row = step_row(encoder, step, target, config, dataset=dataset, recipe=recipe,
                   data_dir=data_dir, keep_stores=keep_stores)
    outputs.write_json_atomic(saved, {'settings': settings, 'row': row})
    rows.append(row)
    log(f"  step {step}: top-1 {100 * row['top1']:.1f}%, RankMe {row['rankme']:.2f}, "
        f"LiDAR {row['lidar']:.2f}, mean Q {row['mean_qscore']:.3f}")
  kept = {r['step'] for r in rows}
  for path in steps_dir.glob('*.json'):  # steps whose checkpoint is gone (pruned by the run)
    if path.stem.isdigit() and int(path.stem) not in kept:
      path.unlink()
      analysis_of_step = target / f'step-{int(path.stem):09d}'
      if analysis_of_step.is_dir():
        shutil.rmtree(analysis_of_step)
  result = {'track_version': TRACK_VERSION, 'workdir': str(source), 'method': run_config.method,
            'dataset': dataset, 'init': saved_run.provenance['init'], 'settings': settings,
            'rows': rows,
            'kendall': kendall(rows), 'skipped': skipped}
  report.write_json(result, target / 'track.json')
  (target / 'track.md').write_text('\n'.join(table_lines(result)) + '\n')
  report.plot_tracking(rows, [(key, title) for key, title, _ in SCORES], result['kendall'],
                       target / 'track.png',
                       title=f"{result['method']} on {dataset}: {source.name}")
  return result


__all__ = ['SCORES', 'TrackConfig', 'kendall', 'lidar_views', 'step_row', 'table_lines', 'track']

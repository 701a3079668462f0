"""The training loop: config -> trainer -> steps, checkpoints, logs, resume.

:func:`run` is ``qscore finetune``. A workdir holds (:mod:`~qscore_jax.finetune.workdir`
owns these files)::

    run.json             the config, init (and its weights' fingerprint) and dataset version
                         it was started with: a resumed run must match them
    checkpoints/<step>/  orbax CheckpointManager: the whole TrainState, the last k kept
    best/<step>/         the checkpoint with the lowest ``best_metric`` so far
    damaged/             checkpoints that could not be restored, set aside on resume
    metrics.jsonl        one JSON line per logged step (every loss term, Q, lr, img/s)
    tensorboard/         the same scalars for TensorBoard
    model/               the final backbone + heads (save_model): `qscore embed`/`compare` it

Killed at any point and run again with the same command, training resumes from
the newest intact checkpoint: the state (parameters, optimizer, EMA target, D, step),
the data order and augmentations (a pure function of seed and step) and the
schedule continue exactly, so the parameters after the last step are
bit-identical to an uninterrupted run's (tested), and the logs are cut back to the
restored step, so each step is logged once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qscore_jax import outputs, parallel, regularizer, remote, stats
from qscore_jax.configs.finetune import check_config, get_config
from qscore_jax.data import augment, dataset_info, eval_batches, native_preprocessing, ssl_batches
from qscore_jax.data.preprocessing import Preprocessing
from qscore_jax.embed import make_embed_step
from qscore_jax.finetune import core, workdir as files
from qscore_jax.finetune.methods import get_method
from qscore_jax.finetune.workdir import TrainingError
from qscore_jax.models import (Encoder, VisionTransformer, build_model, init_variables,
                               load_encoder, load_heads, precision, save_model)

# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ('progress', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                    'export_model')
# Fields run.json records resolved, in the provenance, not as configured ('auto' means
# another dtype on another backend): config.dtype is compared as compute_dtype.
RESOLVED_FIELDS = ('dtype',)


@dataclasses.dataclass
class Setup:
  """Everything :func:`run` builds from a config before the first step.

  Attributes:
    trainer: the static parts (:class:`~qscore_jax.finetune.core.Trainer`).
    state: the initial :class:`~qscore_jax.finetune.core.TrainState` (host arrays).
    preprocessing: the init model's preprocessing, or the dataset's native one.
    image_size: input side of the training views.
    arch: the backbone architecture.
    arch_options: its options.
    steps_per_epoch: global batches per epoch of the training split.
    init: the ``init`` the run was started from.
    init_fingerprint: the content fingerprint of the init weights (None from scratch).
  """
  trainer: core.Trainer
  state: core.TrainState
  preprocessing: Any
  image_size: int
  arch: str
  arch_options: dict[str, Any]
  steps_per_epoch: int
  init: str
  init_fingerprint: str | None = None


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def _init_model(config, init: str, key, encoder: Encoder | None = None):
  """(model, backbone variables, heads {name: variables}, metadata, weights' fingerprint)
  of the initialisation (``encoder``: ``init`` already loaded)."""
  dtype = compute_dtype(config)
  if init == 'random':
    arch = config.arch or 'resnet18'
    options = dict(config.arch_options)
    model = build_model(arch, dtype=precision.as_jnp(dtype), **options)
    return model, None, {}, {'arch': arch, 'arch_options': options}, None
  encoder = encoder or load_encoder(init, dtype=dtype)
  if encoder.compute_dtype != dtype:
    raise ValueError(f'--init was loaded computing in {encoder.compute_dtype}, the config asks '
                     f'for {dtype}: load it with load_encoder(init, dtype={dtype!r}).')
  path, model, variables, meta = (encoder.directory, encoder.module, encoder.variables,
                                  encoder.metadata)
  if config.arch and config.arch != meta['arch']:
    raise ValueError(f'--init {init} is a {meta["arch"]} but the config asks for '
                     f'{config.arch}: drop arch from the config or use an init of that '
                     'architecture.')
  wanted = dict(config.arch_options)
  stored = dict(meta.get('arch_options') or {})
  clash = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
  if clash:
    raise ValueError(f'--init {init} was built with other architecture options '
                     f'(init vs config: {clash}); drop them from the config.')
  heads = {name: variables_ for name, (_, variables_) in load_heads(path).items()}
  return (model, jax.device_get(variables), jax.device_get(heads), meta,
          encoder.fingerprint)


def compute_dtype(config: ml_collections.ConfigDict) -> str:
  """The dtype the run's backbone computes in, resolved (``config.dtype`` 'auto' -> per backend).

  Args:
    config: the run's config.
  """
  return precision.resolve(config.get('dtype', 'auto'))


def _head_options(config, model) -> dict[str, Any]:
  """The config's head overrides, plus whether the backbone is a ViT (MoCo v3's heads
  differ for ViTs)."""
  return {**{k: v for k, v in dict(config.heads).items() if v is not None},
          'vit': isinstance(model, VisionTransformer)}


def _compatible_heads(trainer, heads, dim):
  """The init's heads whose shapes fit the method's head specs (others are built fresh)."""
  out = {}
  for name, spec in trainer.heads:
    if name not in heads:
      continue
    shapes = jax.eval_shape(spec.build().init, jax.random.key(0),
                            jnp.zeros((2, core.head_input_dim(trainer, name, dim))))
    expected = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
    given = {'params': heads[name]['params'], 'batch_stats': heads[name].get('batch_stats', {})}
    if jax.tree.map(np.shape, expected) == jax.tree.map(np.shape, given):
      out[name] = given
  return out


def _recipe(config: ml_collections.ConfigDict, name: str, image_size: int):
  """The method's augmentation recipe at ``image_size``, with the config's crop override."""
  return augment.recipe(name, image_size=image_size, min_crop_scale=config.min_crop_scale)


def setup(config: ml_collections.ConfigDict, init: str = 'random', *,
          encoder: Encoder | None = None) -> Setup:
  """Builds the trainer and the initial state (D included) from a config.

  Args:
    config: see :mod:`qscore_jax.configs.finetune`.
    init: ``'random'`` (from scratch, default) or anything
      :func:`~qscore_jax.models.encoder.load_encoder` accepts (a saved model
      directory, a finetune workdir, a converted registry id, a shipped model id).
    encoder: ``init`` already loaded (so that it is restored once).
  """
  method = get_method(config.method)
  parallel.check_batch_divisible(config.batch_size)
  key = jax.random.key(config.seed)
  model, backbone_vars, init_heads, meta, fingerprint = _init_model(config, init, key, encoder)
  info = dataset_info(config.dataset, config.data_dir)
  preprocessing = (Preprocessing.from_json(meta['preprocessing']) if meta.get('preprocessing')
                   else native_preprocessing(info))
  image_size = config.image_size or preprocessing.image_size
  if backbone_vars is None:
    backbone_vars = jax.device_get(init_variables(model, key, (1, image_size, image_size, 3)))

  steps_per_epoch = ssl_batches(config.dataset, config.split,
                                recipe=_recipe(config, method.augmentation, image_size),
                                batch_size=config.batch_size, image_size=image_size,
                                preprocessing=preprocessing,
                                data_dir=config.data_dir).num_batches
  total = config.num_steps if config.num_steps > 0 else max(
      1, math.ceil(config.num_epochs * steps_per_epoch))
  recipe = method.optimizer
  opt = config.optimizer
  learning_rate = opt.learning_rate if opt.learning_rate is not None else (
      (opt.base_learning_rate or recipe.base_learning_rate) * config.batch_size / 256)
  tx, schedule = core.make_optimizer(
      opt.name or recipe.name, learning_rate,
      weight_decay=recipe.weight_decay if opt.weight_decay is None else opt.weight_decay,
      momentum=opt.momentum, total_steps=total,
      warmup_steps=round(opt.warmup_epochs * steps_per_epoch), schedule=opt.schedule)
  loss_options = dict(method.loss_defaults)
  loss_options.update({k: v for k, v in dict(config.loss).items()
                       if v is not None and k in loss_options})
  unused = [k for k, v in dict(config.loss).items() if v is not None and k not in loss_options]
  if unused:
    raise ValueError(f'loss options {unused} do not apply to {method.name} (its options: '
                     f'{sorted(method.loss_defaults) or "none"}).')
  reg_fields = {f.name for f in dataclasses.fields(regularizer.RegularizerConfig)}
  reg = regularizer.RegularizerConfig(**{
      k: (tuple(float(x) for x in v) if k == 'band' else v)
      for k, v in dict(config.regularizer).items() if k in reg_fields})
  dim = model.num_features
  heads = method.build_heads(dim, _head_options(config, model))
  trainer = core.Trainer(model, heads, method, tuple(sorted(loss_options.items())), tx,
                         schedule, reg, total,
                         config.ema_base if config.ema_base is not None else method.ema_base)
  kept = _compatible_heads(trainer, init_heads, dim)
  head_vars = core.init_heads(trainer, jax.random.fold_in(key, 1), dim, kept)
  discriminative = None
  if reg.needs_fixed_discriminative:
    discriminative = reference_discriminative(
        model, backbone_vars, config.dataset, config.split, preprocessing=preprocessing,
        image_size=image_size, examples=config.regularizer.reference_examples,
        batch_size=config.batch_size, eps=reg.eps, band=reg.band, data_dir=config.data_dir)
  state = core.create_state(trainer, backbone_vars, head_vars, discriminative,
                            key=jax.random.fold_in(key, 2))
  return Setup(trainer, state, preprocessing, image_size, meta['arch'],
               dict(meta.get('arch_options') or {}), steps_per_epoch, init, fingerprint)


def reference_discriminative(model, variables, dataset: str, split: str, *, preprocessing,
                             image_size: int, examples: int, batch_size: int,
                             eps: float = stats.DEFAULT_EPS,
                             band=stats.DEFAULT_BAND, data_dir=None) -> np.ndarray:
  """D of ``model`` on the first ``examples`` examples of a split (eval preprocessing).

  Counts are summed over processes, so every process gets the same D. bool (d,).
  Whole global batches are embedded, so up to one batch more than ``examples``
  may be counted.

  Args:
    model: the backbone.
    variables: its ``{'params', 'batch_stats'}``.
    dataset: dataset name.
    split: the split read in canonical order.
    preprocessing: the evaluation preprocessing.
    image_size: input side.
    examples: examples to count (at least).
    batch_size: global embedding batch.
    eps: highly-active threshold in per-sample stds (default 4).
    band: percentiles delimiting D (default 50, 95).
    data_dir: tfds data directory (default: the usual one).
  """
  mesh = parallel.data_mesh()
  step = make_embed_step(model, mesh)
  replicated = jax.device_put(jax.device_get(variables), NamedSharding(mesh, PartitionSpec()))
  counts = np.zeros(model.num_features, np.int64)
  seen = 0
  for batch in eval_batches(dataset, split, batch_size=batch_size, preprocessing=preprocessing,
                            image_size=image_size, data_dir=data_dir):
    images = parallel.global_batch({'image': batch['image']}, mesh)['image']
    h = parallel.local_rows(step(replicated, images))
    counts += np.asarray(stats.activation_counts(h, eps, batch['mask']), np.int64)
    seen += int(batch['mask'].sum()) * jax.process_count()
    if seen >= examples:
      break
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return np.asarray(stats.discriminative_features(counts, band))


# --- the workdir ---------------------------------------------------------------------------

def _check_workdir(workdir: pathlib.Path, config, provenance: dict[str, Any]) -> list[str]:
  """Checks (or records) in ``run.json`` that the workdir belongs to this run.

  ``provenance``: ``{'init', 'init_fingerprint', 'compute_dtype', 'dataset_version',
  'checkpoint_digest'}`` of the run. Returns the fields an older qscore_jax did not record
  (:func:`~qscore_jax.finetune.workdir.check_run`). The config's ``dtype`` is compared
  resolved, as ``compute_dtype`` ('auto' means another dtype on another backend)."""
  # Never train into (and let orbax prune checkpoints of) a directory this tool did not make.
  outputs.prepare_output(workdir, 'finetune', option='--workdir', write=jax.process_index() == 0)
  return files.check_run(workdir, {
      'config': {k: v for k, v in _plain(config).items()
                 if k not in RESUMABLE_FIELDS + RESOLVED_FIELDS},
      **provenance})


# --- the loop ------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        init: str = 'random', stop_after: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run of ``config`` in ``workdir``.

  Args:
    config: see :mod:`qscore_jax.configs.finetune`.
    workdir: where checkpoints, logs and the final model go (absolute or relative), or a
      URL (``gs://...``: worked on in a local copy, pushed after every checkpoint and at the
      end, one process only; :mod:`qscore_jax.remote`).
    init: ``'random'`` (pre-training from scratch), or a saved model directory, a
      finetune workdir, a converted registry id or a shipped model id
      (:func:`~qscore_jax.models.encoder.load_encoder`).
    stop_after: stop after this step even if the run is not finished (for tests and
      time-boxed jobs; the run resumes later from the checkpoint written then).
  Returns:
    ``{'step', 'metrics' (last logged), 'model' (exported directory or None)}``.
  Raises:
    TrainingError: a NaN/inf loss (the step is named; earlier checkpoints are kept),
      a workdir of another run (config, init weights or dataset version), or
      checkpoints none of which can be restored (a damaged newest one is set aside
      with a warning and the newest intact one is used).
    qscore_jax.outputs.OutputError: ``workdir`` holds files qscore_jax did not write.
  """
  get_method(config.method)  # fail fast on an unknown method
  check_config(config)  # and on a field out of range (before a bucket is touched)
  if remote.is_url(workdir):
    with remote.WorkingCopy(str(workdir)) as copy:
      return _run(config, copy.path, init=init, stop_after=stop_after,
                  after_checkpoint=copy.push)
  return _run(config, pathlib.Path(workdir).expanduser().resolve(), init=init,
              stop_after=stop_after)


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, init: str,
         stop_after: int | None, after_checkpoint: Callable[[], Any] | None = None
         ) -> dict[str, Any]:
  """:func:`run` in a local ``workdir``; ``after_checkpoint`` is called once each
  checkpoint is on disk (a URL workdir's push)."""
  dtype = compute_dtype(config)
  encoder = None if init == 'random' else load_encoder(init, dtype=dtype)
  # compute_dtype resolved: 'auto' resumed on another backend would compute otherwise.
  provenance = {'init': init, 'init_fingerprint': encoder.fingerprint if encoder else None,
                'compute_dtype': dtype,
                'dataset_version': dataset_info(config.dataset, config.data_dir).version,
                'checkpoint_digest': 'xxh3_128'}
  older = _check_workdir(workdir, config, provenance)
  held = files.lock(workdir)
  try:
    return _train(config, workdir, setup(config, init, encoder=encoder), stop_after,
                  require_integrity='checkpoint_digest' not in older,
                  after_checkpoint=after_checkpoint)
  finally:
    if held:
      held.release()


def _train(config, workdir: pathlib.Path, built: Setup, stop_after: int | None, *,
           require_integrity: bool, after_checkpoint: Callable[[], Any] | None = None
           ) -> dict[str, Any]:
  """:func:`run` in a checked, locked workdir."""
  trainer = built.trainer
  mesh = parallel.data_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  state = jax.device_put(built.state, replicated)
  periodic, best = files.managers(workdir, keep=config.keep_checkpoints,
                                  best_metric=config.best_metric)
  try:
    state, _ = files.restore_newest_intact(workdir, state, periodic, best,
                                           require_integrity=require_integrity)
  except BaseException:
    periodic.close()
    best.close()
    raise
  start = int(state.step)
  files.truncate_logs(workdir, start)  # the steps after the checkpoint are logged again
  total = trainer.total_steps
  end = min(total, stop_after) if stop_after is not None else total
  batches = ssl_batches(config.dataset, config.split,
                        recipe=_recipe(config, trainer.method.augmentation, built.image_size),
                        batch_size=config.batch_size, seed=config.seed,
                        preprocessing=built.preprocessing, image_size=built.image_size,
                        data_dir=config.data_dir, start_step=start)
  step_fn = trainer.jit_step(mesh)
  logger = files.Logger(workdir)
  bar = tqdm(total=total, initial=start, unit='step', desc=f'{config.method}',
             disable=not config.progress or jax.process_index() != 0)
  window: list[dict[str, float]] = []
  since_checkpoint: list[float] = []
  last = files.last_logged(workdir, start)  # what a run resumed at its end returns
  clock, images = time.perf_counter(), 0

  def finish(done: int, device_metrics) -> None:
    """Reads step ``done``'s metrics (waiting for that step only), checks and logs them."""
    nonlocal last, window, clock, images, since_checkpoint
    metrics = read_metrics(device_metrics)
    if not metrics.pop('finite'):
      kept = periodic.latest_step()
      where = (f'The last good checkpoint is step {kept} in {workdir / "checkpoints"}; '
               if kept is not None else 'No checkpoint was written yet; ')
      raise TrainingError(
          f'the loss is {metrics["loss"]} at step {done} (ssl {metrics["ssl_loss"]}, '
          f'regularizer {metrics["regularizer"]}); training stopped. {where}lower the '
          'learning rate or the regularizer weights, then run again.')
    images += config.batch_size
    window.append(metrics)
    since_checkpoint.append(metrics.get(config.best_metric, metrics['loss']))
    bar.update(1)
    if done % config.log_every_steps == 0 or done == end:
      elapsed = time.perf_counter() - clock
      last = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      last.update(images_per_second=images / max(elapsed, 1e-9), epoch=done / built.steps_per_epoch)
      logger.write(done, last)
      bar.set_postfix(loss=f'{last["loss"]:.4f}', q=f'{last["qscore_mean"]:.3f}')
      window, clock, images = [], time.perf_counter(), 0

  refresh = trainer.regularizer.refresh_every if trainer.regularizer.needs_fixed_discriminative \
      else 0
  try:
    # Step k+1 is dispatched before step k's metrics are read, and two batches wait on the
    # devices: the host prepares the next batch while the devices run, and never waits for
    # a step it has not queued a successor to. A non-finite loss therefore stops the run one
    # step later than it happens; no checkpoint is written before its step's metrics are read.
    inputs = parallel.prefetch(
        itertools.islice(batches, end - start),
        lambda batch: parallel.global_batch({'views': batch['views']}, mesh)['views'])
    pending = None  # (step, its metrics on the devices), not read yet
    for step, (_, views) in zip(range(start, end), inputs):
      state, metrics = step_fn(state, views)
      if pending is not None:
        finish(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      refreshing = refresh and done % refresh == 0
      saving = done % config.checkpoint_every_steps == 0 or done == end
      if refreshing or saving:  # only a known-finite state is used or saved
        finish(*pending)
        pending = None
      if refreshing:
        state = state.replace(discriminative=jax.device_put(
            _current_discriminative(built, state, config), replicated))
      if saving:
        files.save(periodic, state, done)
        files.save(best, state, done, {config.best_metric: float(np.mean(since_checkpoint))})
        since_checkpoint = []
        if after_checkpoint is not None:
          periodic.wait_until_finished()
          best.wait_until_finished()
          after_checkpoint()
    if pending is not None:
      finish(*pending)
  finally:
    bar.close()
    periodic.wait_until_finished()
    best.wait_until_finished()
    periodic.close()
    best.close()
    logger.close()
  exported = None
  if int(state.step) == total and config.export_model:
    exported = export_model(built, state, workdir / 'model', config)
  return {'step': int(state.step), 'metrics': last, 'model': exported}


def run_config_of(workdir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The config and provenance a workdir's ``run.json`` records (what :func:`run` started with).

  The config is the default of its method with every recorded field set; the fields
  ``run.json`` leaves out (:data:`RESUMABLE_FIELDS`) keep their defaults, and ``dtype`` is
  the recorded ``compute_dtype``.

  Args:
    workdir: a ``qscore finetune`` workdir (local).
  Returns:
    ``(config, provenance)``, provenance the rest of ``run.json`` (``init``,
    ``init_fingerprint``, ``compute_dtype``, ``dataset_version``, ...).
  Raises:
    TrainingError: there is no readable ``run.json`` (not a workdir of ``qscore finetune``).
  """
  run_file = pathlib.Path(workdir) / files.RUN_FILE
  try:
    recorded = json.loads(run_file.read_text())
  except (OSError, ValueError) as error:
    raise TrainingError(f'{workdir} is not a readable qscore finetune workdir: {run_file} '
                        f'cannot be read ({error}). Give the --workdir of a qscore finetune '
                        'or pre-training run.') from None
  recorded = {**files.LEGACY_RUN_FIELDS, **recorded}
  fields = recorded.pop('config')
  config = get_config(f"method={fields['method']}")

  def assign(target, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(target.get(key), ml_collections.ConfigDict):
        with target[key].unlocked():
          assign(target[key], value)
      else:
        with target.unlocked():
          target[key] = tuple(value) if isinstance(value, list) else value

  assign(config, fields)
  config.dtype = recorded['compute_dtype']
  return config, recorded


@dataclasses.dataclass
class SavedRun:
  """A workdir's run as :func:`saved_states` rebuilds it.

  Attributes:
    config: the run's config (:func:`run_config_of`).
    provenance: the rest of its ``run.json`` (``init``, fingerprints, dataset version).
    setup: :func:`setup` of the config; ``setup.state`` is step 0 (the initialisation).
    restorers: ``{step: restore()}`` of every saved checkpoint, in step order.
  """
  config: ml_collections.ConfigDict
  provenance: dict[str, Any]
  setup: Setup
  restorers: dict[int, Callable[[], core.TrainState]]


def saved_states(workdir: str | pathlib.Path, *, encoder: Encoder | None = None) -> SavedRun:
  """A workdir's run rebuilt (:func:`setup` of its ``run.json``) and its checkpoints.

  Nothing in the workdir is changed: checkpoints are opened read-only, a damaged one
  raises when it is restored (it is not moved, unlike a resume).

  Args:
    workdir: a local ``qscore finetune`` workdir.
    encoder: the run's ``init`` already loaded (default: loaded from ``run.json``'s
      reference when the run did not start from scratch).
  Returns:
    The :class:`SavedRun`; each ``restore()`` returns the state of a saved step (its
    periodic copy, else its copy in ``best/``; raises
    :class:`~qscore_jax.finetune.workdir.DamagedCheckpoint` or orbax's error when no
    copy restores).
  Raises:
    TrainingError: no ``run.json``.
    FileNotFoundError: the run's ``init`` model cannot be loaded any more.
  """
  directory = pathlib.Path(workdir).expanduser().resolve()
  config, recorded = run_config_of(directory)
  try:
    built = setup(config, recorded['init'], encoder=encoder)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"{directory} was started from {recorded['init']}, which is needed "
                            f'to rebuild its state and cannot be loaded: {error}') from None
  require_integrity = 'checkpoint_digest' in recorded
  copies: dict[int, list[Callable[[], core.TrainState]]] = {}
  for name in (files.CHECKPOINTS_DIR, files.BEST_DIR):  # the periodic copy first
    if not (directory / name).is_dir():
      continue
    manager = files.read_only_manager(directory / name)
    for step in manager.all_steps():
      copies.setdefault(int(step), []).append(functools.partial(
          files.restore, manager, built.state, step, require_integrity=require_integrity))
  restorers = {step: functools.partial(files.restore_any, attempts)
               for step, attempts in copies.items()}
  return SavedRun(config, recorded, built, dict(sorted(restorers.items())))


def read_metrics(metrics) -> dict[str, float]:
  """A step's metrics as Python floats (this waits until that step has run).

  Args:
    metrics: the ``{name: scalar array}`` a train step returned.
  """
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _current_discriminative(built: Setup, state: core.TrainState, config) -> np.ndarray:
  """D recomputed with the current backbone (``regularizer.refresh_every``)."""
  variables = jax.device_get({'params': state.params['backbone'],
                              'batch_stats': state.batch_stats['backbone']})
  reg = built.trainer.regularizer
  return reference_discriminative(
      built.trainer.backbone, variables, config.dataset, config.split,
      preprocessing=built.preprocessing, image_size=built.image_size,
      examples=config.regularizer.reference_examples, batch_size=config.batch_size,
      eps=reg.eps, band=reg.band, data_dir=config.data_dir)


def export_model(built: Setup, state: core.TrainState, directory: pathlib.Path,
                 config: ml_collections.ConfigDict) -> pathlib.Path:
  """Saves the backbone and heads of a state like a converted model (``qscore embed``-able).

  Args:
    built: the run's :class:`Setup` (architecture, preprocessing, head specs).
    state: the train state whose online parameters are saved.
    directory: the model directory (replaced if it exists).
    config: the run's config (method, and recorded in the provenance).
  Returns:
    The absolute directory.
  """
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  heads = {name: (spec, {'params': params[name], **({'batch_stats': batch_stats[name]}
                                                     if batch_stats.get(name) else {})})
           for name, spec in built.trainer.heads}
  return save_model(
      directory, {'params': params['backbone'], 'batch_stats': batch_stats['backbone']},
      arch=built.arch, arch_options=built.arch_options, method=config.method,
      preprocessing=built.preprocessing, heads=heads,
      provenance={'trained_by': 'qscore finetune', 'init': built.init,
                  'init_fingerprint': built.init_fingerprint, 'steps': int(state.step),
                  'config': _plain(config)},
      overwrite=True)


__all__ = ['RESUMABLE_FIELDS', 'Setup', 'TrainingError', 'compute_dtype', 'export_model', 'read_metrics',
           'reference_discriminative', 'run', 'run_config_of', 'saved_states', 'SavedRun', 'setup']

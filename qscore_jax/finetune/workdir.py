"""A fine-tuning workdir: what started the run, checkpoints that fail over, logs that match them.

:mod:`~qscore_jax.finetune.loop` trains; this module owns the files it leaves::

    run.json             what determines the run: its config (less the fields that may change
                         on resume), the init reference, the init weights' content
                         fingerprint and the dataset's version. A resumed run must match it.
    checkpoints/<step>/  orbax: the whole TrainState, plus ``integrity`` (a hash of the state's
                         arrays, written with them) because orbax restores flipped bytes silently
    best/<step>/         the same, for the checkpoint with the lowest ``best_metric``
    damaged/             checkpoints that could not be restored, moved here (never deleted)
    metrics.jsonl        one JSON line per logged step
    tensorboard/         the same scalars for TensorBoard
    lock                 held by the running process 0 (a second run gets "in use by pid ...")

On resume, :func:`restore_newest_intact` tries the checkpoints newest first. One that
cannot be restored, or whose arrays do not match their hash, is reported in one
paragraph and moved to ``damaged/`` once an older one has restored (if none restores,
nothing is moved and the run stops with every reason). :func:`truncate_logs` then cuts
``metrics.jsonl`` and the TensorBoard events back to the restored step, so that every
step appears once in them, and drops a line or record that a kill left half-written.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import pathlib
import shutil
import sys
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from jax.experimental import multihost_utils

from qscore_jax import outputs

RUN_FILE = 'run.json'
# Fields of run.json an older qscore_jax did not write, and what they were then.
LEGACY_RUN_FIELDS = {'compute_dtype': 'float32'}
LOCK_FILE = 'lock'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
DAMAGED_DIR = 'damaged'
CHECKPOINTS_DIR = 'checkpoints'  # the periodic checkpoints, the last `keep_checkpoints`
BEST_DIR = 'best'  # the one with the lowest `best_metric`
# The item saved beside the state in every checkpoint: {'state_digest': ..., 'step': ...}.
INTEGRITY_ITEM = 'integrity'


class TrainingError(RuntimeError):
  """Training cannot go on (diverged, a workdir of another run, no checkpoint restores)."""


# --- run.json ------------------------------------------------------------------------------

def check_run(workdir: pathlib.Path, current: Mapping[str, Any]) -> list[str]:
  """Writes ``run.json``, or checks that the workdir was started by the same run.

  Args:
    workdir: the run's directory (already checked to be a finetune output).
    current: ``{'config': fields that may not change, 'init': reference,
      'init_fingerprint': content hash of the init weights (None from scratch),
      'dataset_version': ...}``.
  Returns:
    The fields of ``current`` that an older qscore_jax did not record in the workdir
    (not checked; the file is left as it is).
  Raises:
    TrainingError: naming every field that differs, and the two ways out.
  """
  run_file = workdir / RUN_FILE
  current = json.loads(json.dumps(dict(current)))  # tuples as lists, as read back
  if run_file.exists():
    try:
      previous = json.loads(run_file.read_text())
    except (OSError, ValueError) as error:
      raise TrainingError(f'{run_file} cannot be read ({error}): it records what started this '
                          'run, so the run cannot be resumed safely. Use a new --workdir.'
                          ) from None
    # A workdir of an older qscore_jax lacks the fingerprints: the rest is checked, and the
    # file stays as it is (its checkpoints carry no hash either).
    previous = {**LEGACY_RUN_FIELDS, **previous}
    missing = [key for key in current if key not in previous]
    diff = _differences(previous, {k: v for k, v in current.items() if k not in missing})
    if diff:
      raise TrainingError(
          f'{workdir} holds a run of another config, init or data ({"; ".join(diff[:8])}). '
          'Use a new --workdir, or the same config, --init and dataset to resume.')
    if missing and jax.process_index() == 0:
      warnings.warn(f'{run_file} was written by an older qscore_jax without '
                    f'{", ".join(missing)}: they cannot be checked against the run being '
                    'resumed.', stacklevel=2)
    return missing
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    outputs.write_json_atomic(run_file, current)
  return []


def lock(workdir: pathlib.Path) -> outputs.WriterLock | None:
  """Locks the workdir while this run writes it (process 0; None on the others).

  Args:
    workdir: the run's directory (it exists).
  Raises:
    TrainingError: another run holds it.
  """
  if jax.process_index() != 0:
    return None
  return outputs.WriterLock(
      workdir / LOCK_FILE, error=TrainingError,
      in_use='another `qscore finetune` is training in this workdir. Wait for it to finish, '
      'or stop it; two runs would overwrite each other\'s checkpoints.',
      taken_over='resuming from its newest intact checkpoint.')


def _differences(a, b, prefix=''):
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _differences(a.get(key), b.get(key), f'{prefix}{key}.')
    return out
  return [] if a == b else [f'{prefix[:-1]}: {a!r} in the workdir, {b!r} now']


# --- checkpoints ---------------------------------------------------------------------------

def managers(workdir: pathlib.Path, *, keep: int, best_metric: str
             ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """The periodic (last ``keep``) and best (lowest ``best_metric``) checkpoint managers.

  Both remove the unfinished ``*.orbax-checkpoint-tmp`` directories a killed run leaves.

  Args:
    workdir: the run's directory.
    keep: periodic checkpoints kept.
    best_metric: the logged metric whose mean since the last checkpoint ranks ``best/``.
  """
  periodic = ocp.CheckpointManager(
      workdir / CHECKPOINTS_DIR,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True))
  best = ocp.CheckpointManager(
      workdir / BEST_DIR,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode='min',
          keep_checkpoints_without_metrics=False, cleanup_tmp_directories=True))
  return periodic, best


def read_only_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  """A checkpoint manager that only reads ``directory`` (``checkpoints/`` or ``best/``).

  Opening it neither creates, prunes nor cleans anything, so a run that is training in
  the workdir is not disturbed.

  Args:
    directory: a manager's directory.
  """
  chatter = logging.getLogger('absl')
  quiet = _NotReadOnlyNotice()
  # orbax logs three warnings per read-only manager that only restate the option.
  chatter.addFilter(quiet)
  try:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  finally:
    chatter.removeFilter(quiet)


class _NotReadOnlyNotice(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('read_only=True' in message or message.startswith('Given directory is read only'))


def _host_array(leaf) -> np.ndarray:
  """A leaf's value on this host (a replicated array's local copy on a multi-host mesh)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      if not leaf.sharding.is_fully_replicated:
        raise ValueError('state_digest needs replicated arrays on a multi-host mesh.')
      leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(jax.device_get(leaf))


def state_digest(state) -> str:
  """``xxh3_128:<hex>`` of every leaf of a state: its path, dtype, shape and bytes.

  Args:
    state: a pytree of arrays (a :class:`~qscore_jax.finetune.core.TrainState`;
      PRNG keys are hashed by their key data).
  """
  digest = xxhash.xxh3_128()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    array = _host_array(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n'.encode())
    digest.update(memoryview(array).cast('B') if array.size else b'')
  return f'xxh3_128:{digest.hexdigest()}'


def save(manager: ocp.CheckpointManager, state, step: int,
         metrics: Mapping[str, float] | None = None) -> None:
  """Saves ``state`` at ``step`` (asynchronously), with the hash :func:`restore` checks.

  Args:
    manager: one of :func:`managers`.
    state: the train state.
    step: its step.
    metrics: for the best manager, ``{best_metric: value}``.
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      **{INTEGRITY_ITEM: ocp.args.JsonSave({'state_digest': state_digest(state), 'step': step})}),
      metrics=dict(metrics) if metrics is not None else None)


class DamagedCheckpoint(RuntimeError):
  """A checkpoint's arrays do not match the hash saved with them."""


def restore(manager: ocp.CheckpointManager, target, step: int, *,
            require_integrity: bool = True):
  """The state saved at ``step``, restored onto ``target``'s shapes, dtypes and shardings.

  Args:
    manager: one of :func:`managers`.
    target: a state of the same structure (its values are not used).
    step: the checkpoint's step.
    require_integrity: a checkpoint without the hash is damaged (False only for a
      workdir of a qscore_jax that did not write it).
  Raises:
    DamagedCheckpoint: the restored arrays do not match the hash saved with them (or
      it is missing).
    Exception: whatever orbax or TensorStore raise on a damaged or missing file.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  # Checkpoints of qscore_jax before the hash was added have no integrity item.
  checked = (pathlib.Path(manager.directory) / str(step) / INTEGRITY_ITEM).is_dir()
  if require_integrity and not checked:
    raise DamagedCheckpoint(f'its {INTEGRITY_ITEM}/ item, the hash of its arrays, is missing')
  items = {'state': ocp.args.StandardRestore(abstract)}
  if checked:
    items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if checked:
    expected = restored[INTEGRITY_ITEM].get('state_digest')
    if state_digest(restored['state']) != expected:
      raise DamagedCheckpoint('its arrays do not match the hash saved with them: a file was '
                              'changed or damaged after it was written')
  return restored['state']


def _reason(error: BaseException) -> str:
  """One line on why a restore failed (orbax and TensorStore errors span many lines)."""
  if isinstance(error, DamagedCheckpoint):
    return str(error)
  text = ' '.join(str(error).split())
  if len(text) > 240:
    text = text[:240] + ' ...'
  return f'{type(error).__name__}: {text}'


def _is_restore_debris(unraisable) -> bool:
  """Whether an unraisable exception is what a failed orbax restore leaves behind.

  orbax reads arrays in coroutines on its own event loop; when a read fails the loop
  is closed while TensorStore still completes the other reads, and each one then
  prints a traceback ("Event loop is closed", an orbax coroutine never awaited) when it
  is garbage-collected or calls back. The failure itself is already reported.
  """
  error, source = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  code = getattr(source, 'cr_code', None)
  return code is not None and 'orbax' in code.co_filename


def _silence_restore_debris() -> None:
  """From now on, drops :func:`_is_restore_debris` tracebacks (others are still printed)."""
  previous = sys.unraisablehook
  if getattr(previous, 'qscore_restore_debris', False):
    return

  def hook(unraisable):
    if not _is_restore_debris(unraisable):
      previous(unraisable)

  hook.qscore_restore_debris = True
  sys.unraisablehook = hook
  # asyncio logs the failed restore's other reads as "Task exception was never retrieved".
  logging.getLogger('asyncio').addFilter(_not_restore_task)
  gc.collect()  # the failed restore's coroutines and tasks, now, under the hook and filter


def _not_restore_task(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not (message.startswith('Task exception was never retrieved') and 'orbax' in message)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _set_aside(workdir: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
  """Moves a checkpoint directory to ``workdir/damaged/`` (never over an earlier one)."""
  aside = workdir / DAMAGED_DIR
  aside.mkdir(exist_ok=True)
  target, n = aside / f'{directory.parent.name}-{directory.name}', 1
  while target.exists():
    n += 1
    target = aside / f'{directory.parent.name}-{directory.name}.{n}'
  directory.rename(target)
  return target


def restore_newest_intact(workdir: pathlib.Path, target, periodic: ocp.CheckpointManager,
                          best: ocp.CheckpointManager, *, require_integrity: bool = True
                          ) -> tuple[Any, int | None]:
  """The newest checkpoint (periodic or best) that restores and matches its hash.

  Every newer one that fails is reported in one paragraph (a warning, on process 0)
  and moved to ``workdir/damaged/``. If none restores, nothing is moved.

  Args:
    workdir: the run's directory.
    target: a state of the run's structure (returned unchanged when there is no
      checkpoint).
    periodic: the periodic manager (:func:`managers`); tried first at each step.
    best: the best manager.
    require_integrity: see :func:`restore`.
  Returns:
    ``(state, step)``, or ``(target, None)`` when the workdir holds no checkpoint.
  Raises:
    TrainingError: there are checkpoints but none can be restored (every reason given).
  """
  where = {}
  for manager in (best, periodic):  # periodic last: it is tried first
    for step in manager.all_steps():
      where.setdefault(step, []).insert(0, manager)
  failures: list[tuple[pathlib.Path, int, str]] = []
  for step in sorted(where, reverse=True):
    for manager in where[step]:
      state, error = _attempt(functools.partial(
          restore, manager, target, step, require_integrity=require_integrity))
      if error is not None:
        failures.append((pathlib.Path(manager.directory) / str(step), step, _reason(error)))
        continue
      if jax.process_count() > 1:  # every process restored the same step
        multihost_utils.assert_equal(np.int64(step), 'processes restored different steps')
      _report_fallback(workdir, failures, step, (periodic, best))
      return state, step
  if failures:
    listed = '\n'.join(f'  - step {step} in {path.parent}: {reason}'
                       for path, step, reason in failures)
    raise TrainingError(
        f'none of the checkpoints in {workdir} can be restored:\n{listed}\nNothing was moved '
        'or deleted. If the code or the config changed since they were written, use the '
        'version that wrote them; otherwise start again in a new --workdir (or move '
        'checkpoints/ and best/ out of this one to start it again from step 0).')
  return target, None


def restore_any(attempts):
  """The result of the first of ``attempts`` that succeeds (copies of one checkpoint).

  Args:
    attempts: zero-argument callables, each restoring one copy (:func:`restore`).
  Raises:
    Exception: the first attempt's error, when every one fails (nothing is moved).
  """
  errors = []
  for attempt in attempts:
    state, error = _attempt(attempt)
    if error is None:
      return state
    errors.append(error)
  raise errors[0]


def _attempt(restore_fn):
  """``(state, None)`` from one restore, or ``(None, error)`` when it fails, quietly."""
  with warnings.catch_warnings():
    # A failed restore leaves orbax coroutines that are never awaited (see
    # _is_restore_debris); Python warns about each when it is collected, which is
    # noise beside the one paragraph that reports the damaged checkpoint.
    warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    try:
      return restore_fn(), None
    # orbax and TensorStore raise many kinds of error on damaged or missing files.
    except Exception as error:  # pylint: disable=broad-except
      _silence_restore_debris()
      return None, error


def _report_fallback(workdir: pathlib.Path, failures, restored: int, all_managers) -> None:
  """Moves the failed checkpoints aside (process 0) and says so, one paragraph each."""
  _sync('qscore_jax: checkpoints restored')
  if jax.process_index() == 0:
    for path, step, reason in failures:
      moved = _set_aside(workdir, path)
      warnings.warn(
          f'Checkpoint step {step} in {path.parent} cannot be restored ({reason}). It was '
          f'moved to {moved}, not deleted. Training resumes from step {restored}, the '
          'newest intact checkpoint, and repeats the steps after it exactly.', stacklevel=3)
  _sync('qscore_jax: damaged checkpoints moved')
  for manager in all_managers:
    manager.reload()


# --- logs ----------------------------------------------------------------------------------

def truncate_logs(workdir: pathlib.Path, step: int) -> None:
  """Cuts ``metrics.jsonl`` and the TensorBoard events back to ``step`` (process 0).

  A resumed run logs the steps after its checkpoint again; without this they would
  appear twice. A last line or record that a kill left half-written is dropped.

  Args:
    workdir: the run's directory.
    step: the restored step (0: nothing logged survives).
  """
  if jax.process_index() != 0:
    return
  truncate_metrics(workdir / METRICS_FILE, step)
  events = workdir / TENSORBOARD_DIR
  if events.is_dir():
    for path in sorted(events.rglob('*tfevents*')):
      if path.is_file():
        truncate_events(path, step)


def truncate_metrics(path: pathlib.Path, step: int) -> int:
  """Keeps the lines of a ``metrics.jsonl`` with ``'step' <= step``; returns lines dropped.

  A line that does not parse is dropped: the last one silently (a kill cut it short),
  another with a warning, after a copy of the file is kept as ``<name>.damaged``.

  Args:
    path: the JSON-lines file (nothing happens if it does not exist).
    step: the last step kept.
  """
  if not path.is_file():
    return 0
  lines = path.read_text(encoding='utf-8', errors='replace').splitlines()
  kept, unreadable = [], []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      logged = int(record['step'])
    except (ValueError, TypeError, KeyError):
      if number < len(lines):
        unreadable.append(number)
      continue
    if logged <= step:
      kept.append(line)
  if unreadable:
    shutil.copyfile(path, path.with_name(path.name + '.damaged'))
    warnings.warn(f'{path} lines {unreadable[:10]} are not JSON records of a step and were '
                  f'dropped (the file as it was is kept as {path.name}.damaged).', stacklevel=3)
  if len(kept) == len(lines) and (not lines or _ends_with_newline(path)):
    return 0
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(line + '\n' for line in kept), encoding='utf-8')
  os.replace(tmp, path)
  return len(lines) - len(kept)


def _ends_with_newline(path: pathlib.Path) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def truncate_events(path: pathlib.Path, step: int) -> int:
  """Keeps the records of a TensorBoard events file up to ``step``; returns records dropped.

  A record cut short by a kill (and anything after it) is dropped. Events without a
  summary (the file-version header) are kept.

  Args:
    path: an ``events.out.tfevents.*`` file.
    step: the last step kept.
  """
  # TensorFlow: imported quietly by qscore_jax.data (the input pipeline, already loaded by a run).
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  kept, total, cut = [], 0, False
  try:
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      total += 1
      event = tf.compat.v1.Event.FromString(record)
      if not event.HasField('summary') or event.step <= step:
        kept.append(record)
  except tf.errors.DataLossError:  # the last record was cut short
    cut = True
  if len(kept) == total and not cut:
    return 0
  tmp = path.with_name(path.name + '.tmp')
  with tf.io.TFRecordWriter(str(tmp)) as writer:
    for record in kept:
      writer.write(record)
  os.replace(tmp, path)
  return total - len(kept) + int(cut)


class Logger:
  """``metrics.jsonl`` and TensorBoard scalars, written by process 0.

  Args:
    workdir: the run's directory (the files are appended to).
  """

  def __init__(self, workdir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      # Imports TensorFlow: here, after qscore_jax.data has imported it quietly, off accelerators.
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      # Kept open while the run logs; closed by close().
      self.jsonl = open(  # pylint: disable=consider-using-with
          workdir / METRICS_FILE, 'a', encoding='utf-8')
      self.tensorboard = tensorboard.SummaryWriter(str(workdir / TENSORBOARD_DIR))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one step's scalars to both logs (flushed).

    Args:
      step: the step they belong to.
      scalars: ``{name: value}``.
    """
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    """Closes both logs."""
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


def last_logged(workdir: pathlib.Path, step: int) -> dict[str, float]:
  """The metrics logged at ``step`` in ``workdir/metrics.jsonl`` (``{}`` when none).

  Args:
    workdir: the run's directory (its log already truncated by :func:`truncate_logs`).
    step: the step.
  """
  path = workdir / METRICS_FILE
  if not path.is_file():
    return {}
  last: dict[str, float] = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if record.get('step') == step:
      last = {k: v for k, v in record.items() if k != 'step'}
  return last


__all__ = ['DAMAGED_DIR', 'DamagedCheckpoint', 'Logger', 'TrainingError', 'check_run',
           'last_logged', 'managers', 'restore', 'restore_newest_intact', 'save',
           'state_digest', 'truncate_events', 'truncate_logs', 'truncate_metrics']

"""Resuming a fine-tuning run: checkpoints that fail over, logs cut back to the restored step,
a workdir that records (and checks) the init weights, and a lock against a second run.

The damage cases run on a small state saved by the loop's own save/restore
(:mod:`qscore_jax.finetune.workdir`), so that each costs a second; one end-to-end
run shows the loop falling back and ending bit-identical to an uninterrupted run.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_FINETUNE
from qscore_jax.configs.finetune import get_config
from qscore_jax.finetune import loop, workdir as files

TINY = TINY_FINETUNE


def _state(step: int):
  """A small state with the kinds of leaf a TrainState has (floats, ints, a PRNG key)."""
  return {'params': {'w': jnp.arange(50_000, dtype=jnp.float32) * step,
                     'b': jnp.full((3, 4), step, jnp.float32)},
          'step': jnp.int32(step), 'key': jax.random.fold_in(jax.random.key(0), step)}


def _saved(directory: pathlib.Path, steps=(4, 8, 12)):
  """A workdir with periodic checkpoints at ``steps`` and the best one at the last step."""
  periodic, best = files.managers(directory, keep=5, best_metric='loss')
  for step in steps:
    files.save(periodic, _state(step), step)
    files.save(best, _state(step), step, {'loss': -float(step)})
  for manager in (periodic, best):
    manager.wait_until_finished()
    manager.close()
  return directory


def _restore(directory: pathlib.Path, **kwargs):
  periodic, best = files.managers(directory, keep=5, best_metric='loss')
  try:
    return files.restore_newest_intact(directory, _state(0), periodic, best, **kwargs)
  finally:
    periodic.close()
    best.close()


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_a_byte(directory):
  path = _largest_file(directory)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x5A
  path.write_bytes(bytes(data))


def _truncate(directory):
  path = _largest_file(directory)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _delete(pattern):
  def damage(directory):
    found = list(directory.rglob(pattern))
    assert found, pattern
    for path in found:
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink()
  return damage


def _garbage(name):
  def damage(directory):
    (directory / 'state' / name).write_text('{not json')
  return damage


DAMAGES = {
    # orbax restores these silently with other values: only the saved hash tells.
    'flipped byte in the array data': _flip_a_byte,
    'truncated array data': _truncate,
    'deleted OCDBT manifests': _delete('manifest.ocdbt'),
    'deleted data files': _delete('d'),
    'deleted state item': _delete('state'),
    'deleted hash item': _delete(files.INTEGRITY_ITEM),
    'garbage state metadata': _garbage('_METADATA'),
}


@pytest.mark.parametrize('damage', DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_next_one_restored(tmp_path, damage):
  workdir = _saved(tmp_path / 'run')
  damage(workdir / 'checkpoints' / '12')
  damage(workdir / 'best' / '12')
  with pytest.warns(UserWarning) as caught:
    state, step = _restore(workdir)
  assert step == 8
  for name, leaf in jax.tree_util.tree_leaves_with_path(state):
    expected = dict(jax.tree_util.tree_leaves_with_path(_state(8)))[name]
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf, expected = jax.random.key_data(leaf), jax.random.key_data(expected)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
  messages = [str(w.message) for w in caught]
  # One paragraph per damaged checkpoint: which step, where, what is wrong, where it went.
  assert len(messages) == 2, messages
  for kind, message in zip(('checkpoints', 'best'), messages):
    assert f'Checkpoint step 12 in {workdir / kind} cannot be restored (' in message
    assert f'moved to {workdir / "damaged" / f"{kind}-12"}, not deleted' in message
    assert 'resumes from step 8' in message and '\n' not in message and len(message) < 900
  # Kept aside, not deleted; the managers no longer see them, and a new step 12 can be saved.
  assert sorted(p.name for p in (workdir / 'damaged').iterdir()) == ['best-12', 'checkpoints-12']
  periodic, best = files.managers(workdir, keep=5, best_metric='loss')
  assert periodic.all_steps() == [4, 8] and best.all_steps() == []  # best keeps one
  files.save(periodic, _state(12), 12)
  periodic.wait_until_finished()
  periodic.close()
  best.close()


def test_the_best_checkpoint_serves_when_the_periodic_one_is_damaged(tmp_path):
  workdir = _saved(tmp_path / 'run')
  _flip_a_byte(workdir / 'checkpoints' / '12')
  with pytest.warns(UserWarning, match='Checkpoint step 12 .*resumes from step 12'):
    state, step = _restore(workdir)
  assert step == 12 and int(state['step']) == 12
  assert [p.name for p in (workdir / 'damaged').iterdir()] == ['checkpoints-12']


def test_when_no_checkpoint_restores_nothing_is_moved_and_every_reason_is_given(tmp_path):
  workdir = _saved(tmp_path / 'run', steps=(4, 8))
  for path in ('checkpoints/4', 'checkpoints/8', 'best/8'):
    _flip_a_byte(workdir / path)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  with pytest.raises(files.TrainingError) as raised:
    _restore(workdir)
  message = str(raised.value)
  assert 'none of the checkpoints' in message and 'Nothing was moved or deleted' in message
  assert message.count('do not match the hash saved with them') == 3
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')) == before


def test_a_workdir_of_an_older_version_restores_checkpoints_without_a_hash(tmp_path):
  workdir = _saved(tmp_path / 'run', steps=(4,))
  for item in workdir.rglob(files.INTEGRITY_ITEM):
    shutil.rmtree(item)
  state, step = _restore(workdir, require_integrity=False)
  assert step == 4 and int(state['step']) == 4


def test_the_state_digest_sees_every_leaf():
  digest = files.state_digest(_state(3))
  assert digest.startswith('xxh3_128:') and digest == files.state_digest(_state(3))
  changed = _state(3)
  changed['params']['b'] = changed['params']['b'].at[1, 2].set(np.nextafter(np.float32(3), 4))
  assert files.state_digest(changed) != digest
  assert files.state_digest({**_state(3), 'key': jax.random.key(1)}) != digest


# --------------------------------------------------------------- the logs

def test_metrics_are_cut_back_to_the_restored_step_and_a_partial_line_repaired(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 7))
                  + '{"step": 7, "lo')
  assert files.truncate_metrics(path, 4) == 3
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
  assert path.read_text().endswith('\n')
  assert files.truncate_metrics(path, 4) == 0  # nothing more to do
  # A damaged line inside the file is dropped with a warning; the file as it was is kept.
  path.write_text('{"step": 1}\n#garbage\n{"step": 2}\n')
  with pytest.warns(UserWarning, match=r'lines \[2\] are not JSON records'):
    files.truncate_metrics(path, 9)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  assert (tmp_path / 'metrics.jsonl.damaged').read_text().count('\n') == 3


def _event_steps(directory: pathlib.Path) -> dict[str, list[int]]:
  """{tag: [steps]} of every scalar in a TensorBoard directory."""
  # TensorFlow, imported quietly as the package does (only the tests that read events need it).
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  steps: dict[str, list[int]] = {}
  for path in sorted(directory.rglob('*tfevents*')):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return steps


def test_tensorboard_events_are_cut_back_and_a_cut_record_dropped(tmp_path):
  logger = files.Logger(tmp_path)
  for step in range(1, 7):
    logger.write(step, {'loss': 1.0 / step, 'lr': 0.1})
  logger.close()
  [events] = list((tmp_path / 'tensorboard').rglob('*tfevents*'))
  with open(events, 'ab') as f:
    f.write(b'\x17\x00\x00')  # a record a kill cut short
  files.truncate_logs(tmp_path, 4)
  assert _event_steps(tmp_path / 'tensorboard') == {'loss': [1, 2, 3, 4], 'lr': [1, 2, 3, 4]}
  assert [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
          ] == [1, 2, 3, 4]


# --------------------------------------------------------------- the loop

def _digest(checkpoint: pathlib.Path) -> str:
  """The hash of the state a checkpoint was saved with (its integrity item)."""
  return json.loads((checkpoint / files.INTEGRITY_ITEM / 'metadata').read_text())['state_digest']


def test_the_loop_falls_back_to_an_intact_checkpoint_and_logs_every_step_once(tmp_path,
                                                                              tiny_data_dir):
  config = get_config(f'{TINY},data_dir={tiny_data_dir},method=simclr,num_steps=8,'
                      'checkpoint_every_steps=2,keep_checkpoints=4')
  run_dir = tmp_path / 'run'
  loop.run(config, run_dir, stop_after=4)  # "killed" after step 4
  pristine = _digest(run_dir / 'checkpoints' / '4')
  for manager in ('checkpoints', 'best'):
    if (run_dir / manager / '4').is_dir():
      _flip_a_byte(run_dir / manager / '4')
  with open(run_dir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 5, "loss": 0.')  # the kill also cut a log line short
  with pytest.warns(UserWarning, match=r'Checkpoint step 4 in .* cannot be restored \(its '
                                       r'arrays do not match .*resumes from step 2'):
    result = loop.run(config, run_dir)
  assert result['step'] == 8 and (run_dir / 'model').is_dir()
  # Steps 3 and 4 were trained again from step 2's state, to the same bits as the first time.
  assert _digest(run_dir / 'checkpoints' / '4') == pristine
  assert (run_dir / 'damaged' / 'checkpoints-4').is_dir()
  steps = [json.loads(l)['step'] for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(1, 9))
  events = _event_steps(run_dir / 'tensorboard')
  assert events['loss'] == list(range(1, 9)) == events['qscore_mean']


def test_a_replaced_init_model_is_refused_on_resume(tmp_path, tiny_data_dir):
  from helpers import random_variables  # pylint: disable=import-outside-toplevel  # test-only
  # test-only imports
  from qscore_jax.models import build_model, load_encoder, save_model  # pylint: disable=C0415
  model = build_model('resnet18', width_multiplier=0.0625)
  init = tmp_path / 'init'
  save_model(init, random_variables(model, (1, 32, 32, 3), seed=0), arch='resnet18',
             arch_options={'width_multiplier': 0.0625}, method='simclr')
  config = get_config(f'{TINY},data_dir={tiny_data_dir},method=simclr,num_steps=4')
  first = load_encoder(init).fingerprint
  _start_workdir(tmp_path / 'run', config, init=str(init), fingerprint=first)
  # A new model saved at the same path (a new fine-tune into the same place).
  save_model(init, random_variables(model, (1, 32, 32, 3), seed=1), arch='resnet18',
             arch_options={'width_multiplier': 0.0625}, method='simclr', overwrite=True)
  with pytest.raises(loop.TrainingError, match=rf"init_fingerprint: '{first}' in the workdir, "
                                               r"'sha256:.*' now.*new --workdir"):
    loop.run(config, tmp_path / 'run', init=str(init))


def test_a_workdir_in_use_is_refused_and_a_killed_holders_lock_taken_over(tmp_path,
                                                                           tiny_data_dir):
  config = get_config(f'{TINY},data_dir={tiny_data_dir},method=simclr,num_steps=2')
  run_dir = tmp_path / 'run'
  _start_workdir(run_dir, config)
  holder = subprocess.Popen(  # another process holding the workdir's lock, as a run does
      [sys.executable, '-c', 'import fcntl, json, os, sys, time\n'
       'f = open(sys.argv[1], "a+"); fcntl.flock(f, fcntl.LOCK_EX)\n'
       'json.dump({"pid": os.getpid(), "host": "here", "since": "now"}, f); f.flush()\n'
       'print("locked", flush=True); time.sleep(120)', str(run_dir / files.LOCK_FILE)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(loop.TrainingError, match=r'in use by pid \d+ on here .*another `qscore '
                                                 r'finetune` is training in this workdir'):
      loop.run(config, run_dir)
  finally:
    holder.kill()  # like kill -9: the kernel drops the flock, the file still names it
    holder.wait()
  with pytest.warns(UserWarning, match='taking over the lock of pid'):
    held = files.lock(run_dir)
  held.release()
  assert (run_dir / files.LOCK_FILE).read_text() == ''  # released cleanly


def _start_workdir(directory: pathlib.Path, config, init='random', fingerprint=None) -> None:
  """The workdir as a run leaves it before its first step (marker and run.json)."""
  loop._check_workdir(directory, config, {  # pylint: disable=protected-access
      'init': init, 'init_fingerprint': fingerprint, 'checkpoint_digest': 'xxh3_128',
      'dataset_version': loop.dataset_info(config.dataset, config.data_dir).version})

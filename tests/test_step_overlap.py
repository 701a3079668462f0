"""The step loops never wait for a step they have not queued a successor to (issue 19)."""

import jax
import numpy as np
import pytest

from helpers import TINY_FINETUNE
from qscore_jax import parallel
from qscore_jax.configs.finetune import get_config
from qscore_jax.finetune import core, loop


def test_prefetch_keeps_batches_in_flight_and_the_order():
  put_log = []

  def put(batch):
    put_log.append(batch)
    return batch * 10
  seen = []
  for batch, device in parallel.prefetch(range(5), put, size=2):
    seen.append((batch, device, len(put_log)))
  # When batch k is handed out, batches k and k+1 are already put (the last: only itself).
  assert seen == [(0, 0, 2), (1, 10, 3), (2, 20, 4), (3, 30, 5), (4, 40, 5)]
  assert list(parallel.prefetch([], put)) == []
  with pytest.raises(ValueError, match='at least 1'):
    list(parallel.prefetch(range(3), put, size=0))


def _record_events(monkeypatch):
  """Logs ('dispatch', k) when step k is dispatched and ('read', k) when its metrics are read."""
  events = []
  jit_step = core.Trainer.jit_step

  def recording_jit_step(self, mesh):
    step_fn = jit_step(self, mesh)

    def step(state, views):
      state, metrics = step_fn(state, views)
      events.append(('dispatch', len([e for e in events if e[0] == 'dispatch']) + 1))
      return state, metrics
    return step
  read = loop.read_metrics

  def recording_read(metrics):
    events.append(('read', len([e for e in events if e[0] == 'read']) + 1))
    return read(metrics)
  monkeypatch.setattr(core.Trainer, 'jit_step', recording_jit_step)
  monkeypatch.setattr(loop, 'read_metrics', recording_read)
  return events


def test_step_k_plus_1_is_dispatched_before_step_k_is_read(tmp_path, tiny_data_dir, monkeypatch):
  events = _record_events(monkeypatch)
  config = get_config(f'{TINY_FINETUNE},data_dir={tiny_data_dir},method=simclr,num_steps=6,'
                      'checkpoint_every_steps=3,export_model=false')
  result = loop.run(config, tmp_path / 'run')
  assert result['step'] == 6
  order = {event: i for i, event in enumerate(events)}
  for k in range(1, 7):
    if k % 3:  # between checkpoints: the successor is queued before step k is read
      assert order[('dispatch', k + 1)] < order[('read', k)], events
    else:  # a checkpoint step is read before it is saved, and before its successor
      assert order[('read', k)] < order.get(('dispatch', k + 1), len(events)), events
  assert [e for e in events if e[0] == 'read'] == [('read', k) for k in range(1, 7)]


def test_the_embedding_loop_reads_batch_k_after_dispatching_k_plus_1(tmp_path, tiny_data_dir,
                                                                     monkeypatch):
  import importlib  # pylint: disable=import-outside-toplevel
  embed = importlib.import_module('qscore_jax.embed')  # the module, not the facade's embed()
  from qscore_jax.models import build_model, init_variables  # pylint: disable=import-outside-toplevel
  events = []
  make_step = embed.make_embed_step

  def recording_make_step(model, mesh):
    step = make_step(model, mesh)

    def dispatch(variables, images):
      out = step(variables, images)
      events.append(('dispatch', sum(e[0] == 'dispatch' for e in events) + 1))
      return out
    return dispatch
  local_rows = parallel.local_rows

  def recording_local_rows(array):
    events.append(('read', sum(e[0] == 'read' for e in events) + 1))
    return local_rows(array)
  monkeypatch.setattr(embed, 'make_embed_step', recording_make_step)
  monkeypatch.setattr(parallel, 'local_rows', recording_local_rows)
  model = build_model('resnet18', width_multiplier=0.0625)
  variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  store = embed.embed_dataset(model, variables, 'synthetic_shapes/tiny', 'test',
                              tmp_path / 'store', batch_size=32, data_dir=tiny_data_dir,
                              progress=False, image_size=32)
  batches = 128 // 32
  order = {event: i for i, event in enumerate(events)}
  assert [e for e in events if e[0] == 'read'] == [('read', k) for k in range(1, batches + 1)]
  for k in range(1, batches):
    assert order[('dispatch', k + 1)] < order[('read', k)], events
  from qscore_jax.store import RepresentationStore  # pylint: disable=import-outside-toplevel
  opened = RepresentationStore.open(store)
  assert opened.num_rows == 128 and list(opened.ids) == list(range(128))

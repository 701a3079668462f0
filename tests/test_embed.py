"""The embedding step and the resumable store driver, on 1 and 8 devices and 2 processes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import finish_json, free_port, random_variables
from qscore_jax import analysis, streaming
from qscore_jax.data import eval_batches
from qscore_jax.embed import embed_dataset, embed_images, make_embed_step
from qscore_jax.models import build_model, get_preprocessing, save_model
from qscore_jax.store import RepresentationStore, StoreError

DATASET = 'synthetic_shapes/tiny'


@pytest.fixture(scope='module')
def data_dir(tiny_data_dir):
  return tiny_data_dir


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
  model = build_model('resnet18', width_multiplier=0.5)
  path = tmp_path_factory.mktemp('model') / 'r18'
  save_model(path, random_variables(model, (1, 32, 32, 3)), arch='resnet18',
             arch_options={'width_multiplier': 0.5}, preprocessing=get_preprocessing('cifar'))
  return path


def _direct(model, variables, data_dir, split='train'):
  """Representations computed without the driver, in id order."""
  reps, ids = [], []
  for batch in eval_batches(DATASET, split, batch_size=64, data_dir=data_dir,
                            preprocessing=get_preprocessing('cifar'), process_count=1,
                            local_device_count=1):
    out = np.asarray(jax.jit(model.apply)(variables, batch['image']))
    reps.append(out[batch['mask']])
    ids.append(batch['id'][batch['mask']])
  return np.concatenate(reps), np.concatenate(ids)


def test_store_holds_the_split_in_id_order(tmp_path, data_dir, saved_model):
  from qscore_jax.models import load_model  # pylint: disable=import-outside-toplevel
  model, variables, _ = load_model(saved_model)
  path = embed_dataset(model, variables, DATASET, 'train', tmp_path / 'store', batch_size=48,
                       preprocessing=get_preprocessing('cifar'), data_dir=data_dir,
                       progress=False, metadata={'model': 'r18-random'})
  store = RepresentationStore.open(path)
  expected, ids = _direct(model, variables, data_dir)
  assert store.num_rows == 256 and store.dim == 256
  np.testing.assert_array_equal(store.ids, np.arange(256))
  np.testing.assert_array_equal(ids, np.arange(256))
  np.testing.assert_allclose(store.representations(), expected, rtol=1e-5, atol=1e-5)
  assert store.metadata['model'] == 'r18-random' and store.metadata['dataset'] == DATASET
  assert store.metadata['preprocessing']['name'] == 'cifar'
  chunks = list(store.iter_chunks(100))
  assert [offset for offset, _ in chunks] == [0, 100, 200]
  # Running again on the complete store is a no-op that changes nothing.
  before = (path / 'shard-00000-of-00001' / 'representations.npy').read_bytes()
  embed_dataset(model, variables, DATASET, 'train', path, batch_size=48,
                preprocessing=get_preprocessing('cifar'), data_dir=data_dir, progress=False,
                metadata={'model': 'r18-random'})
  assert (path / 'shard-00000-of-00001' / 'representations.npy').read_bytes() == before
  with pytest.raises(StoreError, match='another run'):
    embed_dataset(model, variables, DATASET, 'test', path, batch_size=48,
                  preprocessing=get_preprocessing('cifar'), data_dir=data_dir, progress=False)


def test_incomplete_store_is_refused_with_how_to_resume(tmp_path):
  from qscore_jax.store import ShardWriter  # pylint: disable=import-outside-toplevel
  writer = ShardWriter(tmp_path, shard_index=0, shard_count=1, rows=10, dim=4, first_id=0,
                       metadata={'split_size': 10, 'model': None, 'dataset': 'x', 'split': 'y'})
  writer.append(np.ones((4, 4), np.float32), np.zeros(4, np.int32), np.arange(4))
  with pytest.raises(StoreError, match='4 of 10 rows written.*again to resume'):
    RepresentationStore.open(tmp_path)
  with pytest.raises(StoreError, match='out of order'):
    writer.append(np.ones((2, 4), np.float32), np.zeros(2, np.int32), np.array([7, 8]))


def test_embed_step_under_jit_mesh_and_pmap():
  model = build_model('resnet18', width_multiplier=0.25)
  variables = random_variables(model, (1, 32, 32, 3))
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  expected = np.asarray(embed_images(model, variables, images))
  np.testing.assert_allclose(np.asarray(make_embed_step(model)(variables, images)), expected,
                             rtol=1e-5, atol=1e-6)
  import functools  # pylint: disable=import-outside-toplevel
  pmapped = jax.pmap(functools.partial(embed_images, model), in_axes=(None, 0))
  out = pmapped(variables, images.reshape(jax.local_device_count(), -1, 32, 32, 3))
  np.testing.assert_allclose(np.asarray(out).reshape(4, -1), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- in subprocesses

RUN = r"""
import sys, json, jax
from qscore_jax import load_encoder
from qscore_jax.embed import embed_encoder
embed_encoder(load_encoder(sys.argv[1]), 'synthetic_shapes/tiny', 'train', sys.argv[2],
              batch_size=int(sys.argv[3]), data_dir=sys.argv[4], progress=False)
print(json.dumps({'devices': jax.device_count(), 'processes': jax.process_count()}))
"""


def _run(args, devices=1, env=None):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.Popen([sys.executable, '-c', RUN, *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eight_devices_and_two_processes_equal_one_device(tmp_path, data_dir, saved_model):
  one = finish_json(_run([saved_model, tmp_path / 'one', 16, data_dir]))
  eight = finish_json(_run([saved_model, tmp_path / 'eight', 16, data_dir], devices=8))
  # Two processes of 4 devices each, through the command line as on a pod: `qscore
  # --distributed ... embed` on every host.
  address = f'127.0.0.1:{free_port()}'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  workers = [subprocess.Popen(
      [sys.executable, '-m', 'qscore_jax.cli', '--distributed', '--coordinator-address', address,
       '--num-processes', '2', '--process-id', str(i), 'embed', str(saved_model), '--dataset',
       'synthetic_shapes/tiny', '--split', 'train', '--out', str(tmp_path / 'two'),
       '--batch-size', '16', '--data-dir', str(data_dir), '--no-progress'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for worker in workers:
    out, err = worker.communicate(timeout=1500)
    assert worker.returncode == 0, err[-4000:]
    assert '256 x' in out, out  # every process reports the whole store
  assert (one['devices'], eight['devices'], one['processes']) == (1, 8, 1)

  stores = {name: RepresentationStore.open(tmp_path / name) for name in ('one', 'eight', 'two')}
  assert len(stores['two'].shards) == 2 and stores['two'].shard_rows() == [128, 128]
  reference = stores['one'].representations()
  for name in ('eight', 'two'):
    store = stores[name]
    np.testing.assert_array_equal(store.ids, np.arange(256))  # no id lost or doubled
    np.testing.assert_array_equal(store.labels, stores['one'].labels)
    np.testing.assert_allclose(store.representations(), reference, rtol=1e-5, atol=1e-5)

  # Statistics and Q from each store: the same sets, and Q within float tolerance
  # (bit-identical when the representations are).
  results = {}
  for name, store in stores.items():
    feature = streaming.feature_stats(store, chunk_rows=64)
    results[name] = (feature, streaming.sample_scores(store, feature, chunk_rows=64))
  for name in ('eight', 'two'):
    np.testing.assert_array_equal(results[name][0].counts, results['one'][0].counts)
    np.testing.assert_array_equal(results[name][0].discriminative, results['one'][0].discriminative)
    np.testing.assert_allclose(results[name][1]['qscore'], results['one'][1]['qscore'],
                               rtol=1e-5, atol=1e-6)


def test_statistics_on_eight_devices_equal_one_device(tmp_path):
  """The streaming kernels shard rows over 8 devices: counts, D and Q are bit-identical."""
  script = r"""
import numpy as np, jax, sys
from qscore_jax import streaming
rng = np.random.default_rng(0)
h = (np.maximum(rng.standard_normal((1001, 96)), 0) ** 2).astype(np.float32)
f = streaming.feature_stats(h, chunk_rows=64)
s = streaming.sample_scores(h, f, chunk_rows=64)
np.savez(sys.argv[1], counts=f.counts, member=f.discriminative, q=s['qscore'], devices=jax.device_count())
"""
  for devices in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    subprocess.run([sys.executable, '-c', script, str(tmp_path / f'{devices}.npz')], env=env,
                   check=True, capture_output=True)
  one, eight = np.load(tmp_path / '1.npz'), np.load(tmp_path / '8.npz')
  assert int(eight['devices']) == 8
  for key in ('counts', 'member', 'q'):
    np.testing.assert_array_equal(one[key], eight[key])


def test_sigkill_midway_then_resume_gives_the_same_store(tmp_path, data_dir, saved_model):
  reference = finish_json(_run([saved_model, tmp_path / 'whole', 16, data_dir]))
  del reference
  target = tmp_path / 'killed'
  process = _run([saved_model, target, 16, data_dir])
  progress = target / 'shard-00000-of-00001' / 'progress.json'
  deadline = time.time() + 600
  killed_at = None
  while time.time() < deadline and process.poll() is None:
    if progress.exists():
      try:
        rows = json.loads(progress.read_text())['rows']
      except (json.JSONDecodeError, KeyError):
        rows = 0
      if 16 <= rows < 240:
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = rows
        break
    time.sleep(0.005)
  assert killed_at is not None, 'the run finished before it could be killed'
  assert process.returncode == -signal.SIGKILL
  with pytest.raises(StoreError, match='incomplete'):
    RepresentationStore.open(target)
  finish_json(_run([saved_model, target, 16, data_dir]))  # resume
  for name in ('representations.npy', 'labels.npy', 'ids.npy'):
    whole = (tmp_path / 'whole' / 'shard-00000-of-00001' / name).read_bytes()
    resumed = (target / 'shard-00000-of-00001' / name).read_bytes()
    assert whole == resumed, name


def test_analysis_split_from_store(tmp_path, data_dir, saved_model):
  finish_json(_run([saved_model, tmp_path / 'train', 32, data_dir]))
  split = analysis.Split.from_store(tmp_path / 'train')
  assert split.representations.shape == (256, 256) and split.description['split'] == 'train'
  assert pathlib.Path(split.source.path).name == 'train'


# ------------------------------------------------------------- one encoder, loaded once


def test_an_encoder_is_restored_once_and_knows_its_weights(saved_model, model_restores):
  from qscore_jax import load_encoder  # pylint: disable=import-outside-toplevel
  encoder = load_encoder(saved_model)
  assert model_restores == [pathlib.Path(saved_model)]
  again = load_encoder(saved_model)
  assert again.fingerprint == encoder.fingerprint and again is not encoder
  assert encoder.describe()['model_fingerprint'] == encoder.fingerprint
  assert encoder.preprocessing == get_preprocessing('cifar') and encoder.num_features == 256
  # The fingerprint is of the content: one changed number changes it.
  params = jax.tree.map(np.array, encoder.variables['params'])  # writable copies
  first = jax.tree_util.tree_leaves(params)[0]
  first.flat[0] += 1
  changed = type(encoder).from_variables(encoder.module, {**encoder.variables, 'params': params})
  assert changed.fingerprint != encoder.fingerprint


def test_a_store_of_other_weights_is_refused_even_under_the_same_path(tmp_path, data_dir):
  """A model retrained into the same directory must not resume the old model's store."""
  from qscore_jax import load_encoder  # pylint: disable=import-outside-toplevel
  from qscore_jax.embed import embed_encoder  # pylint: disable=import-outside-toplevel
  model = build_model('resnet18', width_multiplier=0.25)
  directory = tmp_path / 'model'
  store = tmp_path / 'store'
  for seed in (0, 1):
    save_model(directory, random_variables(model, (1, 32, 32, 3), seed=seed), arch='resnet18',
               arch_options={'width_multiplier': 0.25}, preprocessing=get_preprocessing('cifar'),
               overwrite=True)
    encoder = load_encoder(directory)
    if seed == 0:
      embed_encoder(encoder, 'synthetic_shapes/tiny', 'train', store, batch_size=64,
                    data_dir=data_dir, progress=False)
      continue
    with pytest.raises(StoreError, match='model_fingerprint'):
      embed_encoder(encoder, 'synthetic_shapes/tiny', 'train', store, batch_size=64,
                    data_dir=data_dir, progress=False)


def test_the_deprecated_reference_call_still_works_and_says_what_to_use(tmp_path, data_dir,
                                                                        saved_model,
                                                                        model_restores):
  from qscore_jax.embed import embed_model_on_dataset  # pylint: disable=import-outside-toplevel
  with pytest.warns(DeprecationWarning, match='load_encoder'):
    path = embed_model_on_dataset(str(saved_model), 'synthetic_shapes/tiny', 'test',
                                  tmp_path / 'store', batch_size=64, data_dir=data_dir,
                                  progress=False)
  assert RepresentationStore.open(path).num_rows == 128 and len(model_restores) == 1


# ------------------------------------------------------------- stores that cannot mix


def test_a_store_is_not_reused_for_another_image_size(tmp_path, data_dir, saved_model):
  """Issue 17, finding 1: a store embedded at the model's size was reused (or resumed) by a
  run asking for another --image-size, mixing 32-px and 64-px rows."""
  from qscore_jax import load_encoder  # pylint: disable=import-outside-toplevel
  from qscore_jax.embed import embed_encoder  # pylint: disable=import-outside-toplevel
  encoder = load_encoder(saved_model)
  store = tmp_path / 'store'
  embed_encoder(encoder, 'synthetic_shapes/tiny', 'test', store, batch_size=64,
                data_dir=data_dir, progress=False)
  with pytest.raises(StoreError, match=r'image_size: stored None, now 64'):
    embed_encoder(encoder, 'synthetic_shapes/tiny', 'test', store, batch_size=64,
                  image_size=64, data_dir=data_dir, progress=False)
  assert RepresentationStore.open(store).metadata['image_size'] is None


def test_analyze_refuses_stores_of_two_models(tmp_path, data_dir, saved_model, capsys):
  """Issue 17, finding 2: a train store of one model and an eval store of another (same
  width) gave a report with exit status 0; with other widths, raw broadcasting text."""
  from qscore_jax import cli, load_encoder  # pylint: disable=import-outside-toplevel
  from qscore_jax.embed import embed_encoder  # pylint: disable=import-outside-toplevel
  model = build_model('resnet18', width_multiplier=0.5)
  other = save_model(tmp_path / 'other', random_variables(model, (1, 32, 32, 3), seed=7),
                     arch='resnet18', arch_options={'width_multiplier': 0.5},
                     preprocessing=get_preprocessing('cifar'))
  narrow = save_model(tmp_path / 'narrow', random_variables(
      build_model('resnet18', width_multiplier=0.25), (1, 32, 32, 3)), arch='resnet18',
                      arch_options={'width_multiplier': 0.25},
                      preprocessing=get_preprocessing('cifar'))
  stores = {}
  for name, path, split in (('train', saved_model, 'train'), ('other', other, 'test'),
                            ('narrow', narrow, 'test')):
    stores[name] = embed_encoder(load_encoder(path), 'synthetic_shapes/tiny', split,
                                 tmp_path / f'store_{name}', batch_size=64, data_dir=data_dir,
                                 progress=False)
  for name in ('other', 'narrow'):
    out = tmp_path / f'report_{name}'
    assert cli.main(['analyze', '--train', str(stores['train']), '--eval', str(stores[name]),
                     '--out', str(out), '--probe-epochs', '2', '--no-compression']) == 2
    error = capsys.readouterr().err
    assert 'different models' in error and 'model_fingerprint' in error, error
    assert not (out / 'report.json').exists()
  # Arrays carry no provenance, but their widths must still agree.
  with pytest.raises(ValueError, match='d=256 features and the evaluated split d=128'):
    analysis.analyze(analysis.Split.from_arrays(np.ones((8, 256)), np.zeros(8, int)),
                     analysis.Split.from_arrays(np.ones((8, 128)), np.zeros(8, int)),
                     tmp_path / 'arrays')


def test_embed_does_not_call_a_truncated_store_complete(tmp_path, data_dir, saved_model, capsys):
  """Issue 17, finding 3: rerunning `qscore embed` on a store whose representations were
  truncated described it as complete (exit status 0)."""
  from qscore_jax import cli  # pylint: disable=import-outside-toplevel
  store = tmp_path / 'store'
  command = ['embed', str(saved_model), '--dataset', DATASET, '--split', 'test', '--out',
             str(store), '--batch-size', '64', '--data-dir', data_dir, '--no-progress']
  assert cli.main(command) == 0
  assert '128 x 256 representations' in capsys.readouterr().out
  reps = store / 'shard-00000-of-00001' / 'representations.npy'
  os.truncate(reps, reps.stat().st_size // 2)
  assert cli.main(command) == 2
  captured = capsys.readouterr()
  assert 'representations.npy is truncated' in captured.err and 'store ' not in captured.out

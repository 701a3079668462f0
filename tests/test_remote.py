"""Outputs and inputs on gs:// URLs, against a local Cloud Storage emulator (issue 19).

fake-gcs-server runs in memory on loopback (tests/gcs_emulator.py); gcsfs, orbax's
tensorstore and etils.epath are pointed at it. The end-to-end test runs convert -> embed ->
analyze -> finetune (checkpoints, a resume from the bucket on an empty cache, the exported
model embedded again) with every directory a gs:// URL, and checks that the stores and
scores are those of the same commands on local directories.

TensorFlow's own Cloud Storage file system (a tfds data directory on gs://) cannot be
pointed at an emulator: its endpoints are fixed to storage.googleapis.com and none of
its GCS_* variables changes them. The data directory stays local here.
"""

import json
import pathlib

import fsspec
import numpy as np
import pytest

import checkpoint_factories as factories
import gcs_emulator
from helpers import TINY_FINETUNE
from qscore_jax import cli, outputs, remote
from qscore_jax.store import RepresentationStore

BUCKET = 'qscore-test'


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  log = tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log'
  with gcs_emulator.running(log) as url:
    gcs_emulator.create_bucket(url, BUCKET)
    yield url


@pytest.fixture
def bucket(emulator, monkeypatch, tmp_path):
  """``gs://qscore-test/<this test>``, with every client sent to the emulator and the local
  copies under ``tmp_path/cache``."""
  for name, value in gcs_emulator.environment(emulator).items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv('QSCORE_REMOTE_CACHE', str(tmp_path / 'cache'))
  return f'gs://{BUCKET}/{tmp_path.name}'


def _objects(url):
  fs, path = fsspec.core.url_to_fs(url)
  fs.invalidate_cache()
  return sorted(name[len(path) + 1:] for name in fs.find(path))


def _upload(local, url):
  fs, path = fsspec.core.url_to_fs(url)
  fs.put_file(str(local), path)


def _files(root):
  return {p.relative_to(root).as_posix(): p for p in root.rglob('*') if p.is_file()}


# ------------------------------------------------------------------ the library of copies

def test_push_and_pull_copy_exactly_and_only_what_changed(bucket, tmp_path):
  source = tmp_path / 'src'
  (source / 'sub').mkdir(parents=True)
  (source / 'a.txt').write_text('one')
  (source / 'sub' / 'b.bin').write_bytes(bytes(range(256)) * 40)
  url = f'{bucket}/dir'
  assert remote.push(source, url) == {'uploaded': 2, 'deleted': 0, 'unchanged': 0}
  assert _objects(url) == [remote.MANIFEST, 'a.txt', 'sub/b.bin']
  assert remote.push(source, url) == {'uploaded': 0, 'deleted': 0, 'unchanged': 2}
  local = remote.pull(url)
  assert local == tmp_path / 'cache' / 'gs' / BUCKET / tmp_path.name / 'dir'
  assert (local / 'sub' / 'b.bin').read_bytes() == (source / 'sub' / 'b.bin').read_bytes()
  # A file the source lost is deleted in the bucket, then in the local copy.
  (source / 'a.txt').unlink()
  (source / 'sub' / 'b.bin').write_bytes(b'changed')
  assert remote.push(source, url) == {'uploaded': 1, 'deleted': 1, 'unchanged': 0}
  assert sorted(p.name for p in remote.pull(url).rglob('*') if p.is_file()) == ['b.bin']
  assert (local / 'sub' / 'b.bin').read_bytes() == b'changed'
  # Writer locks are this machine's: not uploaded, and a pull leaves the local one alone.
  from qscore_jax import store  # pylint: disable=import-outside-toplevel
  from qscore_jax.finetune import workdir  # pylint: disable=import-outside-toplevel
  assert {store.LOCK_FILE, workdir.LOCK_FILE} <= remote.LOCAL_ONLY
  (source / 'sub' / 'lock').write_text('{"pid": 1}')
  (local / 'lock').write_text('{"pid": 2}')
  assert remote.push(source, url) == {'uploaded': 0, 'deleted': 0, 'unchanged': 1}
  assert 'sub/lock' not in _objects(url)
  assert (remote.pull(url) / 'lock').read_text() == '{"pid": 2}'


def test_an_interrupted_upload_is_refused_as_an_input(bucket, tmp_path, monkeypatch):
  source = tmp_path / 'src'
  source.mkdir()
  for name in ('a', 'b', 'c'):
    (source / name).write_text(name)
  url = f'{bucket}/interrupted'
  remote.push(source, url)
  (source / 'b').write_text('new b')
  (source / 'c').write_text('new c')
  calls = []
  fs, _ = fsspec.core.url_to_fs(url)  # the instance remote uses too (fsspec caches them)
  put = fs.put_file

  def dying(lpath, rpath, *args, **kwargs):
    calls.append(rpath)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the machine goes away mid-push
    return put(lpath, rpath, *args, **kwargs)

  monkeypatch.setattr(fs, 'put_file', dying)
  with pytest.raises(KeyboardInterrupt):
    remote.push(source, url)
  monkeypatch.setattr(fs, 'put_file', put)
  with pytest.raises(remote.RemoteError, match='upload was interrupted.*rerun the command'):
    remote.pull(url)
  # An output is pulled anyway (its own checks decide), and the next push completes it.
  assert (remote.pull(url, strict=False) / 'b').read_text() == 'new b'
  remote.push(source, url)
  assert (remote.pull(url) / 'c').read_text() == 'new c'


def test_a_damaged_download_and_a_missing_url_are_errors(bucket, tmp_path):
  source = tmp_path / 'src'
  source.mkdir()
  (source / 'x.npy').write_bytes(b'12345678')
  url = f'{bucket}/damaged'
  remote.push(source, url)
  fs, path = fsspec.core.url_to_fs(url)
  fs.pipe_file(f'{path}/x.npy', b'87654321')  # changed behind the manifest's back
  with pytest.raises(remote.RemoteError, match='does not match its manifest'):
    remote.pull(url)
  assert not (remote.local_path(url) / 'x.npy').exists()
  with pytest.raises(remote.RemoteError, match='does not exist'):
    remote.pull(f'{bucket}/nothing-here')
  with pytest.raises(remote.RemoteError, match='SCHEME://BUCKET/PATH'):
    remote.local_path('gs://bucket/../etc')


def test_a_second_writer_is_refused_and_a_dead_one_taken_over(bucket, tmp_path):
  url = f'{bucket}/locked'
  notes = []
  with remote.WorkingCopy(url, note=notes.append) as copy:
    copy.path.mkdir(parents=True)
    outputs.write_marker(copy.path, 'store')  # only the tool's own outputs are pushed
    (copy.path / 'f').write_text('x')
    with pytest.raises(remote.RemoteError, match=r'is being written by pid \d+ on .*delete '):
      remote.WorkingCopy(url).__enter__()
  assert _objects(url) == [outputs.MARKER_FILE, remote.MANIFEST, 'f']  # pushed, unlocked
  fs, path = fsspec.core.url_to_fs(url)
  dead = {**outputs.writer_identity(), 'pid': 2 ** 22 + 7, 'start_time': 1}
  fs.pipe_file(f'{path}/{remote.LOCK}', json.dumps(dead).encode())
  with remote.WorkingCopy(url, note=notes.append):
    pass
  assert any('taking over the lock' in n for n in notes), notes


# ------------------------------------------------------------------ end to end

def test_convert_embed_analyze_finetune_and_resume_all_on_gs(bucket, tmp_path, tiny_data_dir,
                                                             capsys):
  solo = factories.solo(tmp_path)
  _upload(solo.path, f'{bucket}/in/{solo.path.name}')
  model = f'{bucket}/model'
  assert cli.main(['convert', '--file', f'{bucket}/in/{solo.path.name}', '--out', model,
                   '--no-progress']) == 0
  assert 'metadata.json' in _objects(model) and '.qscore-output.json' in _objects(model)

  data = ['--dataset', 'synthetic_shapes/tiny', '--data-dir', tiny_data_dir, '--no-progress',
          '--batch-size', '64']
  for split, name in (('train', 'train'), ('test', 'eval')):
    assert cli.main(['embed', model, *data, '--split', split, '--out', f'{bucket}/{name}']) == 0
  # The same --out with one option changed is refused, and the message names the URL.
  capsys.readouterr()
  assert cli.main(['embed', model, *data, '--split', 'test', '--out', f'{bucket}/eval',
                   '--dtype', 'bfloat16']) == 2
  refused = capsys.readouterr().err
  assert f'{bucket}/eval already holds a store of another run' in refused, refused
  assert str(remote.cache_root()) not in refused, refused
  # The same stores on local directories, from the same converted model.
  local_model = tmp_path / 'local-model'
  assert cli.main(['convert', '--file', str(solo.path), '--out', str(local_model),
                   '--no-progress']) == 0
  for split, name in (('train', 'train'), ('test', 'eval')):
    assert cli.main(['embed', str(local_model), *data, '--split', split,
                     '--out', str(tmp_path / name)]) == 0
  for name in ('train', 'eval'):
    stored = RepresentationStore.open(remote.pull(f'{bucket}/{name}'))
    assert np.array_equal(stored.representations(),
                          RepresentationStore.open(tmp_path / name).representations())

  quick = ['--no-compression', '--probe-epochs', '3', '--bootstrap-resamples', '50']
  assert cli.main(['analyze', '--train', f'{bucket}/train', '--eval', f'{bucket}/eval',
                   '--out', f'{bucket}/analysis', *quick]) == 0
  assert cli.main(['analyze', '--train', str(tmp_path / 'train'), '--eval',
                   str(tmp_path / 'eval'), '--out', str(tmp_path / 'analysis'), *quick]) == 0
  assert {'report.json', 'scores.npz', '.qscore-output.json'} <= set(_objects(f'{bucket}/analysis'))
  on_gcs = np.load(remote.pull(f'{bucket}/analysis') / 'scores.npz')
  local = np.load(tmp_path / 'analysis' / 'scores.npz')
  assert sorted(on_gcs.files) == sorted(local.files)
  for key in local.files:
    assert np.array_equal(on_gcs[key], local[key]), key
  assert 'synced gs://' in capsys.readouterr().err

  spec = (f'finetune:{TINY_FINETUNE},data_dir={tiny_data_dir},method=simclr,num_steps=2,'
          'checkpoint_every_steps=1')
  run = f'{bucket}/run'
  assert cli.main(['finetune', '--config', spec, '--workdir', run, '--stop-after', '1']) == 0
  after_one = _objects(run)
  assert 'run.json' in after_one and 'metrics.jsonl' in after_one
  assert any(name.startswith('checkpoints/1/') for name in after_one), after_one
  # The workdir's writer lock (a local flock and pid) stays on this machine.
  assert 'lock' in _files(remote.local_path(run))
  assert not [name for name in after_one if name.rsplit('/', 1)[-1] in remote.LOCAL_ONLY]
  pushed = {rel: file.read_bytes() for rel, file in _files(remote.local_path(run)).items()
            if rel.rsplit('/', 1)[-1] not in remote.LOCAL_ONLY}
  # Another machine: nothing cached. It resumes from the bucket, at step 1, from files
  # byte-identical to the ones pushed (a local resume is bit-exact: test_finetune_resume).
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(tmp_path / 'cache')
  pulled = remote.pull(run)
  assert {rel: file.read_bytes() for rel, file in _files(pulled).items()} == pushed
  capsys.readouterr()
  assert cli.main(['finetune', '--config', spec, '--workdir', run]) == 0
  assert f'(model: {run}/model)' in capsys.readouterr().out
  steps = [json.loads(line)['step'] for line in
           (remote.pull(run) / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [1, 2]
  after_two = _objects(run)
  assert any(name.startswith('checkpoints/2/') for name in after_two)
  assert 'model/metadata.json' in after_two and remote.LOCK not in after_two
  # The workdir's exported model is a model reference on gs:// too (only model/ is pulled).
  shutil.rmtree(tmp_path / 'cache')
  assert cli.main(['embed', run, *data, '--split', 'test', '--out', f'{bucket}/from-run']) == 0
  assert not (remote.local_path(run) / 'checkpoints').exists()
  assert RepresentationStore.open(remote.pull(f'{bucket}/from-run')).num_rows == 128


def test_a_folder_of_someone_elses_files_is_refused_and_left_as_it_was(bucket, tmp_path,
                                                                      capsys):
  fs, path = fsspec.core.url_to_fs(bucket)
  fs.pipe_file(f'{path}/theirs/notes.txt', b'not ours')
  assert cli.main(['analyze', '--train', f'{bucket}/theirs', '--eval', f'{bucket}/theirs',
                   '--out', f'{bucket}/theirs']) == 2
  assert capsys.readouterr().err
  assert _objects(f'{bucket}/theirs') == ['notes.txt']  # no manifest, no lock, nothing else


def test_a_url_that_is_not_there_or_not_a_model_is_a_clear_error(bucket, capsys):
  assert cli.main(['embed', f'{bucket}/no-model', '--dataset', 'synthetic_shapes/tiny',
                   '--split', 'test', '--out', f'{bucket}/x']) == 2
  assert 'is not a saved model (metadata.json missing)' in capsys.readouterr().err
  assert cli.main(['analyze', '--train', f'{bucket}/none', '--eval', f'{bucket}/none',
                   '--out', f'{bucket}/y']) == 2
  assert 'does not exist (or is empty)' in capsys.readouterr().err
  assert not remote.exists(f'{bucket}/x') and not remote.exists(f'{bucket}/y')  # nothing written

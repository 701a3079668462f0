"""Output directories (issue 17, finding 4): nothing is deleted, replaced or written into that
qscore_jax did not write; half-written outputs are invisible and cleaned up by the next run.

The finding tests go through the commands and look only at exit codes, messages and the
files on disk, so that they fail on a version without ``qscore_jax.outputs`` for the reason
they test, not for a missing import.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoint_factories as factories
from helpers import random_variables
from qscore_jax import cli
from qscore_jax.models import build_model, get_preprocessing, load_variables, save_model
from qscore_jax.store import RepresentationStore, ShardWriter

OPTIONS = {'width_multiplier': 0.25}
MARKER = '.qscore-output.json'
TINY = 'synthetic_shapes/tiny'


def _variables(seed=0):
  return random_variables(build_model('resnet18', **OPTIONS), (1, 32, 32, 3), seed=seed)


def _save(path, seed=0, **kwargs):
  return save_model(path, _variables(seed), arch='resnet18', arch_options=OPTIONS,
                    preprocessing=get_preprocessing('cifar'), **kwargs)


def _user_directory(path: pathlib.Path) -> dict[str, bytes]:
  """A directory of a user's own files; returns its contents."""
  (path / 'data').mkdir(parents=True)
  for i in range(6):
    (path / f'notes-{i}.txt').write_text(f'my notes {i}\n')
  (path / 'data' / 'results.csv').write_text('a,b\n1,2\n')
  (path / 'metadata.json').write_text('{"mine": true}\n')
  return _contents(path)


def _contents(path: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def _bit_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _no_staging_left(parent: pathlib.Path):
  assert not [p.name for p in parent.iterdir() if '.partial-' in p.name]


def _fake_store(path, *, rows=96, dim=16, seed=0, split='train'):
  """A complete store of random non-negative rows (no model needed)."""
  rng = np.random.default_rng(seed)
  writer = ShardWriter(path, shard_index=0, shard_count=1, rows=rows, dim=dim, first_id=0,
                       metadata={'model': 'fake', 'model_fingerprint': 'f' * 16, 'dataset': None,
                                 'split': split, 'split_size': rows})
  labels = np.arange(rows) % 3
  reps = np.maximum(rng.standard_normal((rows, dim)), 0) + np.eye(3, dim)[labels] * 3
  writer.append(reps.astype(np.float32), labels, np.arange(rows))
  return pathlib.Path(path)


@pytest.fixture(scope='module')
def solo_file(tmp_path_factory):
  return factories.solo(tmp_path_factory.mktemp('solo'))


@pytest.fixture(scope='module')
def two_models(tmp_path_factory):
  root = tmp_path_factory.mktemp('models')
  return [_save(root / f'r18-{seed}', seed=seed) for seed in (0, 1)]


# ------------------------------------------------------------------ qscore convert

def test_convert_overwrite_never_deletes_a_directory_of_user_files(tmp_path, solo_file, capsys):
  """Finding 4: `qscore convert --out P --overwrite` deleted any directory P."""
  user = tmp_path / 'mine'
  before = _user_directory(user)
  for extra in (['--overwrite'], []):
    assert cli.main(['convert', '--file', str(solo_file.path), '--out', str(user),
                     '--no-progress', *extra]) == 2
    error = capsys.readouterr().err
    assert 'was not written by qscore_jax' in error and 'it holds 8 files' in error, error
    assert 'notes-0.txt' in error and 'Choose another output directory (--out)' in error
    assert _contents(user) == before
  _no_staging_left(tmp_path)


def test_convert_replaces_its_own_model_only_with_overwrite(tmp_path, solo_file, capsys):
  out = tmp_path / 'converted'
  args = ['convert', '--file', str(solo_file.path), '--out', str(out), '--no-progress']
  assert cli.main(args) == 0
  assert json.loads((out / MARKER).read_text())['kind'] == 'model'
  assert cli.main(args) == 2
  error = capsys.readouterr().err
  assert 'already holds a saved model' in error and 'pass --overwrite' in error, error
  assert cli.main(args + ['--overwrite']) == 0
  assert json.loads((out / 'metadata.json').read_text())['method'] == 'solo-learn'
  _no_staging_left(tmp_path)


# ------------------------------------------------------------------ save_model

def test_overwrite_replaces_only_models_the_tool_wrote(tmp_path):
  path = _save(tmp_path / 'm', seed=0)
  _save(path, seed=1, overwrite=True)  # marked: replaced
  _bit_equal(load_variables(path), _variables(1))
  (path / MARKER).unlink(missing_ok=True)  # an older version's model: its exact layout
  _save(path, seed=2, overwrite=True)
  _bit_equal(load_variables(path), _variables(2))
  # One file of the user's beside an older version's model: not the tool's directory.
  (path / MARKER).unlink(missing_ok=True)
  (path / 'my-notes.txt').write_text('keep me')
  before = _contents(path)
  with pytest.raises(FileExistsError, match=r'not written by qscore_jax.*my-notes\.txt'):
    _save(path, seed=3, overwrite=True)
  assert _contents(path) == before
  _no_staging_left(tmp_path)


def test_a_directory_marked_as_another_kind_is_not_replaced(tmp_path):
  store = _fake_store(tmp_path / 'store')
  before = _contents(store)
  with pytest.raises(FileExistsError, match='holds a representation store written by '
                                            'qscore_jax, not a saved model'):
    _save(store, overwrite=True)
  assert _contents(store) == before
  assert RepresentationStore.open(store).num_rows == 96


def test_a_failed_replacement_keeps_the_old_model(tmp_path, monkeypatch):
  from qscore_jax.models import weights  # pylint: disable=import-outside-toplevel
  path = _save(tmp_path / 'm', seed=0)

  def broken(target, tree):
    raise OSError('disk full')

  monkeypatch.setattr(weights, '_save_tree', broken)
  with pytest.raises(OSError, match='disk full'):
    _save(path, seed=1, overwrite=True)
  monkeypatch.undo()
  _bit_equal(load_variables(path), _variables(0))
  _no_staging_left(tmp_path)


# ------------------------------------------------------------------ qscore train-supervised

def test_train_supervised_refuses_user_files_before_training(tmp_path, tiny_data_dir, capsys):
  user = tmp_path / 'mine'
  before = _user_directory(user)
  assert cli.main(['train-supervised', '--dataset', TINY, '--data-dir', tiny_data_dir,
                   '--arch-option', 'width_multiplier=0.0625', '--steps', '1',
                   '--batch-size', '8', '--out', str(user), '--overwrite']) == 2
  printed = capsys.readouterr()
  assert 'was not written by qscore_jax' in printed.err and 'step' not in printed.out
  assert _contents(user) == before


# ------------------------------------------------------------------ qscore analyze

def test_analyze_refuses_user_files_and_replaces_its_report_only_with_overwrite(tmp_path, capsys):
  """`qscore analyze --out P` wrote report.json, scores.npz and plots into any P."""
  train = _fake_store(tmp_path / 'train', seed=0)
  test = _fake_store(tmp_path / 'test', seed=1, split='test')
  base = ['analyze', '--train', str(train), '--eval', str(test), '--probe-epochs', '2',
          '--no-compression']
  user = tmp_path / 'mine'
  before = _user_directory(user)
  assert cli.main(base + ['--out', str(user)]) == 2
  error = capsys.readouterr().err
  assert 'was not written by qscore_jax' in error and 'notes-0.txt' in error, error
  assert _contents(user) == before

  out = tmp_path / 'report'
  assert cli.main(base + ['--out', str(out)]) == 0
  first = json.loads((out / 'report.json').read_text())
  assert json.loads((out / MARKER).read_text())['kind'] == 'analysis'
  capsys.readouterr()
  assert cli.main(base + ['--out', str(out), '--knn-k', '3']) == 2
  assert 'already holds an analysis report' in capsys.readouterr().err
  assert json.loads((out / 'report.json').read_text()) == first
  assert cli.main(base + ['--out', str(out), '--knn-k', '3', '--overwrite']) == 0
  assert json.loads((out / 'report.json').read_text())['options']['knn_k'] == 3
  _no_staging_left(tmp_path)


# ------------------------------------------------------------------ qscore embed

def test_embed_overwrite_replaces_a_store_and_nothing_else(tmp_path, tiny_data_dir, two_models,
                                                           capsys):
  out = tmp_path / 'store'
  args = ['embed', '--dataset', TINY, '--split', 'test', '--out', str(out), '--data-dir',
          tiny_data_dir, '--batch-size', '64', '--no-progress']
  assert cli.main([*args[:1], str(two_models[0]), *args[1:]]) == 0
  first = RepresentationStore.open(out).metadata['model_fingerprint']
  assert cli.main([*args[:1], str(two_models[1]), *args[1:]]) == 2  # another run: refused
  capsys.readouterr()
  assert cli.main([*args[:1], str(two_models[1]), *args[1:], '--overwrite']) == 0
  store = RepresentationStore.open(out)
  assert store.num_rows == 128 and store.metadata['model_fingerprint'] != first
  assert json.loads((out / MARKER).read_text())['kind'] == 'store'
  _no_staging_left(tmp_path)

  user = tmp_path / 'mine'
  before = _user_directory(user)
  assert cli.main([*args[:1], str(two_models[1]), *args[1:6], str(user), *args[7:],
                   '--overwrite']) == 2
  assert 'was not written by qscore_jax' in capsys.readouterr().err
  assert _contents(user) == before


# ------------------------------------------------------------------ qscore interpret

def test_interpret_refuses_user_files_before_embedding(tmp_path, tiny_data_dir, two_models,
                                                       capsys):
  user = tmp_path / 'mine'
  before = _user_directory(user)
  assert cli.main(['interpret', str(two_models[0]), '--dataset', TINY, '--out', str(user),
                   '--data-dir', tiny_data_dir, '--stage', 'layer3', '--probe-epochs', '2',
                   '--batch-size', '64', '--no-progress']) == 2
  assert 'was not written by qscore_jax' in capsys.readouterr().err
  assert _contents(user) == before
  assert sorted(p.name for p in user.iterdir()) == ['data', 'metadata.json'] + [
      f'notes-{i}.txt' for i in range(6)]


# ------------------------------------------------------------------ qscore finetune

def test_finetune_refuses_a_workdir_of_user_files(tmp_path, tiny_data_dir, capsys):
  """orbax prunes numbered checkpoints in <workdir>/checkpoints: never in a foreign one."""
  user = tmp_path / 'mine'
  before = _user_directory(user)
  (user / 'checkpoints' / '100').mkdir(parents=True)
  (user / 'checkpoints' / '100' / 'weights.bin').write_bytes(b'another tool')
  before = _contents(user)
  config = ('finetune:dataset=synthetic_shapes/tiny,batch_size=16,'
            f'arch_options.width_multiplier=0.0625,data_dir={tiny_data_dir},progress=false')
  assert cli.main(['finetune', '--config', config, '--workdir', str(user),
                   '--stop-after', '1']) == 2
  error = capsys.readouterr().err
  assert 'was not written by qscore_jax' in error and '(--workdir)' in error, error
  assert _contents(user) == before


# ------------------------------------------------------------------ older versions' outputs

def test_outputs_of_older_versions_are_recognised_strictly(tmp_path):
  from qscore_jax import analysis, outputs  # pylint: disable=import-outside-toplevel
  model = _save(tmp_path / 'model')
  store = _fake_store(tmp_path / 'store')
  report = tmp_path / 'report'
  split = analysis.Split.from_store(store)
  analysis.analyze(split, split, report, plots=False,
                   config=analysis.AnalysisConfig(compression=None,
                                                  probe=analysis.ProbeConfig(epochs=1)))
  workdir = tmp_path / 'workdir'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'run.json').write_text(json.dumps({'config': {}, 'init': 'random'}))
  for path, kind in ((model, 'model'), (store, 'store'), (report, 'analysis'),
                     (workdir, 'finetune')):
    (path / MARKER).unlink(missing_ok=True)
    if kind == 'store':  # as format 1 (before markers, checksums and locks) wrote it
      meta = json.loads((path / 'metadata.json').read_text())
      (path / 'metadata.json').write_text(json.dumps({**meta, 'format_version': 1}))
      for extra in ('checksums.jsonl', 'lock'):
        for file in path.glob(f'shard-*/{extra}'):
          file.unlink()
    assert outputs.check_output(path, kind, overwrite=True) == 'existing'
    others = [k for k in outputs.KINDS if k != kind]
    with pytest.raises(outputs.OutputError, match='older qscore_jax'):
      outputs.check_output(path, others[0], overwrite=True)
    (path / 'stray.txt').write_text('x')
    with pytest.raises(outputs.OutputError, match=r'not written by qscore_jax.*stray\.txt'):
      outputs.check_output(path, kind, overwrite=True)
    (path / 'stray.txt').unlink()
  # A directory of the tool's outputs only (a notebook's stores) may receive an interpretation.
  container = tmp_path / 'container'
  container.mkdir()
  store.rename(container / 'store_reference')
  assert outputs.prepare_output(container, 'interpretation') == 'new'
  assert outputs.read_marker(container)['kind'] == 'interpretation'


# ------------------------------------------------------------------ half-written outputs

KILLED = r"""
import os, pathlib, signal, sys, time
sys.path.insert(0, sys.argv[3])
from helpers import random_variables
from qscore_jax.models import build_model, save_model, weights
mode, target = sys.argv[1], pathlib.Path(sys.argv[2])
variables = random_variables(build_model('resnet18', width_multiplier=0.25), (1, 32, 32, 3))
save = lambda **kw: save_model(target, variables, arch='resnet18',
                               arch_options={'width_multiplier': 0.25}, **kw)
if mode == 'hang':  # killed while writing the new model
  original = weights._save_tree
  def hanging(path, tree):
    original(path, tree)
    print('staged', flush=True)
    time.sleep(600)
  weights._save_tree = hanging
  save()
else:  # killed just before the complete new model is renamed into place
  save()
  rename = os.rename
  def dying(src, dst):
    if pathlib.Path(dst) == target.resolve():
      os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
  os.rename = dying
  save(overwrite=True)
"""


def _killed_save(mode, target):
  tests = str(pathlib.Path(__file__).parent)
  return subprocess.Popen([sys.executable, '-c', KILLED, mode, str(target), tests],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_staging_of_a_killed_save_is_cleaned_by_the_next_save_and_a_live_one_kept(tmp_path,
                                                                                   capsys):
  """Finding 4: kill -9 during `convert` left `.<name>.partial-*` (100 MB) behind forever."""
  process = _killed_save('hang', tmp_path / 'big')
  try:
    assert process.stdout.readline().strip() == 'staged', process.stderr.read()[-3000:]
    staging = [p for p in tmp_path.iterdir() if p.name.startswith('.big.partial-')]
    assert len(staging) == 1
    _save(tmp_path / 'other')  # the writer is alive: its staging directory is kept
    assert staging[0].is_dir()
    process.send_signal(signal.SIGKILL)  # kill -9
    process.wait(timeout=60)
  finally:
    process.kill()
    process.communicate()
  assert staging[0].is_dir() and not (tmp_path / 'big').exists()
  capsys.readouterr()
  _save(tmp_path / 'third')
  assert not staging[0].exists() and not (tmp_path / 'big').exists()
  note = capsys.readouterr().err
  assert f'removed {staging[0]}' in note and 'no longer running' in note, note
  assert sorted(p.name for p in tmp_path.iterdir()) == ['other', 'third']


def test_a_replacement_killed_before_its_last_rename_gives_the_old_model_back(tmp_path, capsys):
  """A replacement must not lose the old output before the new one is in place."""
  process = _killed_save('between', tmp_path / 'm')
  process.communicate(timeout=300)
  assert process.returncode == -signal.SIGKILL
  assert not (tmp_path / 'm').exists()  # killed after the old model was moved (or deleted)
  _save(tmp_path / 'other')
  assert f'restored {tmp_path / "m"}' in capsys.readouterr().err
  _bit_equal(load_variables(tmp_path / 'm'), _variables(0))
  _no_staging_left(tmp_path)

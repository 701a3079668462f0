"""Torture tests of the representation store (issue 17, finding 3): damage a store the way
disks, editors and killed or concurrent processes do, and check that every read gives a
clear error naming the file (and rows), or a correct result: never a wrong number.

Each damage is applied to a fresh, complete two-shard store written through
:class:`~qscore_jax.store.ShardWriter` (3 checksummed blocks per shard), then the store is
opened and both streaming passes are run over it, as ``qscore analyze`` does.

The checkpoint half of the torture test (truncation, flipped bytes, deleted files and
items, garbage metadata, every checkpoint damaged, a second run in the same workdir) is
``tests/test_finetune_resume.py``, next to the fine-tuning loop it protects.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import xxhash

from qscore_jax import cli, streaming
from qscore_jax import store as store_lib
from qscore_jax.store import (BLOCK_ROWS, LOCK_FILE, RepresentationStore, ShardWriter,
                              StoreError, shard_name)

DIM = 16
SHARD_ROWS = (2 * BLOCK_ROWS + 300, 2 * BLOCK_ROWS + 200)  # the last block of each is short
META = {'model': 'm', 'model_fingerprint': 'sha256:0', 'dataset': 'd', 'split': 'train',
        'split_size': sum(SHARD_ROWS), 'preprocessing': None, 'image_size': None}


def _data(rows=sum(SHARD_ROWS)):
  rng = np.random.default_rng(0)
  return (np.maximum(rng.standard_normal((rows, DIM)), 0).astype(np.float32),
          rng.integers(0, 10, rows).astype(np.int32))


def _write(path, pieces=(700, 1500, 1)):
  """A complete store at ``path``, each shard written in appends of ``pieces`` rows."""
  reps, labels = _data()
  first = 0
  for index, rows in enumerate(SHARD_ROWS):
    with ShardWriter(path, shard_index=index, shard_count=2, rows=rows, dim=DIM, first_id=first,
                     metadata=META) as writer:
      start = first
      for size in pieces * 10:
        stop = min(start + size, first + rows)
        if stop > start:
          writer.append(reps[start:stop], labels[start:stop], np.arange(start, stop))
        start = stop
      assert writer.complete
    first += rows
  return path


def _analyze(path):
  """Opens the store and runs both streaming passes, as `qscore analyze` does."""
  store = RepresentationStore.open(path)
  feature = streaming.feature_stats(store, chunk_rows=BLOCK_ROWS * 2)
  return store.labels, streaming.sample_scores(store, feature, chunk_rows=BLOCK_ROWS * 2)


def _shard(path, index=0):
  return path / shard_name(index, 2)


def _flip(file, position):
  with open(file, 'r+b') as f:
    f.seek(position)
    byte = f.read(1)
    f.seek(position)
    f.write(bytes([byte[0] ^ 0x10]))


def _data_offset(file):
  with open(file, 'rb') as f:
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_2_0(f)
    return f.tell()


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """An undamaged store and the results of analysing it."""
  path = _write(tmp_path_factory.mktemp('pristine') / 'store')
  return path, _analyze(path)


@pytest.fixture
def store(tmp_path, pristine):
  """A fresh copy of the pristine store, to damage."""
  import shutil  # pylint: disable=import-outside-toplevel
  return pathlib.Path(shutil.copytree(pristine[0], tmp_path / 'store'))


def test_an_intact_store_reads_back_exactly(pristine):
  path, (labels, scores) = pristine
  reps, expected_labels = _data()
  store = RepresentationStore.open(path)
  assert store.verify() == len(reps)
  np.testing.assert_array_equal(store.representations(), reps)
  np.testing.assert_array_equal(labels, expected_labels)
  # Reads that do not start or end on a block boundary are verified too, and exact.
  out = np.empty((BLOCK_ROWS + 77, DIM), np.float32)
  assert store.read_rows(BLOCK_ROWS - 5, out) == len(out)
  np.testing.assert_array_equal(out, reps[BLOCK_ROWS - 5:2 * BLOCK_ROWS + 72])
  assert np.isfinite(scores['qscore']).all()


def _cached(file, offset, length):
  """Whether the page cache holds ``file``'s bytes [offset, offset + length)."""
  fd = os.open(file, os.O_RDONLY)
  try:
    return os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT) == length
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


@pytest.mark.parametrize('rows', [2 * BLOCK_ROWS, 256, sum(SHARD_ROWS)])
def test_streaming_chunks_read_exactly_by_every_path(pristine, tmp_path, monkeypatch, rows):
  """read_chunk (direct from the disk, from the page cache, or buffered where a chunk spans
  shards or starts off a block) gives exactly the rows, 64-byte aligned; without O_DIRECT
  it falls back to buffered reads, with the same rows."""
  import shutil  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(shutil.copytree(pristine[0], tmp_path / 'store'))
  reps, _ = _data()
  data = _shard(path) / 'representations.npy'

  def read_all():
    store = RepresentationStore.open(path)
    for first in range(0, len(reps), rows):
      values, count = store.read_chunk(first, store_lib.landing_buffer(rows, DIM), rows)
      assert values.shape == (rows, DIM) and values.ctypes.data % 64 == 0
      np.testing.assert_array_equal(values[:count], reps[first:first + count])
      assert count == min(rows, len(reps) - first)

  fd = os.open(data, os.O_RDONLY)
  os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  os.close(fd)
  evicted = not _cached(data, _data_offset(data), 2 * BLOCK_ROWS * DIM * 4)
  fd = os.open(data, os.O_RDONLY)
  assert store_lib._in_page_cache(fd, 0, data.stat().st_size) is not evicted  # pylint: disable=protected-access
  os.close(fd)
  read_all()
  if evicted and rows == 2 * BLOCK_ROWS and store_lib._read_direct_range(  # pylint: disable=protected-access
      data, memoryview(store_lib.landing_buffer(1, DIM))[:store_lib.DIRECT_ALIGNMENT], 0):
    # The first chunk was read with O_DIRECT: the page cache still does not hold it.
    assert not _cached(data, _data_offset(data), 2 * BLOCK_ROWS * DIM * 4)
  read_all()
  np.fromfile(data, np.uint8)  # every page in the page cache: copied from it
  fd = os.open(data, os.O_RDONLY)
  assert store_lib._in_page_cache(fd, 0, data.stat().st_size)  # pylint: disable=protected-access
  os.close(fd)
  read_all()
  monkeypatch.setattr(store_lib, '_in_page_cache', lambda *args: False)  # O_DIRECT, cached or not
  read_all()
  monkeypatch.setattr(store_lib, '_read_direct_range', lambda *args: 0)  # a file system without it
  read_all()
  monkeypatch.delattr(os, 'O_DIRECT')  # another OS: read_rows
  read_all()


def test_a_file_truncated_while_it_is_read_is_an_error(store):
  """A representations file cut short after the store was opened (by another process)."""
  opened = RepresentationStore.open(store)
  data = _shard(store) / 'representations.npy'
  os.truncate(data, _data_offset(data) + (BLOCK_ROWS + 10) * DIM * 4)
  with pytest.raises(StoreError, match=r'representations.npy is truncated: row 1034 cannot'):
    opened.read_chunk(0, store_lib.landing_buffer(2 * BLOCK_ROWS, DIM), 2 * BLOCK_ROWS)


# Each damage: (what is done to the store, the error it must give, a regex).
DAMAGES = {
    'flipped byte in representations (second block)': (
        lambda s: _flip(_shard(s) / 'representations.npy',
                        _data_offset(_shard(s) / 'representations.npy') + (BLOCK_ROWS + 3) * DIM * 4),
        rf'representations.npy rows {BLOCK_ROWS}-{2 * BLOCK_ROWS - 1} .*do not match their checksum'),
    'flipped byte in representations (short last block, second shard)': (
        lambda s: _flip(_shard(s, 1) / 'representations.npy',
                        _data_offset(_shard(s, 1) / 'representations.npy')
                        + (SHARD_ROWS[1] - 1) * DIM * 4),
        rf'rows {2 * BLOCK_ROWS}-{SHARD_ROWS[1] - 1} \(store rows '
        rf'{SHARD_ROWS[0] + 2 * BLOCK_ROWS}-{sum(SHARD_ROWS) - 1}\) do not match'),
    'flipped byte in labels': (
        lambda s: _flip(_shard(s) / 'labels.npy', _data_offset(_shard(s) / 'labels.npy') + 8),
        r'labels.npy rows 0-1023 .*do not match their checksum'),
    'flipped byte in ids': (
        lambda s: _flip(_shard(s, 1) / 'ids.npy', _data_offset(_shard(s, 1) / 'ids.npy') + 8),
        r'ids.npy rows 0-1023 .*do not match their checksum'),
    'truncated representations': (
        lambda s: os.truncate(_shard(s) / 'representations.npy',
                              (_shard(s) / 'representations.npy').stat().st_size - 100),
        r'representations.npy is truncated: \d+ bytes, its header says \d+'),
    'truncated labels': (
        lambda s: os.truncate(_shard(s) / 'labels.npy', 1000),
        r'labels.npy is truncated'),
    'labels emptied': (
        lambda s: os.truncate(_shard(s) / 'labels.npy', 0),
        r'labels.npy is damaged: its .npy header cannot be read'),
    'ids deleted': (
        lambda s: (_shard(s, 1) / 'ids.npy').unlink(),
        r'ids.npy is missing'),
    'empty progress.json': (
        lambda s: (_shard(s) / 'progress.json').write_text(''),
        r'progress.json \(the shard.s committed row count\) is damaged .*delete .*shard-00000'),
    'progress.json says more rows than the shard has': (
        lambda s: (_shard(s) / 'progress.json').write_text('{"rows": 999999}'),
        r'progress.json is damaged'),
    'garbled metadata.json': (
        lambda s: (s / 'metadata.json').write_text('{"model": '),
        r'metadata.json \(the store.s metadata\) is damaged'),
    'checksums deleted': (
        lambda s: (_shard(s) / 'checksums.jsonl').unlink(),
        r'checksums of 0 blocks .* has 3 committed blocks'),
    'checksum line damaged': (
        lambda s: (_shard(s) / 'checksums.jsonl').write_text(
            (_shard(s) / 'checksums.jsonl').read_text().replace('"block": 1', '"block": "x"')),
        r'checksums.jsonl line 2 .*rows 1024-2047.* is damaged'),
}


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_damage_gives_a_clear_error_never_a_number(store, damage):
  apply, message = DAMAGES[damage]
  apply(store)
  with pytest.raises(StoreError, match=message):
    _analyze(store)


def test_a_duplicated_id_is_named_even_when_its_checksum_was_updated(store):
  """Checksums catch accidental damage; the ids are also checked for meaning: each row of
  the split exactly once (a store assembled by hand, say, with its checksums recomputed)."""
  ids_file = _shard(store, 1) / 'ids.npy'
  ids = np.load(ids_file)
  ids[5] = ids[4]
  np.save(ids_file, ids)
  lines = [json.loads(line) for line in (_shard(store, 1) / 'checksums.jsonl').read_text().splitlines()]
  lines[0]['ids.npy'] = xxhash.xxh3_64_intdigest(ids[:BLOCK_ROWS].tobytes())
  (_shard(store, 1) / 'checksums.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  first = SHARD_ROWS[0]
  with pytest.raises(StoreError, match=rf'ids \[{first + 4}\] appear more than once'):
    _analyze(store)


def test_the_cli_reports_damage_with_exit_status_2(store, tmp_path, capsys):
  DAMAGES['flipped byte in representations (second block)'][0](store)
  out = tmp_path / 'report'
  assert cli.main(['analyze', '--train', str(store), '--eval', str(store), '--out', str(out),
                   '--probe-epochs', '1', '--no-compression']) == 2
  error = capsys.readouterr().err
  assert 'do not match their checksum' in error and 'Traceback' not in error, error
  assert not (out / 'report.json').exists()


# --------------------------------------------------------------- writers, crashes, locks

def test_a_crash_between_checksums_and_progress_resumes_exactly(tmp_path):
  """Killed after a block's checksum line (or half of it) was written but before the
  progress that commits it: the resumed writer drops the line and the store verifies."""
  reps, labels = _data()
  rows = SHARD_ROWS[0]
  path = tmp_path / 'store'
  meta = {**META, 'split_size': rows}
  with ShardWriter(path, shard_index=0, shard_count=1, rows=rows, dim=DIM, first_id=0,
                   metadata=meta) as writer:
    writer.append(reps[:1500], labels[:1500], np.arange(1500))
  shard = path / shard_name(0, 1)
  committed = (shard / 'progress.json').read_text()
  with ShardWriter(path, shard_index=0, shard_count=1, rows=rows, dim=DIM, first_id=0,
                   metadata=meta) as writer:
    writer.append(reps[1500:2100], labels[1500:2100], np.arange(1500, 2100))
  (shard / 'progress.json').write_text(committed)  # as if killed before this commit
  with open(shard / 'checksums.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"block": 2, "represent')  # and mid-way through a later line
  with ShardWriter(path, shard_index=0, shard_count=1, rows=rows, dim=DIM, first_id=0,
                   metadata=meta) as writer:
    assert writer.done == 1500
    writer.append(reps[1500:rows], labels[1500:rows], np.arange(1500, rows))
  store = RepresentationStore.open(path)
  assert store.verify() == rows
  np.testing.assert_array_equal(store.representations(), reps[:rows])


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
  meta = {**META, 'split_size': 10}
  with ShardWriter(tmp_path, shard_index=0, shard_count=1, rows=10, dim=DIM, first_id=0,
                   metadata=meta):
    with pytest.raises(StoreError, match=rf'in use by pid {os.getpid()} on .*another `qscore embed`'):
      ShardWriter(tmp_path, shard_index=0, shard_count=1, rows=10, dim=DIM, first_id=0,
                  metadata=meta)
  # Released cleanly: the next writer takes it without a word.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    ShardWriter(tmp_path, shard_index=0, shard_count=1, rows=10, dim=DIM, first_id=0,
                metadata=meta).close()


HOLDER = textwrap.dedent('''
    import sys, time, numpy as np
    from qscore_jax.store import ShardWriter
    meta = {'split_size': 3000, 'model': 'm', 'dataset': 'd', 'split': 'train'}
    writer = ShardWriter(sys.argv[1], shard_index=0, shard_count=1, rows=3000, dim=4,
                         first_id=0, metadata=meta)
    writer.append(np.ones((1100, 4), np.float32), np.zeros(1100, np.int32), np.arange(1100))
    print('ready', flush=True)
    time.sleep(120)
''')


def test_a_live_writer_in_another_process_blocks_and_a_killed_one_is_taken_over(tmp_path):
  path = tmp_path / 'store'
  holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(path)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'ready'
    meta = {'split_size': 3000, 'model': 'm', 'dataset': 'd', 'split': 'train'}
    args = dict(shard_index=0, shard_count=1, rows=3000, dim=4, first_id=0, metadata=meta)
    with pytest.raises(StoreError, match=rf'in use by pid {holder.pid}'):
      ShardWriter(path, **args)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((path / shard_name(0, 1) / LOCK_FILE).read_text())['pid'] == holder.pid
    with pytest.warns(UserWarning, match=rf'taking over the lock of pid {holder.pid}'):
      writer = ShardWriter(path, **args)
    with writer:
      assert writer.done == 1100
      writer.append(np.full((1900, 4), 2, np.float32), np.zeros(1900, np.int32),
                    np.arange(1100, 3000))
    store = RepresentationStore.open(path)
    assert store.verify() == 3000
    assert store.representations()[1099, 0] == 1 and store.representations()[1100, 0] == 2
  finally:
    holder.kill()
    holder.wait()

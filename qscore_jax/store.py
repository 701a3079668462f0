"""Representation stores: embeddings of a dataset split on disk, one shard per process.

Layout::

    <store>/
      metadata.json                      model id, dataset, split, preprocessing, d,
                                         split size, number of shards, ...
      shard-00000-of-00002/
        representations.npy              float32 (rows, d), a memory-mapped .npy
        labels.npy                       int32 (rows,)
        ids.npy                          int64 (rows,): index of each row in the split
        checksums.jsonl                  one line per block of BLOCK_ROWS committed rows: the
                                         XXH3-64 hash of each column's bytes in that block
        progress.json                    {"rows": k}: rows 0..k-1 are final
        lock                             held (flock) by the process writing the shard

Process ``p`` owns shard ``p``, the contiguous id range it embeds (see
:func:`qscore_jax.data.shard_bounds`), so the shards concatenated in order hold
the split in id order, whatever the number of processes. The arrays are
preallocated; rows are written in place and ``progress.json`` is replaced
atomically after each flush, so a killed run resumes exactly after the last
committed row: no gap, no duplicate. Readers stream fixed-size chunks with
plain file reads, so memory stays bounded whatever N.

Integrity: a block's checksums are written (and synced) after its data and
before the progress that commits it. Opening a store checks every file's size,
parses every header and verifies the labels and ids (unique, the shard's id
range) against their checksums; the representations are verified block by
block as they are read, so a damaged block stops the pass that reaches it with
the file and row range, before any result exists. :meth:`RepresentationStore.verify`
checks everything in one pass.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import mmap
import os
import pathlib
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import xxhash

from qscore_jax import outputs

METADATA_FILE = 'metadata.json'
PROGRESS_FILE = 'progress.json'
CHECKSUM_FILE = 'checksums.jsonl'
LOCK_FILE = 'lock'
# Version 2 added the checksums and the lock; version 1 stores are read without checksums.
FORMAT_VERSION = 2
# Rows per checksummed block. The readers' chunk sizes are multiples of it, so verifying
# costs no extra reads.
BLOCK_ROWS = 1024
# Reads that bypass the page cache (O_DIRECT) start, end and land on this boundary.
DIRECT_ALIGNMENT = 4096
COLUMNS = (('representations.npy', np.float32), ('labels.npy', np.int32), ('ids.npy', np.int64))


class StoreError(ValueError):
  """A representation store is missing, incomplete or inconsistent."""


# The metadata fields that determine a store's rows: a store is resumed or reused only when
# every one of them is the same (the model's weights by their content fingerprint; the
# preprocessing and image size that make the pixels).
MODEL_FIELDS = ('model', 'model_fingerprint', 'arch', 'arch_options', 'compute_dtype',
                'compute_path', 'preprocessing', 'image_size', 'dim')
# What a field means in the metadata of a store written before it was recorded.
LEGACY_DEFAULTS = {'compute_dtype': 'float32', 'compute_path': 'standard'}
RUN_FIELDS = MODEL_FIELDS + ('dataset', 'dataset_version', 'split', 'split_size', 'shard_count')


def differences(first: Mapping[str, Any], second: Mapping[str, Any],
                fields: tuple[str, ...] = RUN_FIELDS) -> dict[str, tuple[Any, Any]]:
  """``{field: (first's value, second's value)}`` for the ``fields`` where two store
  metadata dicts differ (a field missing from one counts as None).

  Args:
    first: one store's metadata (or the stored run's).
    second: the other's (or the requested run's).
    fields: the fields compared (default :data:`RUN_FIELDS`).
  """
  def get(metadata, key):
    return metadata.get(key, LEGACY_DEFAULTS.get(key))
  return {k: (get(first, k), get(second, k)) for k in fields if get(first, k) != get(second, k)}


def describe_differences(diff: Mapping[str, tuple[Any, Any]], first: str, second: str) -> str:
  """The fields of :func:`differences` in words, e.g. ``image_size: stored None, now 64``.

  Args:
    diff: :func:`differences`' result.
    first: what to call the first values (``'stored'``, ``'reference'``).
    second: what to call the second values.
  """
  return '; '.join(f'{k}: {first} {a!r}, {second} {b!r}' for k, (a, b) in diff.items())


def check_same_model(reference: 'RepresentationStore', evaluated: 'RepresentationStore') -> None:
  """Refuses a reference and an evaluated store made by different models or preprocessing.

  D, the probe and the Q-Scores are only meaningful within one representation space: the
  reference split's features must be the evaluated split's. The datasets may differ (e.g.
  ImageNet train as the reference of Salient ImageNet).

  Args:
    reference: the store giving D and training the probe.
    evaluated: the store that is scored.
  Raises:
    StoreError: naming the fields that differ (the weights' fingerprints among them).
  """
  diff = differences(reference.metadata, evaluated.metadata, MODEL_FIELDS)
  if reference.metadata.get('model_fingerprint') and evaluated.metadata.get('model_fingerprint'):
    diff.pop('model', None)  # the same weights saved in two places are the same model
  if diff:
    raise StoreError(
        f'the reference store {reference.path} and the evaluated store {evaluated.path} hold '
        f'representations of different models or inputs ({describe_differences(diff, "reference", "evaluated")}); '
        'D, the probe and the Q-Scores need both splits embedded by the same model with the '
        'same preprocessing. Embed both with one model.')


def shard_name(index: int, count: int) -> str:
  """The directory name of shard ``index`` of ``count``: ``shard-00000-of-00002``.

  Args:
    index: the shard (process) index.
    count: the number of shards.
  """
  return f'shard-{index:05d}-of-{count:05d}'


_REEMBED = ('Embed the split again: the same `qscore embed` command with --overwrite, or with '
            'another --out.')


def _read_json(path: pathlib.Path, what: str, remedy: str) -> Any:
  """``path``'s JSON, or a StoreError naming the file, what it is and ``remedy``."""
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise StoreError(f'{path} ({what}) is missing. {remedy}') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise StoreError(f'{path} ({what}) is damaged and cannot be read ({error}). {remedy}') from None


def _read_progress(shard: pathlib.Path, allocated: int | None = None) -> int:
  """The committed rows of a shard (0 when it has not started)."""
  path = shard / PROGRESS_FILE
  if not path.exists():
    return 0
  remedy = (f'The committed rows of this shard are unknown; delete {shard} and run the same '
            '`qscore embed` command again to embed that shard afresh.')
  progress = _read_json(path, 'the shard\'s committed row count', remedy)
  rows = progress.get('rows') if isinstance(progress, dict) else None
  if not isinstance(rows, int) or rows < 0 or (allocated is not None and rows > allocated):
    raise StoreError(f'{path} is damaged: it says {progress!r}, not {{"rows": k}} with '
                     f'0 <= k <= {allocated}. {remedy}')
  return rows


# XXH3-64: about 25 GB/s on one core here (CRC-32: 6), so verifying a chunk costs a
# small fraction of reading it.
CHECKSUM = 'xxh3_64'


def _bytes(array: np.ndarray) -> memoryview:
  return memoryview(np.ascontiguousarray(array)).cast('B')


def _checksum_of(array: np.ndarray) -> int:
  """The checksum (XXH3-64) of an array's bytes."""
  return xxhash.xxh3_64_intdigest(_bytes(array))


def _read_checksums(shard: pathlib.Path, blocks: int, *, strict: bool) -> list[dict[str, int]]:
  """The first ``blocks`` checksum lines of a shard.

  Lines past them (written before a crash, before their progress) are ignored; a missing or
  unreadable line among the first ``blocks`` raises StoreError when ``strict``, and ends the
  list otherwise (the writer then rewrites the file from there).
  """
  path = shard / CHECKSUM_FILE
  lines = path.read_text(encoding='utf-8').splitlines() if path.exists() else []
  found = []
  for i, line in enumerate(lines[:blocks]):
    try:
      entry = json.loads(line)
      ok = isinstance(entry, dict) and entry.get('block') == i and all(
          isinstance(entry.get(name), int) for name, _ in COLUMNS)
    except json.JSONDecodeError:
      ok = False
    if not ok:
      if strict:
        raise StoreError(f'{path} line {i + 1} (the checksums of rows {i * BLOCK_ROWS}-'
                         f'{(i + 1) * BLOCK_ROWS - 1}) is damaged, so those rows cannot be '
                         f'verified. {_REEMBED}')
      break
    found.append(entry)
  if strict and len(found) < blocks:
    raise StoreError(f'{path} holds the checksums of {len(found)} blocks of rows, but the shard '
                     f'has {blocks} committed blocks: the file was truncated. {_REEMBED}')
  return found


def _blocks(rows: int, allocated: int) -> int:
  """Checksummed blocks of a shard with ``rows`` committed of ``allocated``: the complete
  blocks, plus the short last one once the shard is complete."""
  return rows // BLOCK_ROWS + (1 if rows == allocated and rows % BLOCK_ROWS else 0)


class ShardWriter:
  """Writes one process's rows into its preallocated shard, resumably.

  Creating it locks the shard (:class:`StoreError` if another writer holds it),
  preallocates (or checks) the shard's files and reads its progress; ``done``
  is then the number of rows already committed. Use it as a context manager, or
  call :meth:`close`, to release the lock.

  Args:
    directory: the store directory (created).
    shard_index: this process's shard.
    shard_count: number of shards (processes).
    rows: rows of this shard (its id range's length).
    dim: d, the representation size.
    first_id: id of the shard's first row.
    metadata: the store's metadata (model, dataset, split, split_size,
      preprocessing, ...), written by the first writer and compared with an
      existing store's (``StoreError`` when it belongs to another run).
  """

  def __init__(self, directory: str | pathlib.Path, *, shard_index: int, shard_count: int,
               rows: int, dim: int, first_id: int, metadata: Mapping[str, Any]):
    self.root = pathlib.Path(directory).expanduser().resolve()
    self.path = self.root / shard_name(shard_index, shard_count)
    self.rows, self.dim, self.first_id = rows, dim, first_id
    self.root.mkdir(parents=True, exist_ok=True)
    self._check_metadata(json.loads(json.dumps(
        {**metadata, 'format_version': FORMAT_VERSION, 'dim': dim, 'shard_count': shard_count,
         'checksum': CHECKSUM, 'checksum_block_rows': BLOCK_ROWS})))  # as it reads back
    self.path.mkdir(exist_ok=True)
    self._lock = outputs.WriterLock(
        self.path / LOCK_FILE, error=StoreError,
        in_use='another `qscore embed` is writing this store. Wait for it to finish, or stop '
        'it; two writers would interleave their rows.',
        taken_over='resuming after its last committed row.')
    try:
      self._columns = {name: self._allocate(name, dtype, shape) for (name, dtype), shape in zip(
          COLUMNS, ((rows, dim), (rows,), (rows,)))}
      self._restart(_read_progress(self.path, rows))
    except BaseException:
      self.close()
      raise

  def _check_metadata(self, metadata: dict[str, Any]) -> None:
    meta_path = self.root / METADATA_FILE
    if not meta_path.exists():
      outputs.write_marker(self.root, 'store')  # before any file: readers see the tool's store
    if outputs.write_json_atomic(meta_path, metadata, exclusive=True):
      return
    existing = _read_json(meta_path, 'the store\'s metadata', _REEMBED)
    if not isinstance(existing, dict):
      raise StoreError(f'{meta_path} is damaged: not a JSON object. {_REEMBED}')
    if existing.get('format_version') != FORMAT_VERSION:
      raise StoreError(f'{self.root} was written by another version of qscore_jax (store format '
                       f'{existing.get("format_version")}, this one writes {FORMAT_VERSION}) '
                       f'and is not resumed. {_REEMBED}')
    diff = differences(existing, metadata, RUN_FIELDS + ('checksum', 'checksum_block_rows'))
    if diff:
      raise StoreError(
          f'{self.root} already holds a store of another run, so it is neither resumed nor '
          f'reused: {describe_differences(diff, "stored", "now")}. Write to another --out, '
          'or pass --overwrite to replace that store.')

  def _allocate(self, name, dtype, shape) -> int:
    """Creates (sparse) or checks a preallocated .npy file; returns its data offset."""
    path = self.path / name
    if not path.exists():
      with open(path, 'wb') as f:  # header, then a sparse file of the full size
        np.lib.format.write_array_header_2_0(f, {'descr': np.lib.format.dtype_to_descr(
            np.dtype(dtype)), 'fortran_order': False, 'shape': shape})
        f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    offset, found_shape, found_dtype = _checked_layout(path)
    if found_shape != shape or found_dtype != np.dtype(dtype):
      raise StoreError(f'{path} has shape {found_shape} {found_dtype}, expected {shape} '
                       f'{np.dtype(dtype)}: the store belongs to another run.')
    return offset

  def _restart(self, rows: int) -> None:
    """Continues after committed row ``rows``: keeps the checksums of the blocks before it
    (rewriting the file without any later line) and recomputes the running checksums of the
    block it is in from the rows on disk."""
    self.done = rows
    kept = _read_checksums(self.path, _blocks(rows, self.rows), strict=True)
    path = self.path / CHECKSUM_FILE
    text = ''.join(json.dumps(entry) + '\n' for entry in kept)
    if not path.exists() or path.read_text(encoding='utf-8') != text:
      tmp = path.with_name(path.name + '.tmp')
      tmp.write_text(text, encoding='utf-8')
      os.replace(tmp, path)
    self._checksum_file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    start = len(kept) * BLOCK_ROWS
    self._running = {name: xxhash.xxh3_64() for name, _ in COLUMNS}
    if start < rows:
      for name, _ in COLUMNS:
        self._running[name].update(_bytes(np.load(self.path / name, mmap_mode='r')[start:rows]))

  def rewind(self, rows: int) -> None:
    """Treats only the first ``rows`` committed rows as done (the processes agreed on fewer).

    Args:
      rows: the rows kept, at most :attr:`done`.
    """
    if not 0 <= rows <= self.done:
      raise ValueError(f'rewind({rows}): {self.done} rows are committed.')
    if rows < self.done:
      self._checksum_file.close()
      outputs.write_json_atomic(self.path / PROGRESS_FILE, {'rows': rows})
      self._restart(rows)

  def close(self) -> None:
    """Releases the shard's lock (the writer can no longer append)."""
    checksums = getattr(self, '_checksum_file', None)
    if checksums is not None:
      checksums.close()
    self._lock.release()

  def __enter__(self) -> 'ShardWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def complete(self) -> bool:
    """Whether every row of the shard is committed."""
    return self.done == self.rows

  def append(self, representations: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes the next rows (valid rows only, in id order) and commits them.

    The data is synced first, then the checksums of the blocks it completes, then the
    progress that commits it: a crash at any point resumes after the last committed row.

    Args:
      representations: (n, d), written as float32.
      labels: (n,), written as int32.
      ids: (n,) int, must continue the shard's id range exactly.
    """
    n = len(ids)
    if self.done + n > self.rows:
      raise StoreError(f'{self.path}: {self.done + n} rows exceed the shard size {self.rows}.')
    expected = np.arange(self.first_id + self.done, self.first_id + self.done + n)
    if not np.array_equal(ids, expected):
      raise StoreError(f'{self.path}: rows arrive out of order (ids {ids[:3]}..., expected '
                       f'{expected[:3]}...).')
    # Plain positioned writes, not memory maps: the written pages do not stay
    # in this process's resident memory, whatever the size of the store.
    values = {name: np.ascontiguousarray(array, dtype) for (name, dtype), array in zip(
        COLUMNS, (representations, labels, ids))}
    for name, offset in self._columns.items():
      array = values[name]
      row_bytes = array.nbytes // max(n, 1)
      with open(self.path / name, 'r+b') as f:
        f.seek(offset + self.done * row_bytes)
        f.write(memoryview(array).cast('B'))
        f.flush()
        os.fsync(f.fileno())
    self._checksum(values)
    self.done += n
    outputs.write_json_atomic(self.path / PROGRESS_FILE, {'rows': self.done})

  def _checksum(self, values: Mapping[str, np.ndarray]) -> None:
    """Extends the running checksums by the new rows; writes and syncs a line per block
    they complete (the short last block when they complete the shard)."""
    position, taken, lines = self.done, 0, []
    n = len(values['ids.npy'])
    while taken < n:
      block = position // BLOCK_ROWS
      block_end = min((block + 1) * BLOCK_ROWS, self.rows)
      count = min(block_end - position, n - taken)
      for name, array in values.items():
        self._running[name].update(_bytes(array[taken:taken + count]))
      position, taken = position + count, taken + count
      if position == block_end:
        lines.append(json.dumps({'block': block, **{name: h.intdigest() for name, h in
                                                     self._running.items()}}) + '\n')
        self._running = {name: xxhash.xxh3_64() for name, _ in COLUMNS}
    if lines:
      self._checksum_file.write(''.join(lines))
      self._checksum_file.flush()
      os.fsync(self._checksum_file.fileno())


@dataclasses.dataclass
class RepresentationStore:
  """Read access to a store (all shards), in id order, verified as it is read.

  Attributes:
    path: the store directory.
    metadata: its ``metadata.json``.
    shards: the shard directories, in order.
    verify_checksums: whether reads check the blocks' checksums (True; False only to
      measure what verifying costs).
  """
  path: pathlib.Path
  metadata: dict[str, Any]
  shards: list[pathlib.Path]
  verify_checksums: bool = True

  def __post_init__(self):
    self._checksums: dict[int, list[dict[str, int]]] = {}  # per shard, read once

  @classmethod
  def open(cls, path: str | pathlib.Path, *, require_complete: bool = True,
           verify_checksums: bool = True) -> 'RepresentationStore':
    """Opens the store at ``path`` and checks it.

    A complete store's files are checked for their sizes and headers, its labels and ids
    against their checksums, and its ids for being each row of the split exactly once;
    the representations are verified as they are read (:meth:`read_rows`).

    Args:
      path: the store directory.
      require_complete: raise ``StoreError`` unless every shard is complete and
        the rows add up to the split size (default True).
      verify_checksums: verify checksums (default True; False only to measure the cost).
    Raises:
      StoreError: naming the file (and rows) that is missing, incomplete or damaged.
    """
    path = pathlib.Path(path).expanduser().resolve()
    meta = path / METADATA_FILE
    if not meta.is_file():
      raise StoreError(f'{path} is not a representation store ({METADATA_FILE} missing); '
                       'stores are written by `qscore embed` / qscore_jax.embed_dataset.')
    metadata = _read_json(meta, 'the store\'s metadata', _REEMBED)
    required = {'shard_count': int, 'dim': int, 'split_size': int}
    if not isinstance(metadata, dict) or any(not isinstance(metadata.get(k), t)
                                             for k, t in required.items()):
      raise StoreError(f'{meta} is damaged: it lacks the integers {sorted(required)}. '
                       f'{_REEMBED}')
    version = metadata.get('format_version')
    if version not in (1, FORMAT_VERSION):
      raise StoreError(f'{path} has store format {version}; this qscore_jax reads formats 1 and '
                       f'{FORMAT_VERSION}. Use the version that wrote it, or embed again.')
    if version >= 2 and metadata.get('checksum') != CHECKSUM:
      raise StoreError(f'{path} has checksums of kind {metadata.get("checksum")!r}; this '
                       f'qscore_jax verifies {CHECKSUM!r}. Use the version that wrote it.')
    count = metadata['shard_count']
    shards = [path / shard_name(i, count) for i in range(count)]
    store = cls(path, metadata, shards, verify_checksums=verify_checksums and version >= 2)
    if version == 1:
      warnings.warn(f'{path} was written before stores had checksums (format 1): it is read '
                    'without verification. Embed it again to have it verified.', stacklevel=2)
    if require_complete:
      missing = [s.name for s in shards if not (s / PROGRESS_FILE).exists()]
      rows = store.shard_rows()
      total = sum(rows)
      unfinished = [s.name for s, r in zip(shards, rows) if r != _allocated(s)]
      if missing or unfinished or total != metadata['split_size']:
        raise StoreError(
            f'{path} is incomplete: {total} of {metadata["split_size"]} rows written'
            + (f'; shards not started: {missing}' if missing else '')
            + (f'; shards unfinished: {unfinished}' if unfinished else '')
            + '. Run the same `qscore embed` command again to resume.')
      store._check_complete(rows)  # pylint: disable=protected-access
    return store

  def _check_complete(self, rows: list[int]) -> None:
    """Sizes and headers of every file, then labels and ids (checksums, each id once)."""
    for shard, count in zip(self.shards, rows):
      for (name, dtype), shape in zip(COLUMNS, ((count, self.dim), (count,), (count,))):
        _, found_shape, found_dtype = _checked_layout(shard / name)
        if found_shape != shape or found_dtype != np.dtype(dtype):
          raise StoreError(f'{shard / name} holds {found_shape} {found_dtype}, but the store '
                           f'says {shape} {np.dtype(dtype)}: it was replaced. {_REEMBED}')
    labels, ids = self.labels, self.ids  # verified against their checksums as they are read
    if not np.array_equal(ids, np.arange(len(ids))):
      values, first_rows, counts = np.unique(ids, return_index=True, return_counts=True)
      repeated = values[counts > 1]
      what = (f'ids {repeated[:5].tolist()} appear more than once (first at rows '
              f'{first_rows[counts > 1][:5].tolist()})' if len(repeated) else
              f'its ids are not the rows of the split in order (row {int(np.argmax(ids != np.arange(len(ids))))})')
      raise StoreError(f'{self.path} is damaged: {what}; every image of the split must appear '
                       f'exactly once. {_REEMBED}')
    del labels

  def shard_rows(self) -> list[int]:
    """Committed rows of each shard (0 for a shard not started)."""
    return [_read_progress(shard, allocated) if (allocated := _allocated(shard)) >= 0 else 0
            for shard in self.shards]

  @property
  def num_rows(self) -> int:
    """N, the committed rows of all shards."""
    return sum(self.shard_rows())

  @property
  def dim(self) -> int:
    """d, the representation size."""
    return int(self.metadata['dim'])

  def _shard_checksums(self, index: int, rows: int) -> list[dict[str, int]]:
    if index not in self._checksums:
      allocated = _allocated(self.shards[index])
      self._checksums[index] = _read_checksums(self.shards[index], _blocks(rows, allocated),
                                               strict=rows == allocated)
    return self._checksums[index]

  def _verify(self, index: int, rows: int, name: str, first: int, values: np.ndarray) -> None:
    """Checks shard ``index``'s (``rows`` committed) rows ``[first, first + len(values))`` of
    column ``name``, block by block (``first`` on a block boundary; a block without a
    checksum yet, in an unfinished shard, is not checked)."""
    if not self.verify_checksums:
      return
    checksums = self._shard_checksums(index, rows)
    for start in range(0, len(values), BLOCK_ROWS):
      block = (first + start) // BLOCK_ROWS
      if block >= len(checksums):
        break
      end = min(start + BLOCK_ROWS, len(values))
      if _checksum_of(values[start:end]) != checksums[block][name]:
        offset = sum(self.shard_rows()[:index])
        a, b = first + start, first + end - 1
        raise StoreError(
            f'{self.shards[index] / name} rows {a}-{b} (store rows {offset + a}-{offset + b}) do '
            'not match their checksum: the file was changed or damaged after it was written, '
            f'and no result is computed from it. {_REEMBED}')

  def _column(self, name: str) -> np.ndarray:
    parts = []
    for index, (shard, rows) in enumerate(zip(self.shards, self.shard_rows())):
      part = np.array(np.load(shard / name, mmap_mode='r')[:rows])
      self._verify(index, rows, name, 0, part)
      parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0)

  @property
  def labels(self) -> np.ndarray:
    """(N,) int32 labels of the committed rows, in id order (verified)."""
    return self._column('labels.npy')

  @property
  def ids(self) -> np.ndarray:
    """(N,) int64 ids (index in the split) of the committed rows, in order (verified)."""
    return self._column('ids.npy')

  def read_rows(self, first: int, out: np.ndarray) -> int:
    """Reads representations ``[first, first + len(out))`` into ``out`` (k, d) float32.

    Plain positioned file reads (no memory maps), across shard boundaries; fewer
    rows at the end of the store. Every block read is checked against its checksum;
    a read that does not start and end on block boundaries (:data:`BLOCK_ROWS`)
    reads the whole blocks into a buffer first. Returns the number of rows read.

    Args:
      first: index of the first row to read.
      out: (k, d) float32 buffer, filled from the top.
    Raises:
      StoreError: a truncated file, or rows that do not match their checksum.
    """
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != self.dim:
      raise ValueError(f'out must be float32 (k, {self.dim}), got {out.dtype} {out.shape}.')
    done, shard_start = 0, 0
    for index, (shard, rows) in enumerate(zip(self.shards, self.shard_rows())):
      if done == len(out):
        break
      local = first + done - shard_start
      if 0 <= local < rows:
        count = min(rows - local, len(out) - done)
        target = out[done:done + count]
        begin = local - local % BLOCK_ROWS if self.verify_checksums else local
        end = min(-(-(local + count) // BLOCK_ROWS) * BLOCK_ROWS, rows) \
            if self.verify_checksums else local + count
        aligned = begin == local and end == local + count
        buffer = target if aligned else np.empty((end - begin, self.dim), np.float32)
        self._read_representations(shard, begin, buffer)
        self._verify(index, rows, 'representations.npy', begin, buffer)
        if not aligned:
          target[:] = buffer[local - begin:local - begin + count]
        done += count
      shard_start += rows
    return done

  def read_chunk(self, first: int, landing: np.ndarray, rows: int) -> tuple[np.ndarray, int]:
    """Reads up to ``rows`` representations from row ``first`` into ``landing``; the streaming read.

    Rows that are not in the page cache are read with ``O_DIRECT``, straight from the
    disk into ``landing``: a buffered read of a cold file costs a core on some machines
    (2.3 s of CPU for 2 GB on the 2-core VM of benchmarks/README.md; direct, the disk
    does the work), which the statistics that run beside it need. A chunk whose pages
    are all in the page cache (``mincore``) is copied from it, as :meth:`read_rows`
    would, so a store that fits in memory is not read from the disk again. Either way every block is verified; a chunk
    that spans two shards, starts or ends off a checksum block, or a file system
    without ``O_DIRECT``, falls back to :meth:`read_rows`.

    Args:
      first: index of the first row.
      landing: a :func:`landing_buffer` for ``rows`` rows of this store.
      rows: rows of the chunk (fewer are read at the end of the store).
    Returns:
      ``(values, count)``: ``values`` a 64-byte aligned (rows, d) float32 view of
      ``landing`` whose first ``count`` rows were read (the rest are left as they were).
    Raises:
      StoreError: a truncated file, or rows that do not match their checksum.
    """
    count = max(0, min(rows, self.num_rows - first))
    row_bytes = self.dim * 4
    if landing.dtype != np.uint8 or len(landing) < rows * row_bytes + 2 * DIRECT_ALIGNMENT:
      raise ValueError('landing must be a landing_buffer(rows, dim) of this store.')
    values = self._read_direct(first, count, landing, rows)
    if values is None:
      values = landing[:rows * row_bytes].view(np.float32).reshape(rows, self.dim)
      self.read_rows(first, values[:count])
    return values, count

  def _read_direct(self, first: int, count: int, landing: np.ndarray, rows: int
                   ) -> np.ndarray | None:
    """:meth:`read_chunk`'s direct read; None where it cannot be done (the caller reads buffered)."""
    if not count or not all(hasattr(os, name) for name in ('O_DIRECT', 'preadv')):
      return None
    shard_start = 0
    for index, (shard, shard_rows) in enumerate(zip(self.shards, self.shard_rows())):
      if shard_start <= first < shard_start + shard_rows:
        break
      shard_start += shard_rows
    else:
      return None
    local = first - shard_start
    ends_block = (local + count) % BLOCK_ROWS == 0 or local + count == shard_rows
    if local + count > shard_rows or (self.verify_checksums and
                                      (local % BLOCK_ROWS or not ends_block)):
      return None
    path, row_bytes = shard / 'representations.npy', self.dim * 4
    with open(path, 'rb', buffering=0) as f:
      start = _npy_data_offset(f) + local * row_bytes
      phase = start % DIRECT_ALIGNMENT
      if phase % 64:  # not aliasable by a device array; .npy headers are 64-byte multiples
        return None
      need = count * row_bytes
      view = memoryview(landing)
      done, wanted = phase, phase + need  # byte offsets in landing
      if _in_page_cache(f.fileno(), start - phase, phase + need):
        done += _read_buffered_range(f, view[phase:wanted], start)
      else:
        # From the disk, page-aligned: landing maps file offsets linearly, so the margin
        # bytes before and after the rows are the file's neighbouring bytes.
        end = -(-wanted // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        done = max(done, _read_direct_range(path, view[:end], start - phase))
      if done < wanted:  # no O_DIRECT on this file system (or it failed midway)
        done += _read_buffered_range(f, view[done:wanted], start - phase + done)
      if done < wanted:
        raise StoreError(f'{path} is truncated: row {local + (done - phase) // row_bytes} '
                         f'cannot be read. {_REEMBED}')
    values = landing[phase:phase + rows * row_bytes].view(np.float32).reshape(rows, self.dim)
    self._verify(index, shard_rows, 'representations.npy', local, values[:count])
    return values

  def _read_representations(self, shard: pathlib.Path, first: int, target: np.ndarray) -> None:
    with open(shard / 'representations.npy', 'rb', buffering=0) as f:
      os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
      read = _read_buffered_range(f, memoryview(target).cast('B'),
                                  _npy_data_offset(f) + first * self.dim * 4)
      if read < target.nbytes:
        raise StoreError(f'{shard / "representations.npy"} is truncated: row '
                         f'{first + read // (self.dim * 4)} cannot be read. {_REEMBED}')

  def verify(self, chunk_rows: int = 64 * BLOCK_ROWS) -> int:
    """Reads every row once and checks it against its checksum (one pass over the store).

    Args:
      chunk_rows: rows read at a time (default 65536).
    Returns:
      The number of rows verified.
    Raises:
      StoreError: naming the first damaged file and row range.
    """
    self.labels, self.ids  # pylint: disable=pointless-statement  # verified as they are read
    landing = landing_buffer(chunk_rows, self.dim)
    for first in range(0, self.num_rows, chunk_rows):
      self.read_chunk(first, landing, chunk_rows)  # direct from the disk where it can
    return self.num_rows

  def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_row, representations[first_row:first_row + k])`` in row order.

    Each chunk is a fresh array read with :meth:`read_rows`, so the process holds
    only the chunks in flight, whatever the store size.

    Args:
      chunk_rows: rows per chunk, k (default 65536; the last chunk may be shorter).
    """
    total = self.num_rows
    for first in range(0, total, chunk_rows):
      chunk = np.empty((min(chunk_rows, total - first), self.dim), np.float32)
      self.read_rows(first, chunk)
      yield first, chunk

  def representations(self) -> np.ndarray:
    """All representations in memory (N, d); for stores that fit in RAM."""
    return np.concatenate([chunk for _, chunk in self.iter_chunks()]) if self.num_rows else \
        np.zeros((0, self.dim), np.float32)


def _npy_layout(f) -> tuple[int, tuple[int, ...], np.dtype]:
  """(data offset, shape, dtype) of an open C-ordered .npy file."""
  version = np.lib.format.read_magic(f)
  shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
  if fortran:
    raise StoreError(f'{f.name} is Fortran-ordered; stores are C-ordered.')
  return f.tell(), shape, dtype


def _checked_layout(path: pathlib.Path) -> tuple[int, tuple[int, ...], np.dtype]:
  """:func:`_npy_layout` of a file, which must be as long as its header says."""
  try:
    with open(path, 'rb') as f:
      offset, shape, dtype = _npy_layout(f)
  except FileNotFoundError:
    raise StoreError(f'{path} is missing. {_REEMBED}') from None
  except (ValueError, OSError, SyntaxError) as error:
    raise StoreError(f'{path} is damaged: its .npy header cannot be read ({error}). '
                     f'{_REEMBED}') from None
  expected = offset + int(np.prod(shape)) * dtype.itemsize
  size = path.stat().st_size
  if size < expected:
    raise StoreError(f'{path} is truncated: {size} bytes, its header says {expected}. '
                     f'{_REEMBED}')
  return offset, shape, dtype


def _npy_data_offset(f) -> int:
  """Byte offset of the data of an open .npy file (checks it is a float32 matrix)."""
  offset, shape, dtype = _npy_layout(f)
  if dtype != np.dtype('<f4') or len(shape) != 2:
    raise StoreError(f'{f.name} is not a float32 matrix.')
  return offset


def landing_buffer(rows: int, dim: int) -> np.ndarray:
  """A page-aligned uint8 buffer for :meth:`RepresentationStore.read_chunk` of ``rows`` rows.

  It holds the rows and a margin of :data:`DIRECT_ALIGNMENT` bytes on each side: a direct
  read starts and ends on a page boundary, so it may write up to a page before and after
  the rows.

  Args:
    rows: rows of a chunk.
    dim: the store's representation width d.
  Returns:
    uint8 (rows * dim * 4 + 2 * DIRECT_ALIGNMENT,), its first byte page-aligned.
  """
  size = rows * dim * 4 + 2 * DIRECT_ALIGNMENT
  raw = np.empty(size + DIRECT_ALIGNMENT, np.uint8)
  offset = -raw.ctypes.data % DIRECT_ALIGNMENT
  return raw[offset:offset + size]


def _in_page_cache(fd: int, offset: int, length: int) -> bool:
  """Whether every page of a file's bytes [offset, offset + length) is in the page cache.

  Asks ``mincore`` about a mapping of the range that is never touched, so nothing is
  read (a non-blocking read, ``RWF_NOWAIT``, would start the kernel's readahead of the
  rest). ``offset`` is page-aligned. False where it cannot tell.
  """
  libc = _libc()
  if libc is None or length <= 0:
    return False
  address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
  if address in (None, ctypes.c_void_p(-1).value):
    return False
  try:
    pages = -(-length // mmap.PAGESIZE)
    resident = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(address), length, resident) != 0:
      return False
    return bool((np.frombuffer(resident, np.uint8) & 1).all())
  finally:
    libc.munmap(ctypes.c_void_p(address), length)


@functools.cache
def _libc():
  """The C library's mmap, mincore and munmap through ctypes (None where there is none)."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc
  except (OSError, AttributeError):
    return None


def _read_direct_range(path: pathlib.Path, target: memoryview, offset: int) -> int:
  """Reads ``target`` (page-aligned) from ``offset`` (page-aligned) with O_DIRECT.

  Returns the bytes read: fewer at the end of the file, and 0 (or as far as it got)
  where the file system refuses O_DIRECT (tmpfs on older kernels, some network and
  FUSE file systems); the caller reads the rest buffered.
  """
  try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
  except OSError:
    return 0
  try:
    got = 0
    while got < len(target):
      try:
        n = os.preadv(fd, [target[got:]], offset + got)
      except OSError:
        break
      if not n:
        break
      got += n
    return got
  finally:
    os.close(fd)


def _read_buffered_range(f, target: memoryview, offset: int) -> int:
  """Reads ``target`` from ``offset`` of the open file ``f``; returns the bytes read."""
  got = 0
  while got < len(target):
    n = os.preadv(f.fileno(), [target[got:]], offset + got)
    if not n:
      break
    got += n
  return got


def _allocated(shard: pathlib.Path) -> int:
  """Rows the shard's files hold (-1 for a shard not started; StoreError if one is damaged)."""
  ids = shard / 'ids.npy'
  started = ids.exists() or (shard / PROGRESS_FILE).exists()
  return int(_checked_layout(ids)[1][0]) if started else -1

"""Representation stores: embeddings of a dataset split on disk, one shard per process.

Layout::

    <store>/
      metadata.json                      model id, dataset, split, preprocessing, d,
                                         split size, number of shards, ...
      shard-00000-of-00002/
        representations.npy              float32 (rows, d), a memory-mapped .npy
        labels.npy                       int32 (rows,)
        ids.npy                          int64 (rows,): index of each row in the split
        progress.json                    {"rows": k}: rows 0..k-1 are final

Process ``p`` owns shard ``p``, the contiguous id range it embeds (see
:func:`qscore_jax.data.shard_bounds`), so the shards concatenated in order hold
the split in id order, whatever the number of processes. The arrays are
preallocated; rows are written in place and ``progress.json`` is replaced
atomically after each flush, so a killed run resumes exactly after the last
committed row: no gap, no duplicate. Readers stream fixed-size chunks with
plain file reads, so memory stays bounded whatever N.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import numpy as np

from qscore_jax import outputs

METADATA_FILE = 'metadata.json'
PROGRESS_FILE = 'progress.json'
FORMAT_VERSION = 1


class StoreError(ValueError):
  """A representation store is missing, incomplete or inconsistent."""


# The metadata fields that determine a store's rows: a store is resumed or reused only when
# every one of them is the same (the model's weights by their content fingerprint; the
# preprocessing and image size that make the pixels).
MODEL_FIELDS = ('model', 'model_fingerprint', 'arch', 'arch_options', 'preprocessing',
                'image_size', 'dim')
RUN_FIELDS = MODEL_FIELDS + ('dataset', 'split', 'split_size', 'shard_count')


def differences(first: Mapping[str, Any], second: Mapping[str, Any],
                fields: tuple[str, ...] = RUN_FIELDS) -> dict[str, tuple[Any, Any]]:
  """``{field: (first's value, second's value)}`` for the ``fields`` where two store
  metadata dicts differ (a field missing from one counts as None).

  Args:
    first: one store's metadata (or the stored run's).
    second: the other's (or the requested run's).
    fields: the fields compared (default :data:`RUN_FIELDS`).
  """
  return {k: (first.get(k), second.get(k)) for k in fields if first.get(k) != second.get(k)}


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


def _write_json_atomic(path: pathlib.Path, data: Mapping[str, Any]) -> None:
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class ShardWriter:
  """Writes one process's rows into its preallocated shard, resumably.

  Creating it preallocates (or checks) the shard's files and reads its progress;
  ``done`` is then the number of rows already committed.

  Args:
    directory: the store directory (created).
    shard_index: this process's shard.
    shard_count: number of shards (processes).
    rows: rows of this shard (its id range's length).
    dim: d, the representation size.
    first_id: id of the shard's first row.
    metadata: the store's metadata (model, dataset, split, split_size,
      preprocessing, ...), written by shard 0 and compared with an existing
      store's (``StoreError`` when it belongs to another run).
  """

  def __init__(self, directory: str | pathlib.Path, *, shard_index: int, shard_count: int,
               rows: int, dim: int, first_id: int, metadata: Mapping[str, Any]):
    self.root = pathlib.Path(directory).expanduser().resolve()
    self.path = self.root / shard_name(shard_index, shard_count)
    self.rows, self.dim, self.first_id = rows, dim, first_id
    self.root.mkdir(parents=True, exist_ok=True)
    meta_path = self.root / METADATA_FILE
    metadata = json.loads(json.dumps({**metadata, 'format_version': FORMAT_VERSION, 'dim': dim,
                                      'shard_count': shard_count}))  # as it reads back
    if meta_path.exists():
      existing = json.loads(meta_path.read_text())
      diff = differences(existing, metadata, RUN_FIELDS)
      if diff:
        raise StoreError(
            f'{self.root} already holds a store of another run, so it is neither resumed nor '
            f'reused: {describe_differences(diff, "stored", "now")}. Write to another directory, '
            'or delete that one to embed again.')
    elif shard_index == 0:
      outputs.write_marker(self.root, 'store')  # before any file: readers see the tool's store
      _write_json_atomic(meta_path, metadata)
    self.path.mkdir(exist_ok=True)
    self._columns = {name: self._allocate(name, dtype, shape) for name, dtype, shape in (
        ('representations.npy', np.float32, (rows, dim)), ('labels.npy', np.int32, (rows,)),
        ('ids.npy', np.int64, (rows,)))}
    progress = self.path / PROGRESS_FILE
    self.done = json.loads(progress.read_text())['rows'] if progress.exists() else 0

  def _allocate(self, name, dtype, shape) -> int:
    """Creates (sparse) or checks a preallocated .npy file; returns its data offset."""
    path = self.path / name
    if not path.exists():
      with open(path, 'wb') as f:  # header, then a sparse file of the full size
        np.lib.format.write_array_header_2_0(f, {'descr': np.lib.format.dtype_to_descr(
            np.dtype(dtype)), 'fortran_order': False, 'shape': shape})
        f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    with open(path, 'rb') as f:
      offset, found_shape, found_dtype = _npy_layout(f)
    if found_shape != shape or found_dtype != np.dtype(dtype):
      raise StoreError(f'{path} has shape {found_shape} {found_dtype}, expected {shape} '
                       f'{np.dtype(dtype)}: the store belongs to another run.')
    return offset

  @property
  def complete(self) -> bool:
    """Whether every row of the shard is committed."""
    return self.done == self.rows

  def append(self, representations: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes the next rows (valid rows only, in id order) and commits them.

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
    values = {'representations.npy': np.ascontiguousarray(representations, np.float32),
              'labels.npy': np.ascontiguousarray(labels, np.int32),
              'ids.npy': np.ascontiguousarray(ids, np.int64)}
    for name, offset in self._columns.items():
      array = values[name]
      row_bytes = array.nbytes // max(n, 1)
      with open(self.path / name, 'r+b') as f:
        f.seek(offset + self.done * row_bytes)
        f.write(memoryview(array).cast('B'))
        f.flush()
        os.fsync(f.fileno())
    self.done += n
    _write_json_atomic(self.path / PROGRESS_FILE, {'rows': self.done})


@dataclasses.dataclass
class RepresentationStore:
  """Read access to a complete store (all shards), in id order.

  Attributes:
    path: the store directory.
    metadata: its ``metadata.json``.
    shards: the shard directories, in order.
  """
  path: pathlib.Path
  metadata: dict[str, Any]
  shards: list[pathlib.Path]

  @classmethod
  def open(cls, path: str | pathlib.Path, *, require_complete: bool = True
           ) -> 'RepresentationStore':
    """Opens the store at ``path``.

    Args:
      path: the store directory.
      require_complete: raise ``StoreError`` unless every shard is complete and
        the rows add up to the split size (default True).
    """
    path = pathlib.Path(path).expanduser().resolve()
    meta = path / METADATA_FILE
    if not meta.is_file():
      raise StoreError(f'{path} is not a representation store ({METADATA_FILE} missing); '
                       'stores are written by `qscore embed` / qscore_jax.embed_dataset.')
    metadata = json.loads(meta.read_text())
    count = metadata['shard_count']
    shards = [path / shard_name(i, count) for i in range(count)]
    store = cls(path, metadata, shards)
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
    return store

  def shard_rows(self) -> list[int]:
    """Committed rows of each shard (0 for a shard not started)."""
    rows = []
    for shard in self.shards:
      progress = shard / PROGRESS_FILE
      rows.append(json.loads(progress.read_text())['rows'] if progress.exists() else 0)
    return rows

  @property
  def num_rows(self) -> int:
    """N, the committed rows of all shards."""
    return sum(self.shard_rows())

  @property
  def dim(self) -> int:
    """d, the representation size."""
    return int(self.metadata['dim'])

  def _column(self, name: str) -> np.ndarray:
    parts = [np.load(s / name, mmap_mode='r')[:r] for s, r in zip(self.shards, self.shard_rows())]
    return np.concatenate(parts) if parts else np.zeros(0)

  @property
  def labels(self) -> np.ndarray:
    """(N,) int32 labels of the committed rows, in id order."""
    return self._column('labels.npy')

  @property
  def ids(self) -> np.ndarray:
    """(N,) int64 ids (index in the split) of the committed rows, in order."""
    return self._column('ids.npy')

  def read_rows(self, first: int, out: np.ndarray) -> int:
    """Reads representations ``[first, first + len(out))`` into ``out`` (k, d) float32.

    Plain positioned file reads (no memory maps), across shard boundaries; fewer
    rows at the end of the store. Returns the number of rows read.

    Args:
      first: index of the first row to read.
      out: (k, d) float32 buffer, filled from the top.
    """
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != self.dim:
      raise ValueError(f'out must be float32 (k, {self.dim}), got {out.dtype} {out.shape}.')
    done, shard_start = 0, 0
    for shard, rows in zip(self.shards, self.shard_rows()):
      if done == len(out):
        break
      local = first + done - shard_start
      if 0 <= local < rows:
        count = min(rows - local, len(out) - done)
        target = out[done:done + count]
        with open(shard / 'representations.npy', 'rb', buffering=0) as f:
          os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
          f.seek(_npy_data_offset(f) + local * self.dim * 4)
          view, read = memoryview(target).cast('B'), 0
          while read < target.nbytes:
            n = f.readinto(view[read:])
            if not n:
              raise StoreError(f'{shard} is truncated: row {local + read // (self.dim * 4)} '
                               'cannot be read.')
            read += n
        done += count
      shard_start += rows
    return done

  def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_row, representations[first_row:first_row + k])`` in row order.

    Each chunk is a fresh array read with :meth:`read_rows`, so the process holds
    only the chunks in flight, whatever the store size.

    Args:
      chunk_rows: rows per chunk, k (default 65536; the last chunk may be shorter).
    """
    for first in range(0, self.num_rows, chunk_rows):
      chunk = np.empty((min(chunk_rows, self.num_rows - first), self.dim), np.float32)
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


def _npy_data_offset(f) -> int:
  """Byte offset of the data of an open .npy file (checks it is a float32 matrix)."""
  offset, shape, dtype = _npy_layout(f)
  if dtype != np.dtype('<f4') or len(shape) != 2:
    raise StoreError(f'{f.name} is not a float32 matrix.')
  return offset


def _allocated(shard: pathlib.Path) -> int:
  ids = shard / 'ids.npy'
  return int(np.load(ids, mmap_mode='r').shape[0]) if ids.exists() else -1

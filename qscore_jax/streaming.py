"""The Q-Score statistics over representations that do not fit in memory.

:func:`feature_stats` (activation counts, A_j, the discriminative set D) and
:func:`sample_scores` (Q-Score and the per-sample baselines) stream a
:class:`~qscore_jax.store.RepresentationStore` (or an in-memory array) in
fixed-size chunks: two background threads read the next chunks from disk
(``O_DIRECT`` where they are not in the page cache,
:meth:`~qscore_jax.store.RepresentationStore.read_chunk`) while a jitted kernel
computes the statistics of :mod:`qscore_jax.stats` on the current one on the
devices (rows split over the mesh). Memory stays at a few chunks whatever N;
every chunk has the same shape (the last is padded and masked), so each kernel
compiles once. Results do not depend on the chunk size or the device layout:
counts are integers, and everything else is computed row by row.

Options are checked before the pass (:mod:`qscore_jax.validation`: eps > 0,
0 <= lo < hi <= 100, D of the representations' width). NaN and inf are found
by the kernel on the device as part of the pass (from the row sums it computes
anyway); only a chunk it flags is looked at on the host, to name the bad rows
exactly (and, for an in-memory float64 array, to tell values beyond float32 from
NaN/inf). No second pass.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import queue
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from qscore_jax import parallel, stats, validation
from qscore_jax import store as store_lib
from qscore_jax.stats import FeatureStats
from qscore_jax.store import RepresentationStore

DEFAULT_CHUNK_ROWS = 16384
# Rows a device processes at a time inside a chunk (2 MB for d = 2048): the
# statistics read each row several times (mean, std, threshold, ...), and
# within a block those reads hit the cache instead of memory.
BLOCK_ROWS = 256


def _reader(source):
  """``(num_rows, read(first, out) -> rows read)`` of a store or an in-memory (N, d) array."""
  if isinstance(source, RepresentationStore):
    return source.num_rows, source.read_rows
  array = source
  if isinstance(array, (np.ndarray, jax.Array)):
    validation.check_matrix(array)
  elif not hasattr(array, 'shape') or len(array.shape) != 2:
    raise validation.InputError(f'representations must have shape (N, d), got '
                                f'{getattr(array, "shape", type(array))}.')

  def read(first, out):
    part = np.asarray(array[first:first + len(out)])
    with np.errstate(over='ignore', invalid='ignore'):  # beyond float32: inf, reported later
      out[:len(part)] = part
    return len(part)

  return len(array), read


def _aligned_empty(shape: tuple[int, int], alignment: int = 64) -> np.ndarray:
  """An uninitialised float32 array whose data is ``alignment``-byte aligned.

  On CPU, ``jax.device_put`` of an aligned host array aliases it instead of
  copying (a 128 MB chunk: 0.1 ms instead of ~110 ms here), which is what keeps
  the streaming passes near the disk's bandwidth.
  """
  size = int(np.prod(shape)) * 4
  raw = np.empty(size + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + size].view(np.float32).reshape(shape)


def _prefetched(source, rows: int, dim: int, readers: int = 2
                ) -> Iterator[tuple[int, int, np.ndarray, Callable[[], None]]]:
  """Fixed-size chunks read by background threads while the caller works on the last.

  Yields ``(first_row, valid_rows, buffer (rows, d), release)`` in row order: rows past
  ``valid_rows`` are zero; call ``release()`` once the buffer's contents are no longer
  needed (the results fetched), which returns it to a pool of ``readers + 1`` buffers:
  memory stays at a few chunks and pages are reused. The buffers may be aliased by
  device arrays (CPU), hence the explicit release. ``readers`` threads read successive
  chunks, so that one reads from the disk while another verifies the checksums of the
  chunk it has read (a store's direct reads do not overlap the disk by themselves).
  """
  total, read = _reader(source)
  store = source if isinstance(source, RepresentationStore) else None
  readers = readers if store else 1  # an array in memory has no disk to overlap
  free: queue.Queue = queue.Queue()
  for _ in range(readers + 1):
    free.put(store_lib.landing_buffer(rows, dim) if store else _aligned_empty((rows, dim)))
  stop = threading.Event()

  def load(first):
    landing = free.get()
    if stop.is_set():
      return None
    if store:
      buffer, count = store.read_chunk(first, landing, rows)
    else:
      buffer, count = landing, read(first, landing)
    buffer[count:] = 0
    return first, count, buffer, landing

  firsts = iter(range(0, total, rows))
  pool = concurrent.futures.ThreadPoolExecutor(readers, thread_name_prefix='qscore-reader')
  pending = collections.deque(pool.submit(load, first)
                              for first in itertools.islice(firsts, readers))
  try:
    while pending:
      first, count, buffer, landing = pending.popleft().result()
      following = next(firsts, None)
      if following is not None:
        pending.append(pool.submit(load, following))
      yield first, count, buffer, lambda b=landing: free.put(b)
  finally:
    stop.set()
    for _ in range(readers):
      free.put(np.empty(0, np.uint8))  # unblock readers waiting for a buffer
    pool.shutdown(wait=True, cancel_futures=True)


def _row_sharding(mesh):
  return NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))


def _chunk_size(chunk_rows: int, mesh) -> int:
  unit = mesh.devices.size * BLOCK_ROWS
  return max(unit, chunk_rows // unit * unit)


def _blockwise(mesh, fn, row_outputs: bool):
  """``fn(h_block, valid_block)`` over every block of a chunk's rows, on every device.

  Each device walks its rows in blocks of :data:`BLOCK_ROWS` (``lax.map``), so the
  several reads of a row stay in cache. With ``row_outputs`` the per-row results
  are concatenated in row order (sharded like the rows); otherwise they are summed
  over blocks and devices. Returns a jitted ``(h, valid) -> result``.
  """
  axis = parallel.DATA_AXIS

  def local(h, valid):
    blocks = h.reshape(-1, BLOCK_ROWS, h.shape[-1])
    masks = valid.reshape(-1, BLOCK_ROWS)
    result, bad = lax.map(lambda args: fn(*args), (blocks, masks))
    bad = lax.psum(jnp.sum(bad), axis)
    if row_outputs:
      return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), result), bad
    return lax.psum(jnp.sum(result, axis=0), axis), bad

  rows = PartitionSpec(axis)
  out = (rows if row_outputs else PartitionSpec(), PartitionSpec())
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows), out_specs=out))


def _original_rows(source, first: int, count: int, buffer: np.ndarray) -> np.ndarray:
  """The rows of a chunk before the float32 cast (a store's rows are float32 already)."""
  if isinstance(source, RepresentationStore):
    return buffer[:count]
  return np.asarray(source[first:first + count])


def _dim(source) -> int:
  return source.dim if isinstance(source, RepresentationStore) else int(source.shape[1])


def _num_rows(source) -> int:
  return source.num_rows if isinstance(source, RepresentationStore) else len(source)


def _block_moments(h):
  """Row sums, means, stds (two-pass; exactly 0 for constant rows, as ``stats._moments``),
  maxima and minima of a block (B, d), each a plain row reduction for XLA:CPU."""
  total = jnp.sum(h, axis=-1)
  high, low = jnp.max(h, axis=-1), jnp.min(h, axis=-1)
  mu = total / h.shape[-1]
  sigma = jnp.sqrt(jnp.sum(jnp.square(h - mu[:, None]), axis=-1) / h.shape[-1])
  return total, mu, jnp.where(high > low, sigma, 0.0), high, low


def _active_counts(h, valid, eps):
  """:func:`stats.activation_counts` of a block (B, d) and its :func:`_maybe_nonfinite` count.

  The same counts, arranged for XLA:CPU as :func:`_row_scores` is: moments from plain
  row reductions, the block's counts as a float sum over its rows (exact: at most B),
  made integers before they are summed over blocks.
  """
  total, mu, sigma, _, _ = _block_moments(h)
  counted = valid & (sigma > 0)  # as stats._active_given: constant rows have no active feature
  active = (h > (mu + eps * sigma)[:, None]) & counted[:, None]
  counts = jnp.sum(jnp.where(active, 1.0, 0.0), axis=0).astype(jnp.int32)
  return counts, _maybe_nonfinite(total, valid)


def feature_stats(source, *, eps: float = stats.DEFAULT_EPS,
                  band: tuple[float, float] = stats.DEFAULT_BAND, nonzero_only: bool = True,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS, mesh=None) -> FeatureStats:
  """Activation counts, A_j and D of a reference split, in one streaming pass.

  Args:
    source: a :class:`RepresentationStore` or an array (N, d).
    eps, band, nonzero_only: the options of the method (see :mod:`qscore_jax.stats`).
    chunk_rows: rows per chunk (rounded to a multiple of devices x BLOCK_ROWS).
    mesh: device mesh for the rows of a chunk (default: all local devices).
  Returns:
    The :class:`FeatureStats` of the split.
  Raises:
    InputError: a bad option (before the pass), or representations holding NaN,
      inf or values beyond float32 (with the number of rows and the first ones).
  """
  eps = validation.eps(eps)
  band = validation.band(band)
  validation.check_number(chunk_rows, 'chunk_rows', above=0, integer=True)
  mesh = mesh or parallel.data_mesh(jax.local_devices())
  rows = _chunk_size(chunk_rows, mesh)
  sharding = _row_sharding(mesh)

  kernel = _blockwise(mesh, lambda h, valid: _active_counts(h, valid, eps), row_outputs=False)

  counts, bad, total = None, validation.BadRows(), 0
  for first, count, buffer, release in _prefetched(source, rows, _dim(source)):
    c, b = kernel(jax.device_put(buffer, sharding),
                  jax.device_put(np.arange(rows) < count, sharding))
    c = np.asarray(c, np.int64)
    if int(b):
      bad.add(_original_rows(source, first, count, buffer), first)
    release()
    counts = c if counts is None else counts + c
    total += count
  if counts is None:
    raise validation.InputError('no representations to compute statistics on (N = 0).')
  bad.raise_if_any(total)
  member = np.asarray(stats.discriminative_features(counts, band, nonzero_only))
  lo, hi = (float(x) for x in stats.band_limits(counts, band, nonzero_only))
  return FeatureStats(counts, total, member, (lo, hi), eps, tuple(band), nonzero_only)


SCORES = ('qscore', 'qscore_v1', 'num_active', 'num_active_discriminative', 'l2_norm',
          'hoyer_sparsity', 'mean', 'std')


def _maybe_nonfinite(row_sums, valid):
  """Number of valid rows whose sum is NaN or inf: a superset of the rows holding NaN/inf.

  A NaN or an infinity in a row always makes its sum non-finite; a finite row
  only does so when its sum overflows float32. Reusing a sum the kernel needs
  anyway saves a pass over the rows; a chunk it flags is checked exactly on the
  host (:class:`validation.BadRows`), which names only the truly bad rows.
  """
  return jnp.sum(~jnp.isfinite(row_sums) & valid, dtype=jnp.int32)


def _row_scores(h, valid, discriminative, eps):
  """The :data:`SCORES` of a block of rows (B, d) and its :func:`_maybe_nonfinite` count.

  The same values as :mod:`qscore_jax.stats` (two-pass variance, sigma = 0 for
  constant rows), arranged for XLA:CPU: every full-width pass is a plain row
  reduction of ``h`` or of one broadcast expression, counts are float sums
  (exact below 2**24; integer reductions are not vectorised there), and the
  two D-only scores work on the |D| columns of D alone.
  """
  d = h.shape[-1]
  total, mu, sigma, high, _ = _block_moments(h)
  l1 = jnp.sum(jnp.abs(h), axis=-1)
  l2 = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1))
  varies = sigma > 0
  threshold = mu + eps * sigma
  num_active = jnp.where(varies, jnp.sum(jnp.where(h > threshold[:, None], 1.0, 0.0), axis=-1), 0.0)
  h_d = h[:, np.flatnonzero(discriminative)]  # static columns: (B, |D|)
  selected = (h_d > threshold[:, None]) & varies[:, None]
  count = jnp.sum(jnp.where(selected, 1.0, 0.0), axis=-1)
  qscore = jnp.sum(jnp.where(selected, h_d - mu[:, None], 0.0), axis=-1)
  qscore = jnp.where(count > 0, qscore / jnp.maximum(count, 1.0), 0.0)
  root_d = jnp.sqrt(jnp.float32(d))
  hoyer = jnp.where(l2 > 0, (root_d - l1 / jnp.where(l2 > 0, l2, 1.0))
                    / jnp.maximum(root_d - 1, 1e-12), 0.0)
  ok = varies & (l1 > 0)  # as stats._qscore_v1_given
  qscore_v1 = jnp.where(ok, (high - mu) / jnp.where(ok, sigma, 1.0) / jnp.where(ok, l1, 1.0), 0.0)
  scores = {'qscore': qscore, 'qscore_v1': qscore_v1, 'num_active': num_active.astype(jnp.int32),
            'num_active_discriminative': count.astype(jnp.int32),
            'l2_norm': l2, 'hoyer_sparsity': hoyer, 'mean': mu, 'std': sigma}
  return scores, _maybe_nonfinite(total, valid)


def sample_scores(source, feature: FeatureStats, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                  mesh=None) -> dict[str, np.ndarray]:
  """Per-sample scores of every row: Q-Score (default and v1) and label-free baselines.

  Args:
    source: a :class:`RepresentationStore` or an array (N, d) to score.
    feature: the reference split's :class:`FeatureStats` (gives D and eps).
    chunk_rows: rows per chunk (rounded to a multiple of devices x BLOCK_ROWS).
    mesh: device mesh for the rows of a chunk (default: all local devices).
  Raises:
    InputError: D of another width than the representations (before the pass), or
      representations holding NaN, inf or values beyond float32 (with the first rows).
  Returns:
    dict of (N,) arrays in row order: ``qscore``, ``qscore_v1``, ``num_active``
    (|L_i|), ``num_active_discriminative`` (|L_i ∩ D|), ``l2_norm``,
    ``hoyer_sparsity`` ((sqrt(d) - L1/L2) / (sqrt(d) - 1)), ``mean``, ``std``.
  """
  discriminative = validation.feature_mask(feature.discriminative, _dim(source),
                                          'the reference split\'s D (feature.discriminative)')
  eps = validation.eps(feature.eps, 'feature.eps')
  validation.check_number(chunk_rows, 'chunk_rows', above=0, integer=True)
  mesh = mesh or parallel.data_mesh(jax.local_devices())
  rows = _chunk_size(chunk_rows, mesh)
  sharding = _row_sharding(mesh)
  kernel = _blockwise(mesh, lambda h, valid: _row_scores(h, valid, discriminative, eps),
                      row_outputs=True)
  total = _num_rows(source)
  out = {name: np.zeros(total, np.float32 if name not in ('num_active', 'num_active_discriminative')
                        else np.int32) for name in SCORES}
  bad = validation.BadRows()
  for first, count, buffer, release in _prefetched(source, rows, _dim(source)):
    result, b = kernel(jax.device_put(buffer, sharding),
                       jax.device_put(np.arange(rows) < count, sharding))
    result = jax.device_get(result)
    if int(b):
      bad.add(_original_rows(source, first, count, buffer), first)
    release()
    for name, values in result.items():
      out[name][first:first + count] = values[:count]
  bad.raise_if_any(total)
  return out

"""Device meshes and global batches for data parallelism (one or many hosts).

The default layout is a 1-D mesh over every device of every process with the
axis ``'data'``: a global batch is split along its first dimension, each
process holding the rows of its own devices. :func:`global_batch` turns the
per-process batches of :mod:`qscore_jax.data` into global ``jax.Array``s on
that mesh, the input ``jax.jit`` data-parallel steps expect, and :func:`prefetch`
keeps the next ones on the devices while a step runs.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def data_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes).

  Args:
    devices: the devices, in mesh order (default ``jax.devices()``).
    axis: the mesh axis name (default ``'data'``).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis,))


def check_batch_divisible(global_batch_size: int, *, process_count: int | None = None,
                          local_device_count: int | None = None) -> int:
  """The per-process batch size; raises unless the batch splits evenly over devices.

  Args:
    global_batch_size: examples per step over all processes.
    process_count: number of processes (default ``jax.process_count()``).
    local_device_count: devices per process (default ``jax.local_device_count()``).
  Returns:
    ``global_batch_size // process_count``.
  Raises:
    ValueError: the batch is not positive or not a multiple of the device count
      (the message proposes valid sizes).
  """
  process_count = jax.process_count() if process_count is None else process_count
  local_device_count = (jax.local_device_count() if local_device_count is None
                        else local_device_count)
  devices = process_count * local_device_count
  if global_batch_size <= 0:
    raise ValueError(f'batch size must be positive, got {global_batch_size}.')
  if global_batch_size % devices:
    lower = global_batch_size // devices * devices
    raise ValueError(
        f'batch size {global_batch_size} does not split over the {devices} devices '
        f'({process_count} process(es) x {local_device_count} device(s)): every device must get '
        f'the same number of examples. Use a multiple of {devices}, e.g. '
        f'{max(lower, devices)} or {lower + devices}.')
  return global_batch_size // process_count


def global_batch(local: Mapping[str, Any], mesh: Mesh | None = None,
                 axis: str = DATA_AXIS) -> dict[str, jax.Array]:
  """Per-process numpy arrays -> global arrays sharded along ``axis`` of ``mesh``.

  Every leaf's first dimension is this process's share of the global batch.
  Nested containers (e.g. a tuple of SSL views) are handled leaf by leaf.

  Args:
    local: ``{name: array}`` of this process's rows, e.g. ``image`` (n, H, W, 3)
      and ``label`` (n,); nested containers allowed.
    mesh: the mesh (default :func:`data_mesh`).
    axis: the mesh axis the first dimension is split along (default ``'data'``).
  Returns:
    The same structure of global ``jax.Array`` s, first dimension n x the
    process count.
  """
  mesh = mesh or data_mesh()
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(local))


def prefetch(batches: Iterable[Any], put: Callable[[Any], Any], size: int = 2
             ) -> Iterator[tuple[Any, Any]]:
  """Yields ``(batch, put(batch))`` with ``size`` batches already put on the devices.

  A jitted step returns as soon as it is dispatched; a loop that does not read its
  results at once goes on to the next batch, whose host work (decoding, augmenting,
  the host-to-device copy, which :func:`global_batch` starts asynchronously) then
  overlaps the running step. Keeping ``size`` batches in flight lets the host stay
  ahead of the devices by that many steps.

  Args:
    batches: host batches, in order (consumed lazily: at most ``size`` ahead).
    put: host batch -> device arrays, e.g. ``lambda b: global_batch(b, mesh)``.
    size: batches in flight (default 2; at least 1).
  Yields:
    ``(host batch, device arrays)`` in the order of ``batches``.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be at least 1, got {size}.')
  iterator = iter(batches)
  queue = collections.deque((batch, put(batch)) for batch in itertools.islice(iterator, size))
  while queue:
    yield queue.popleft()
    queue.extend((batch, put(batch)) for batch in itertools.islice(iterator, 1))


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order.

  Args:
    array: a global ``jax.Array`` sharded along its first dimension.
  Returns:
    NumPy array of the rows held by this process's devices (each once).
  """
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicated copies of the same rows appear once
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)

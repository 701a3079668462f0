"""Embedding at scale: a data-parallel forward step and a resumable driver.

* :func:`embed_images` is the pure step ``(variables, images) -> representations``
  (inference mode). :func:`make_embed_step` jits it over a device mesh (variables
  replicated, the batch split along ``'data'``, every device and host);
  ``jax.pmap(functools.partial(embed_images, model), in_axes=(None, 0))`` runs
  the same step under ``pmap``.
* :func:`embed_dataset` walks a dataset split (:func:`qscore_jax.data.eval_batches`),
  embeds each global batch, and writes this process's rows into its shard of a
  :mod:`qscore_jax.store` with a progress bar (images/s, ETA). Killed and
  restarted with the same arguments, it resumes after the last committed batch
  and produces the same store as an uninterrupted run.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qscore_jax import outputs, parallel
from qscore_jax.models import precision
from qscore_jax.models.encoder import Encoder, as_encoder
from qscore_jax.models.features import keep_state
from qscore_jax.store import RepresentationStore, ShardWriter


def embed_images(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """Representations of a batch, ``(b, H, W, 3) -> (b, d)`` float32, inference mode.

  Args:
    model: a backbone (``qscore_jax.models``).
    variables: its variables (``params``, ``batch_stats``; other collections are
      dropped).
    images: (b, H, W, 3) float, preprocessed as the model expects.
  """
  return model.apply(keep_state(variables), images, train=False)


def make_embed_step(model: nn.Module, mesh=None):
  """:func:`embed_images` jitted for a mesh: variables replicated, batch sharded on ``'data'``.

  Cached per (model, mesh): embedding another split or dataset with the same
  model reuses the compiled step.

  Args:
    model: a backbone (``qscore_jax.models``).
    mesh: the device mesh (default: every device of every process on ``'data'``).
  Returns:
    ``step(variables, images) -> representations`` with global (b, H, W, 3)
    images and (b, d) float32 output, both sharded along ``'data'``.
  """
  return _cached_embed_step(model, mesh or parallel.data_mesh())


@functools.lru_cache(maxsize=16)
def _cached_embed_step(model: nn.Module, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  return jax.jit(functools.partial(embed_images, model), in_shardings=(replicated, batch),
                 out_shardings=batch)


def _agree_on_resume(done_batches: int) -> int:
  """The number of batches every process has committed (processes may have died apart)."""
  if jax.process_count() == 1:
    return done_batches
  counts = multihost_utils.process_allgather(np.asarray([done_batches], np.int64))
  return int(np.min(counts))


def embed_dataset(model: nn.Module, variables: Any, dataset: str, split: str,
                  store_dir: str | pathlib.Path, *, batch_size: int = 256,
                  preprocessing=None, image_size: int | None = None,
                  data_dir: str | None = None, metadata: Mapping[str, Any] | None = None,
                  mesh=None, progress: bool = True, overwrite: bool = False) -> pathlib.Path:
  """Embeds a split into a representation store (resuming an interrupted run).

  Args:
    model, variables: the backbone (see :mod:`qscore_jax.models`).
    dataset, split: what to embed (see :mod:`qscore_jax.data.datasets`).
    store_dir: the store; created, or resumed when it holds this same run.
    batch_size: global batch size, divisible by the number of devices.
    preprocessing: the model's preprocessing metadata (registry or saved model).
    image_size: overrides ``preprocessing.image_size``.
    data_dir: tfds data directory (default: ``$QSCORE_JAX_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    metadata: extra facts recorded in the store (model id, ...).
    mesh: device mesh (default: every device of every process on ``'data'``).
    progress: show a progress bar on process 0.
    overwrite: delete the store already in ``store_dir`` (one qscore_jax wrote: it carries
      the marker of :mod:`qscore_jax.outputs`) and embed afresh, instead of resuming or
      reusing it.

  Returns:
    The absolute store path (every process returns once its shard is complete).

  Raises:
    qscore_jax.outputs.OutputError: ``store_dir`` holds anything but a store qscore_jax
      wrote (nothing is deleted or written).
  """
  # Function-level: `import qscore_jax` imports this module and must not import TensorFlow.
  from qscore_jax.data import dataset_info, eval_batches, shard_bounds, split_size  # pylint: disable=import-outside-toplevel
  mesh = mesh or parallel.data_mesh()
  process, processes = jax.process_index(), jax.process_count()
  state = outputs.check_output(store_dir, 'store', overwrite=overwrite)
  if processes > 1:  # every process has checked before any deletes or writes
    multihost_utils.sync_global_devices('qscore embed: store directory checked')
  if process == 0:
    if state == 'existing' and overwrite:
      outputs.remove_output(store_dir, 'store')
    elif state == 'existing':
      outputs.write_marker(store_dir, 'store')  # a store of an older version gets its marker
  if processes > 1 and overwrite:
    multihost_utils.sync_global_devices('qscore embed: old store removed')
  size = split_size(dataset, split, data_dir)
  start, end = shard_bounds(size, process, processes)
  local = parallel.check_batch_divisible(batch_size)
  run = {'dataset': dataset, 'dataset_version': dataset_info(dataset, data_dir).version,
         'split': split, 'split_size': size,
         'preprocessing': preprocessing.to_json() if preprocessing is not None else None,
         'image_size': image_size, 'batch_size': batch_size,
         # Rows computed in bfloat16 are other rows: a store of one is never resumed as the other.
         'compute_dtype': precision.name_of(getattr(model, 'dtype', None)),
         # ... and so are rows of the CPU matrix-unit path against bfloat16 activations.
         'compute_path': precision.compute_path(getattr(model, 'dtype', None)),
         **dict(metadata or {})}
  run.setdefault('model', None)
  dim = model.num_features
  with ShardWriter(store_dir, shard_index=process, shard_count=processes, rows=end - start,
                   dim=dim, first_id=start, metadata=run) as writer:
    done_batches = _agree_on_resume(writer.done // local if not writer.complete else
                                    -(-writer.rows // local))
    writer.rewind(min(writer.done, done_batches * local))
    batches = eval_batches(dataset, split, batch_size=batch_size, preprocessing=preprocessing,
                           image_size=image_size, data_dir=data_dir,
                           skip_batches=done_batches)
    step = make_embed_step(model, mesh)
    # Host copies first: a value committed to one device cannot be moved across hosts.
    variables = jax.device_put(jax.device_get(keep_state(variables)),
                               NamedSharding(mesh, PartitionSpec()))
    bar = tqdm(total=size, initial=min(size, done_batches * batch_size), unit='img',
               disable=not progress or process != 0, desc=f'embed {dataset}/{split}',
               smoothing=0.1)

    def write(batch, representations):  # waits for that batch's step, not the next one
      keep = batch['mask']
      writer.append(parallel.local_rows(representations)[keep], batch['label'][keep],
                    batch['id'][keep])
      bar.update(int(keep.sum()) * processes)

    # The step of batch k+1 is dispatched before batch k's rows are read back, and two
    # batches wait on the devices: the host's decoding overlaps the devices' work.
    pending = None
    for batch, images in parallel.prefetch(
        batches, lambda b: parallel.global_batch({'image': b['image']}, mesh)['image']):
      representations = step(variables, images)
      if pending is not None:
        write(*pending)
      pending = (batch, representations)
    if pending is not None:
      write(*pending)
    bar.close()
  return writer.root


def embed_encoder(encoder: Encoder, dataset: str, split: str, store_dir: str | pathlib.Path,
                  **kwargs) -> pathlib.Path:
  """:func:`embed_dataset` for an :class:`~qscore_jax.models.encoder.Encoder` (``qscore embed``).

  The store records the encoder's :meth:`~qscore_jax.models.encoder.Encoder.describe`
  (name, method, architecture, content fingerprint), so a store made by other
  weights is never resumed or reused as this encoder's.

  Args:
    encoder: the encoder (:func:`qscore_jax.load_encoder`).
    dataset: the dataset name.
    split: the split to embed.
    store_dir: the store directory.
    **kwargs: the keyword arguments of :func:`embed_dataset` (``batch_size``,
      ``image_size``, ``data_dir``, ``mesh``, ``progress``, ``overwrite``, ...);
      ``preprocessing`` defaults to the encoder's, ``metadata`` is merged
      over its description.
  Returns:
    The absolute store path.
  """
  kwargs.setdefault('preprocessing', encoder.preprocessing)
  kwargs['metadata'] = {**encoder.describe(), **dict(kwargs.get('metadata') or {})}
  return embed_dataset(encoder.module, encoder.variables, dataset, split, store_dir, **kwargs)


def embed_model_on_dataset(model_ref: str, dataset: str, split: str,
                           store_dir: str | pathlib.Path, **kwargs) -> pathlib.Path:
  """Deprecated: ``embed_encoder(load_encoder(model_ref), ...)`` (loads the model once).

  Args:
    model_ref: a saved model directory, finetune workdir, converted or shipped id.
    dataset: the dataset name.
    split: the split to embed.
    store_dir: the store directory.
    **kwargs: the keyword arguments of :func:`embed_encoder`.
  Returns:
    The absolute store path.
  """
  return embed_encoder(as_encoder(model_ref, caller='embed_model_on_dataset'), dataset, split,
                       store_dir, **kwargs)


__all__ = ['RepresentationStore', 'embed_dataset', 'embed_encoder', 'embed_images',
           'embed_model_on_dataset', 'make_embed_step']

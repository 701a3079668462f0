"""Saving and loading backbone variables with orbax, plus a JSON metadata file.

A saved model is a directory::

    <directory>/
      variables/      orbax checkpoint of {'params': ..., 'batch_stats': ...}
      metadata.json   model id, method, arch + options, preprocessing, provenance

The metadata is enough to rebuild the Flax module, so :func:`load_model`
returns a model ready to apply. Round trips are bit-exact.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from qscore_jax.models.registry import ModelSpec, Preprocessing, build_model

METADATA_FILE = 'metadata.json'
VARIABLES_DIR = 'variables'
FORMAT_VERSION = 1


def _package_version() -> str:
  from qscore_jax import __version__  # pylint: disable=import-outside-toplevel
  return __version__


def _check_variables(variables: Any) -> dict[str, Any]:
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(
        "variables must be a dict with a 'params' entry (and 'batch_stats' for "
        f'ResNets), got {type(variables).__name__} with keys '
        f'{sorted(variables) if isinstance(variables, Mapping) else "-"}.')
  extra = set(variables) - {'params', 'batch_stats'}
  if extra:
    raise ValueError(f'variables hold collections {sorted(extra)} that are not '
                     "model state; keep only 'params' and 'batch_stats'.")
  return dict(variables)


def save_model(directory: str | pathlib.Path, variables: Mapping[str, Any],
               spec: ModelSpec | None = None, *, arch: str | None = None,
               arch_options: Mapping[str, Any] | None = None,
               preprocessing: Preprocessing | None = None,
               provenance: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes ``variables`` and their metadata to ``directory``.

  Args:
    directory: target directory (made absolute; orbax needs absolute paths).
    variables: ``{'params': ..., 'batch_stats': ...}`` of the model.
    spec: registry entry the weights belong to; supplies model id, method,
      architecture and preprocessing. Without it, give ``arch``.
    arch, arch_options, preprocessing: override or replace the spec's.
    provenance: free-form JSON-serialisable facts about the source (URL,
      sha256, which sub-model was taken, ...).
    overwrite: replace an existing saved model.

  Returns:
    The absolute directory path.
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  variables = _check_variables(variables)
  if spec is None and arch is None:
    raise ValueError('save_model needs a registry spec or an arch name.')
  arch = arch or spec.arch
  options = dict(spec.arch_options if spec else {}) | dict(arch_options or {})
  build_model(arch, **options)  # fails early on options the arch lacks
  preprocessing = preprocessing or (spec.preprocessing if spec else None)
  if directory.exists() and any(directory.iterdir()):
    if not overwrite:
      raise FileExistsError(f'{directory} already holds files; pass overwrite=True '
                            '(--overwrite) to replace them, or choose another directory.')
  directory.mkdir(parents=True, exist_ok=True)

  metadata = {
      'format_version': FORMAT_VERSION,
      'model_id': spec.id if spec else None,
      'method': spec.method if spec else None,
      'arch': arch,
      'arch_options': options,
      'preprocessing': preprocessing.to_json() if preprocessing else None,
      'provenance': dict(provenance or {}),
      'qscore_jax_version': _package_version(),
      'saved_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  json.dumps(metadata)  # fail before writing anything if it is not serialisable

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VARIABLES_DIR, variables, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + '\n')
  return directory


def read_metadata(directory: str | pathlib.Path) -> dict[str, Any]:
  """The metadata dict of a saved model."""
  path = pathlib.Path(directory).expanduser().resolve() / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f'{path.parent} is not a saved qscore_jax model: {METADATA_FILE} is missing. '
        'Models are written by qscore_jax.models.save_model or `qscore convert`.')
  metadata = json.loads(path.read_text())
  if metadata.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path} has format_version {metadata.get("format_version")!r}; '
                     f'this qscore_jax reads version {FORMAT_VERSION}.')
  return metadata


def model_from_metadata(metadata: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """Rebuilds the Flax module described by a metadata dict."""
  return build_model(metadata['arch'], **{**metadata['arch_options'], **overrides})


def load_variables(directory: str | pathlib.Path, model: nn.Module | None = None,
                   *, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """Restores the variables saved in ``directory``.

  Args:
    directory: a directory written by :func:`save_model`.
    model: the module to restore onto (built from the metadata when omitted);
      its variable shapes are the restore target, so a checkpoint of another
      architecture fails with the mismatching names.
    sharding: where to place every array (default: the first local device).
  """
  from qscore_jax.models import abstract_variables  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory).expanduser().resolve()
  metadata = read_metadata(directory)
  model = model or model_from_metadata(metadata)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_variables(model))
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(directory / VARIABLES_DIR)
    stored_tree = getattr(stored, 'item_metadata', stored)
    _compare_trees(target, stored_tree, directory)
    return checkpointer.restore(directory / VARIABLES_DIR, target)
  finally:
    checkpointer.close()


def _compare_trees(target: Any, stored: Any, directory: pathlib.Path) -> None:
  """Raises a readable error when the stored tree does not fit the model."""
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(target)}
  have = {jax.tree_util.keystr(p): tuple(getattr(v, 'shape', ()) or ())
          for p, v in jax.tree_util.tree_leaves_with_path(stored)}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or wrong:
    lines = [f'The checkpoint in {directory} does not fit the model:']
    if missing:
      lines.append(f'  {len(missing)} model variables missing, e.g. {missing[:5]}')
    if unexpected:
      lines.append(f'  {len(unexpected)} unexpected stored variables, e.g. {unexpected[:5]}')
    if wrong:
      lines.append(f'  {len(wrong)} variables have other shapes, e.g.')
      # Parameters first: a kernel shape says more than a BatchNorm statistic.
      for key in sorted(wrong, key=lambda k: (not k.startswith("['params']"), k))[:8]:
        lines.append(f'    {key}: stored {have[key]}, model expects {want[key]}')
    lines.append('Check the architecture options in metadata.json.')
    raise ValueError('\n'.join(lines))


def load_model(directory: str | pathlib.Path, *,
               sharding: jax.sharding.Sharding | None = None,
               **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """Rebuilds a saved model: ``(module, variables, metadata)``.

  ``overrides`` change module attributes that do not affect the weights,
  e.g. ``dtype=jnp.bfloat16`` or ``bn_axis_name='batch'``.
  """
  metadata = read_metadata(directory)
  model = model_from_metadata(metadata, **overrides)
  return model, load_variables(directory, model, sharding=sharding), metadata


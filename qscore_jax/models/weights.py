"""Saving and loading backbone (and head) variables with orbax, plus JSON metadata.

A saved model is a directory::

    <directory>/
      variables/      orbax checkpoint of the backbone {'params', 'batch_stats'}
      heads/          orbax checkpoint of {head name: {'params', 'batch_stats'}} (optional)
      metadata.json   model id, method, arch + options, preprocessing, head specs,
                      provenance, package version

The metadata is enough to rebuild the Flax modules, so :func:`load_model`
returns a model ready to apply. Round trips are bit-exact. A save is written
to a temporary sibling directory and renamed into place only when complete,
so a failure never leaves a half-written model behind; it also carries the
marker ``.qscore-output.json``, and only a directory with that marker (or a
model of an older version) is ever replaced (:mod:`qscore_jax.outputs`).
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from qscore_jax import outputs, remote
from qscore_jax._version import __version__
from qscore_jax.data.preprocessing import Preprocessing
from qscore_jax.models.heads import HeadSpec, MLPHead
from qscore_jax.models.registry import ModelSpec, build_model, list_models
from qscore_jax.models.variables import abstract_variables

METADATA_FILE = 'metadata.json'
VARIABLES_DIR = 'variables'
HEADS_DIR = 'heads'
FORMAT_VERSION = 1


def _check_variables(variables: Any, what: str = 'variables') -> dict[str, Any]:
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(
        f"{what} must be a dict with a 'params' entry (and 'batch_stats' for "
        f'ResNets), got {type(variables).__name__} with keys '
        f'{sorted(variables) if isinstance(variables, Mapping) else "-"}.')
  extra = set(variables) - {'params', 'batch_stats'}
  if extra:
    raise ValueError(f'{what} hold collections {sorted(extra)} that are not '
                     "model state; keep only 'params' and 'batch_stats'.")
  return dict(variables)


def _save_tree(path: pathlib.Path, tree: Any) -> None:
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def save_model(directory: str | pathlib.Path, variables: Mapping[str, Any],
               spec: ModelSpec | None = None, *, arch: str | None = None,
               arch_options: Mapping[str, Any] | None = None,
               method: str | None = None,
               preprocessing: Preprocessing | None = None,
               heads: Mapping[str, tuple[HeadSpec, Mapping[str, Any]]] | None = None,
               provenance: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes ``variables`` (and heads) with their metadata to ``directory``.

  Args:
    directory: target directory (made absolute; orbax needs absolute paths).
    variables: ``{'params': ..., 'batch_stats': ...}`` of the backbone.
    spec: registry entry the weights belong to; supplies model id, method,
      architecture and preprocessing. Without it, give ``arch``.
    arch, arch_options, method, preprocessing: override or replace the spec's.
    heads: ``{name: (HeadSpec, variables)}`` of projection heads, predictors,
      prototypes or classifiers that came with the weights.
    provenance: JSON-serialisable facts about the source (URL, sha256, which
      sub-model was taken, ...).
    overwrite: replace an existing saved model (only once the new one is
      completely written). Only a directory qscore_jax wrote as a model is ever
      replaced (:mod:`qscore_jax.outputs`).

  Returns:
    The absolute directory path.

  Raises:
    qscore_jax.outputs.OutputError: ``directory`` holds a model and not ``overwrite``, or
      anything that is not a model qscore_jax wrote (nothing is deleted).
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  variables = _check_variables(variables)
  heads = {name: (head_spec, _check_variables(head_vars, f'head {name!r}'))
           for name, (head_spec, head_vars) in (heads or {}).items()}
  if spec is None and arch is None:
    raise ValueError('save_model needs a registry spec or an arch name.')
  arch = arch or spec.arch
  options = dict(spec.arch_options if spec else {}) | dict(arch_options or {})
  build_model(arch, **options)  # fails early on options the arch lacks
  preprocessing = preprocessing or (spec.preprocessing if spec else None)
  outputs.check_output(directory, 'model', overwrite=overwrite, existing='refuse',
                       contents_ok=False)  # before the work: staged_output checks again

  metadata = {
      'format_version': FORMAT_VERSION,
      'model_id': spec.id if spec else None,
      'method': method or (spec.method if spec else None),
      'arch': arch,
      'arch_options': options,
      'preprocessing': preprocessing.to_json() if preprocessing else None,
      'heads': {name: head_spec.to_json() for name, (head_spec, _) in heads.items()},
      'provenance': dict(provenance or {}),
      'qscore_jax_version': __version__,
      'saved_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  text = json.dumps(metadata, indent=2) + '\n'  # fails here, before writing, if not serialisable

  with outputs.staged_output(directory, 'model', overwrite=overwrite) as staging:
    _save_tree(staging / VARIABLES_DIR, variables)
    if heads:
      _save_tree(staging / HEADS_DIR, {name: head_vars for name, (_, head_vars) in heads.items()})
    (staging / METADATA_FILE).write_text(text)
  return directory


def read_metadata(directory: str | pathlib.Path) -> dict[str, Any]:
  """The metadata dict of a saved model.

  Args:
    directory: a directory written by :func:`save_model`.
  Raises:
    FileNotFoundError: no ``metadata.json`` in it.
    ValueError: another metadata format version.
  """
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
  """Rebuilds the Flax module described by a metadata dict.

  Args:
    metadata: a saved model's metadata (its ``arch`` and ``arch_options``).
    **overrides: module attributes replacing the stored options (e.g. ``dtype``).
  """
  return build_model(metadata['arch'], **{**metadata['arch_options'], **overrides})


def tree_mismatches(expected: Any, actual: Any) -> list[str]:
  """Readable differences between two pytrees of arrays or shape structs.

  Returns one line per problem (empty when both have the same leaves and
  shapes): missing leaves, unexpected leaves, and shape mismatches with both
  shapes, parameters listed before statistics.

  Args:
    expected: the target pytree (e.g. the model's abstract variables).
    actual: the pytree found (e.g. a checkpoint's metadata tree).
  """
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(p): tuple(getattr(v, 'shape', ()) or ())
          for p, v in jax.tree_util.tree_leaves_with_path(actual)}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = sorted((k for k in set(want) & set(have) if want[k] != have[k]),
                 key=lambda k: (not k.startswith("['params']"), k))
  lines = []
  if missing:
    lines.append(f'{len(missing)} model variables missing, e.g. {missing[:5]}')
  if unexpected:
    lines.append(f'{len(unexpected)} unexpected variables, e.g. {unexpected[:5]}')
  if wrong:
    lines.append(f'{len(wrong)} variables have other shapes, e.g.')
    lines += [f'  {key}: file {have[key]}, model expects {want[key]}' for key in wrong[:8]]
  return lines


def _restore(path: pathlib.Path, target: Any, what: str) -> Any:
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(path)
    stored_tree = getattr(stored, 'item_metadata', stored)
    problems = tree_mismatches(target, stored_tree)
    if problems:
      raise ValueError('\n'.join([f'The checkpoint in {path.parent} does not fit the {what}:']
                                 + ['  ' + p for p in problems]
                                 + ['Check the architecture options in metadata.json.']))
    return checkpointer.restore(path, target)
  finally:
    checkpointer.close()


def _default_sharding(sharding):
  return sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_variables(directory: str | pathlib.Path, model: nn.Module | None = None,
                   *, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
  """Restores the backbone variables saved in ``directory``.

  Args:
    directory: a directory written by :func:`save_model`.
    model: the module to restore onto (built from the metadata when omitted);
      its variable shapes are the restore target, so a checkpoint of another
      architecture fails with the mismatching names.
    sharding: where to place every array (default: the first local device).
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  model = model or model_from_metadata(read_metadata(directory))
  sharding = _default_sharding(sharding)
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_variables(model))
  return _restore(directory / VARIABLES_DIR, target, 'model')


def load_heads(directory: str | pathlib.Path, *,
               sharding: jax.sharding.Sharding | None = None,
               **overrides: Any) -> dict[str, tuple[MLPHead, dict[str, Any]]]:
  """The heads saved with a model: ``{name: (MLPHead module, variables)}``.

  ``overrides`` are passed to every head module (e.g. ``bn_axis_name``).

  Args:
    directory: a directory written by :func:`save_model`.
    sharding: where to place every array (default: the first local device).
    **overrides: :class:`MLPHead` attributes for every head.
  Returns:
    ``{}`` when the model was saved without heads.
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  metadata = read_metadata(directory)
  specs = {name: HeadSpec.from_json(data) for name, data in metadata.get('heads', {}).items()}
  if not specs:
    return {}
  sharding = _default_sharding(sharding)
  modules = {name: spec.build(**overrides) for name, spec in specs.items()}
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(directory / HEADS_DIR)
  finally:
    checkpointer.close()
  stored_tree = getattr(stored, 'item_metadata', stored)
  target = {}
  for name, module in modules.items():
    in_features = stored_tree[name]['params']['dense_0']['kernel'].shape[0]
    shapes = jax.eval_shape(lambda m=module, d=in_features: m.init(
        jax.random.key(0), jax.numpy.zeros((2, d), jax.numpy.float32)))
    target[name] = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes)
  restored = _restore(directory / HEADS_DIR, target, 'heads')
  return {name: (modules[name], restored[name]) for name in modules}


# Models that ship inside the package (``checkpoints/<id>/``, installed as
# ``qscore_jax.checkpoints``): small encoders trained by the project's own configs.
SHIPPED_MODELS = ('demo-simclr-r18w025',)


def shipped_model_dir(model_id: str) -> pathlib.Path:
  """The installed directory of a model shipped with the package.

  Args:
    model_id: one of ``SHIPPED_MODELS``.

  Raises:
    ValueError: ``model_id`` is not shipped.
    FileNotFoundError: the installation lacks its files (a broken install).
  """
  if model_id not in SHIPPED_MODELS:
    raise ValueError(f'{model_id!r} is not shipped with qscore_jax; shipped: '
                     f'{", ".join(SHIPPED_MODELS)}.')
  directory = pathlib.Path(str(importlib.resources.files('qscore_jax.checkpoints'))) / model_id
  if not (directory / METADATA_FILE).is_file():
    raise FileNotFoundError(f'the shipped model {model_id} is missing from {directory}: '
                            'reinstall qscore_jax (`pip install -e .` from a clone).')
  return directory.resolve()


def unconverted_model_error(ref: str | pathlib.Path) -> FileNotFoundError | None:
  """The error for a reference to a registry checkpoint that is not converted yet.

  ``ref`` is a registry id, or a path whose last component is one (typically
  ``checkpoints/<id>``, where ``qscore convert <id>`` writes), and holds no saved
  model: the error says to convert it first, and that ``qscore inspect <id>``
  alone builds the architecture with random weights.

  Args:
    ref: a model reference.
  Returns:
    The error, or None when ``ref`` is a saved model or its last component is no
    registry id.
  """
  path = pathlib.Path(ref).expanduser()
  model_id = path.name
  if (path / METADATA_FILE).is_file() or model_id not in {s.id for s in list_models()}:
    return None
  default = pathlib.Path('checkpoints') / model_id
  out = '' if path == default or str(ref) == model_id else f' --out {path}'
  if str(ref) == model_id and not path.is_dir():
    what = f'{model_id} is not converted yet'
  else:
    state = ('does not exist' if not path.exists()
             else f'holds no saved model ({METADATA_FILE} missing)')
    what = f'{path} {state}; {model_id} is a registry id that is not converted yet'
  return FileNotFoundError(
      f'{what}: run `qscore convert {model_id}{out}` first (it downloads the official weights '
      f'and writes {path if out else default}). `qscore inspect {model_id}` alone builds its '
      'architecture with random weights.')


def resolve_model_dir(ref: str | pathlib.Path) -> pathlib.Path:
  """The saved model directory ``ref`` names.

  Args:
    ref: a saved model directory (it holds ``metadata.json``), a ``qscore finetune``
      workdir (its exported ``model/``), a converted registry id
      (``./checkpoints/<id>``) or the id of a model shipped with the package
      (``demo-simclr-r18w025``, found wherever the package is installed); the first two
      may be URLs (``gs://...``, pulled into the local cache: :mod:`qscore_jax.remote`).

  Returns:
    The directory, absolute.

  Raises:
    FileNotFoundError: saying whether the id is known but not converted yet
      (:func:`unconverted_model_error`, also for ``checkpoints/<id>``).
  """
  if remote.is_url(ref):
    return _pulled_model_dir(str(ref).rstrip('/'))
  path = pathlib.Path(ref).expanduser()
  if (path / METADATA_FILE).is_file():
    return path.resolve()
  if (path / 'model' / METADATA_FILE).is_file():
    return (path / 'model').resolve()
  converted = pathlib.Path('checkpoints') / str(ref)
  if (converted / METADATA_FILE).is_file():
    return converted.resolve()
  if str(ref) in SHIPPED_MODELS:
    return shipped_model_dir(str(ref))
  unconverted = unconverted_model_error(ref)
  if unconverted is not None:
    raise unconverted
  raise FileNotFoundError(f'{ref} is neither a saved model directory ({METADATA_FILE} '
                          'missing) nor a converted registry id (`qscore models` lists them).')


def _pulled_model_dir(url: str) -> pathlib.Path:
  """The local copy of the saved model at ``url``, or of a workdir's ``model/`` only (its
  checkpoints stay in the bucket)."""
  for candidate in (url, f'{url}/model'):
    if remote.exists(f'{candidate}/{METADATA_FILE}'):
      return remote.pull(candidate)
  raise FileNotFoundError(f'{url} is not a saved model ({METADATA_FILE} missing), nor a '
                          f'finetune workdir with one in model/.')


def model_directory(ref: str | pathlib.Path) -> pathlib.Path:
  """:func:`resolve_model_dir`, except that an existing directory that is not a model is
  returned as it is, so that :func:`read_metadata` says which file it lacks.

  Args:
    ref: anything :func:`resolve_model_dir` accepts.
  """
  try:
    return resolve_model_dir(ref)
  except FileNotFoundError:
    if not pathlib.Path(ref).expanduser().is_dir() or unconverted_model_error(ref) is not None:
      raise
    return pathlib.Path(ref).expanduser().resolve()


def load_model(directory: str | pathlib.Path, *,
               sharding: jax.sharding.Sharding | None = None,
               **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """Rebuilds a saved model: ``(module, variables, metadata)``.

  ``overrides`` change module attributes that do not affect the weights,
  e.g. ``dtype=jnp.bfloat16`` or ``bn_axis_name='batch'``. Heads, if any,
  come from :func:`load_heads`.

  Args:
    directory: a directory written by :func:`save_model`, or anything
      :func:`resolve_model_dir` resolves (a finetune workdir, a converted or
      shipped id such as ``'demo-simclr-r18w025'``).
    sharding: where to place every array (default: the first local device).
    **overrides: module attributes replacing the stored options.
  """
  directory = model_directory(directory)
  metadata = read_metadata(directory)
  model = model_from_metadata(metadata, **overrides)
  return model, load_variables(directory, model, sharding=sharding), metadata

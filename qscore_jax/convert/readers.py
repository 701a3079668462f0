"""Readers of the published checkpoint files; each returns a :class:`FlatCheckpoint`.

* PyTorch ``.pth`` / ``.pth.tar`` / Lightning ``.ckpt``: ``torch.load`` with
  ``weights_only=True`` (tensors and plain containers only). DINO's full
  checkpoints carry an ``argparse.Namespace`` and Lightning's may carry an
  ``AttributeDict``; exactly those two classes are allowed in addition. A file
  that holds any other object is read again by the restricted unpickler below,
  with torch's own tensor rebuilders allowed.
* TF1 name-based checkpoints (SimCLR v1/v2): ``tf.train.load_checkpoint``,
  from a checkpoint prefix, its ``.index`` file, a directory, or the
  ``ResNet50_1x.zip`` SimCLR v1 archives.
* Other pickles (BYOL's dill pickles of Haiku parameters): a restricted
  unpickler that rebuilds numpy arrays and plain containers; every other class
  or function named in the file becomes an inert placeholder and is never
  imported or called.

No reader executes code from a file. Nested containers are flattened with
``/`` between levels (``state_dict/module.conv1.weight``,
``teacher/backbone.cls_token``, ``experiment_state/online_params/<haiku
module path>/w``). One rule splits what a file holds (:func:`flatten`): every
array is an entry of the flat mapping, which the converters account for key by
key; every sub-tree that holds no array (``epoch``, ``args``, empty optimizer or
scheduler containers, scaler states, Lightning loop and callback state,
hyper-parameters) is bookkeeping, summarised in ``FlatCheckpoint.metadata``;
every object that was not rebuilt is listed in ``FlatCheckpoint.neutralised``.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import pathlib
import pickle
import tempfile
import types
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from qscore_jax._text import install_hint

try:  # numpy >= 2
  from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
  from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

# A legacy (pre-1.6, non-zip) torch file starts with this pickled magic number.
_TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


class ReaderError(ValueError):
  """A checkpoint file cannot be read; the message says why and what to do."""


# ----------------------------------------------------------------- flattening

class FlatCheckpoint(dict):
  """What a reader found in a file: ``{path: numpy array}`` plus what holds no array.

  The dict itself maps the path of every *array* of the file (torch tensors,
  numpy arrays of any rank, TF variables) to a numpy array; only these go
  through the converters' strict key accounting.

  Args:
    arrays: the ``{path: array}`` items.
    metadata, neutralised: the attributes below (default empty).
    source: where the file was read from, for messages (default ``'the file'``).

  Attributes:
    metadata: ``{path: JSON-able summary}`` of every part of the file that holds
      no array: numbers, strings, None, empty containers, ``argparse.Namespace``
      arguments, scaler states, Lightning loop/callback state, hyper-parameters
      (the shared rule of :func:`flatten`: a sub-tree without an array is
      bookkeeping, whatever its name).
    neutralised: ``{path: global}`` of every object of an untrusted pickle that
      was *not* rebuilt because rebuilding it would mean calling code named in
      the file (``posix.system``, an optax state class, ...). Nothing was
      called; whether the conversion may go on without it is decided by the
      converter (only inside parts it drops, and then with a warning).
  """

  def __init__(self, arrays=(), *, metadata=None, neutralised=None, source=None):
    super().__init__(arrays)
    self.metadata: dict[str, Any] = dict(metadata or {})
    self.neutralised: dict[str, str] = dict(neutralised or {})
    self.source: str = str(source) if source is not None else 'the file'  # for messages


def _is_array(value: Any) -> bool:
  return isinstance(value, np.ndarray) or (hasattr(value, 'detach') and hasattr(value, 'numpy'))


def _as_container(node: Any) -> Any:
  """Namespaces, namedtuples and known data classes as dicts; everything else unchanged."""
  if isinstance(node, argparse.Namespace):
    return vars(node)
  if isinstance(node, _Placeholder) and node.is_known_container():
    return node.as_container()
  if hasattr(node, '_asdict') and isinstance(node, tuple):  # namedtuple
    return node._asdict()
  return node


def _key_name(key: Any) -> str:
  # A class used as a key (Lightning <= 1.4 keyed callback states by their type)
  # is a placeholder in an untrusted file: named by what it stands for.
  return key.name if isinstance(key, _Placeholder) else str(key)


def _children(node: Any) -> list[tuple[str, Any]]:
  if isinstance(node, Mapping):
    return [(_key_name(k), v) for k, v in node.items()]
  if isinstance(node, (list, tuple)):
    return [(str(i), v) for i, v in enumerate(node)]
  return []


def _contains(node: Any) -> tuple[bool, bool]:
  """(holds an array, holds an object that was not rebuilt) anywhere below ``node``."""
  node = _as_container(node)
  if _is_array(node):
    return True, False
  if isinstance(node, _Placeholder):
    return False, True
  has_array = False
  has_placeholder = isinstance(node, Mapping) and any(isinstance(k, _Placeholder) for k in node)
  for _, child in _children(node):
    child_array, child_placeholder = _contains(child)
    has_array, has_placeholder = has_array or child_array, has_placeholder or child_placeholder
    if has_array and has_placeholder:
      break
  return has_array, has_placeholder


_SUMMARY_ITEMS = 40
_SUMMARY_DEPTH = 4
_SUMMARY_TEXT = 200


def summarize(node: Any, depth: int = 0) -> Any:
  """A bounded JSON-able summary of bookkeeping (numbers, strings, args, states).

  Args:
    node: a part of a checkpoint that holds no array.
    depth: nesting level of ``node`` (default 0); deeper levels are abbreviated.
  Returns:
    JSON-able: numbers, strings and small containers as they are; long lists,
    long strings and deep nests shortened with a note of what was left out.
  """
  node = _as_container(node)
  if isinstance(node, _Placeholder):
    return f'<{node.name}: not rebuilt>'
  if node is None or isinstance(node, (bool, int, str)):
    return node if not isinstance(node, str) or len(node) <= _SUMMARY_TEXT else (
        node[:_SUMMARY_TEXT] + f'... ({len(node)} characters)')
  if isinstance(node, float):
    return node if math.isfinite(node) else repr(node)
  if isinstance(node, np.generic):
    return summarize(node.item(), depth)
  if isinstance(node, (bytes, bytearray)):
    return f'<{len(node)} bytes>'
  if isinstance(node, Mapping):
    if depth >= _SUMMARY_DEPTH:
      return f'<mapping of {len(node)} entries>'
    items = list(node.items())
    out = {_key_name(k): summarize(v, depth + 1) for k, v in items[:_SUMMARY_ITEMS]}
    if len(items) > _SUMMARY_ITEMS:
      out['...'] = f'{len(items) - _SUMMARY_ITEMS} more entries'
    return out
  if isinstance(node, (list, tuple, set, frozenset)):
    items = list(node)
    if len(items) > 8 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              for v in items):
      return f'<{len(items)} numbers>'
    if depth >= _SUMMARY_DEPTH:
      return f'<list of {len(items)} items>'
    out = [summarize(v, depth + 1) for v in items[:_SUMMARY_ITEMS]]
    if len(items) > _SUMMARY_ITEMS:
      out.append(f'... {len(items) - _SUMMARY_ITEMS} more items')
    return out
  return summarize(repr(node), depth)


def flatten(tree: Any, prefix: str = '') -> FlatCheckpoint:
  """Flattens a loaded checkpoint into arrays and bookkeeping, by one rule.

  Dicts, lists, tuples, namedtuples and Namespaces are walked with ``/`` between
  levels; every array becomes an entry of the result. A sub-tree that holds no
  array at all (``epoch``, ``args``, an empty ``optimizer: {}``, Lightning's
  ``lr_schedulers: []``, a scaler state of floats, hyper-parameters) is not
  walked further: it becomes one entry of ``metadata``, summarised. An object
  of an untrusted pickle that was not rebuilt is recorded in ``neutralised``.

  Args:
    tree: the loaded object.
    prefix: path of ``tree`` itself (default ``''``).
  Returns:
    The :class:`FlatCheckpoint`.
  """
  out = FlatCheckpoint()

  def visit(node, path):
    node = _as_container(node)
    if _is_array(node):
      out[path] = _to_numpy(node)
      return
    if isinstance(node, _Placeholder):
      out.neutralised[path] = node.name
      out.metadata[path] = summarize(node)
      return
    has_array, has_placeholder = _contains(node)
    if not (has_array or has_placeholder):
      out.metadata[path] = summarize(node)
      return
    if isinstance(node, Mapping):
      for key in node:
        if isinstance(key, _Placeholder):
          out.neutralised[f'{path}/{key.name}' if path else key.name] = key.name
    for key, value in _children(node):
      visit(value, f'{path}/{key}' if path else key)

  visit(tree, prefix)
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  tensor = value.detach().cpu()  # a torch.Tensor
  if str(tensor.dtype) == 'torch.bfloat16':
    tensor = tensor.float()
  return tensor.numpy()


# ---------------------------------------------------------------- PyTorch

# Lightning's AttributeDict (a dict with attribute access) is rebuilt as a plain
# dict: torch's weights-only unpickler fills only exact dicts.
_LIGHTNING_ATTRIBUTE_DICTS = ('pytorch_lightning.utilities.parsing.AttributeDict',
                              'lightning.fabric.utilities.data.AttributeDict',
                              'lightning_fabric.utilities.data.AttributeDict')


def read_torch(path: str | os.PathLike) -> FlatCheckpoint:
  """Reads a PyTorch checkpoint without running code from it.

  First ``torch.load(weights_only=True)`` (tensors, plain containers,
  ``argparse.Namespace`` and Lightning ``AttributeDict`` only). When that
  refuses a global (an omegaconf config in Lightning's ``hyper_parameters``,
  a ``pathlib`` path in ``args``, or a payload such as ``posix.system``), the
  file is read again with the restricted unpickler of :func:`read_pickle`:
  tensors are rebuilt, the refused objects become inert placeholders recorded
  in :attr:`FlatCheckpoint.neutralised`, and nothing named in the file is
  called. The converter then refuses the file if such an object sits in a part
  it needs, and warns when it sits in a part it drops.

  Args:
    path: a ``.pth`` / ``.pth.tar`` / Lightning ``.ckpt`` file (needs torch).
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  try:
    # torch only for PyTorch files: an optional 5 GB dependency.
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ReaderError(
        f'Reading {path} needs PyTorch, which is not installed. Install the converter '
        f'extra: {install_hint("convert")}; or pip install torch.') from None
  allowed = [argparse.Namespace] + [(dict, name) for name in _LIGHTNING_ATTRIBUTE_DICTS]
  _check_zip_crc(path)
  try:
    with torch.serialization.safe_globals(allowed):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    refused = refused_globals(error)
    try:
      obj, named = _torch_load_restricted(torch, path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, zipfile.BadZipFile) as second:
      raise ReaderError(
          f'{path} contains Python objects that qscore_jax refuses to load, because '
          f'unpickling them would run code from the file: '
          f'{", ".join(refused) or "an object PyTorch would not name"}. Nothing was run, and '
          f'the file could not be read without them either ({_first_line(second)}). If you '
          'trust the file, re-save just its weights in PyTorch: torch.save(torch.load(path, '
          'weights_only=False)["state_dict"], "weights.pth").') from None
    del named
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
    raise ReaderError(
        f'{path} is not a readable PyTorch checkpoint: it is truncated or corrupt '
        f'({_first_line(error)}). Download it again; `qscore convert <model id>` '
        're-downloads a file whose digest does not match the registry.') from None
  if isinstance(obj, _Placeholder):
    raise ReaderError(_refusal(path, {'': obj.name}))
  if hasattr(obj, 'state_dict') and not isinstance(obj, Mapping):
    raise ReaderError(f'{path} holds a whole module object, not a state dict.')
  return flatten(obj)


_ANSI_ESCAPE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_GLOBAL_NAME = re.compile(r'GLOBAL ([\w.]+)|global[s]? [`\'"]?([A-Za-z_][\w]*(?:\.[\w]+)+)')


def refused_globals(error: BaseException) -> list[str]:
  """The globals PyTorch's weights-only unpickler refused, parsed from its message.

  PyTorch's text spans many lines, carries ANSI escape codes and says e.g.
  ``Unsupported global: GLOBAL posix.system was not an allowed global``.

  Args:
    error: the ``UnpicklingError`` of ``torch.load(weights_only=True)``.
  Returns:
    The dotted names, in order of appearance, without duplicates.
  """
  text = _ANSI_ESCAPE.sub('', str(error))
  names = []
  for match in _GLOBAL_NAME.finditer(text):
    name = match.group(1) or match.group(2)
    if name and name not in names and not name.startswith('torch.serialization'):
      names.append(name)
  return names


def _refusal(path, neutralised: Mapping[str, str], where: str = '') -> str:
  """The one-paragraph refusal of a file that needs a neutralised object."""
  places = '; '.join(f'{name} at {key or "the top level"!r}'
                     for key, name in list(neutralised.items())[:6])
  more = f' (and {len(neutralised) - 6} more)' if len(neutralised) > 6 else ''
  return (f'{path} contains Python objects that qscore_jax refuses to load, because '
          f'unpickling them would run code from the file: {places}{more}{where}. Nothing was '
          'run. If you trust the file, re-save just its weights with the library that wrote '
          'it, e.g. torch.save(torch.load(path, weights_only=False)["state_dict"], '
          '"weights.pth").')


def _torch_load_restricted(torch, path):
  """``torch.load`` through :class:`_RestrictedUnpickler` (torch's own tensor rebuilders
  allowed, every other global a placeholder). Returns (object, neutralised names)."""
  module = types.ModuleType('qscore_jax_restricted_pickle')
  allowed = dict(_torch_safe_globals(torch))
  names: set[str] = set()

  class Unpickler(_RestrictedUnpickler):
    _EXTRA = allowed

    def __init__(self, file, **kwargs):  # torch passes encoding='utf-8' (and nothing else)
      super().__init__(file, encoding=kwargs.get('encoding', 'ASCII'))
      self.neutralised = names

  module.Unpickler = Unpickler
  module.UnpicklingError = pickle.UnpicklingError
  module.load = lambda f, **kwargs: Unpickler(f).load()
  obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=module)
  return obj, names


def _torch_safe_globals(torch) -> dict[tuple[str, str], Any]:
  """The globals ``torch.load(weights_only=True)`` itself allows (tensor rebuilders,
  storages, dtypes), as ``{(module, name): object}``."""
  try:
    # torch only for PyTorch files: an optional 5 GB dependency.
    from torch import _weights_only_unpickler  # pylint: disable=import-outside-toplevel
    table = _weights_only_unpickler._get_allowed_globals()  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # an older or newer torch: the essentials
    table = {'torch._utils._rebuild_tensor_v2': torch._utils._rebuild_tensor_v2,  # pylint: disable=protected-access
             'torch._utils._rebuild_parameter': torch._utils._rebuild_parameter,  # pylint: disable=protected-access
             'torch.Size': torch.Size, 'collections.OrderedDict': collections.OrderedDict}
  out = {}
  for dotted, obj in table.items():
    module, _, name = dotted.rpartition('.')
    out[(module, name)] = obj
  out[('argparse', 'Namespace')] = argparse.Namespace
  return out


def _check_zip_crc(path) -> None:
  """PyTorch's zip format stores a CRC-32 per member that torch.load never checks."""
  try:
    with zipfile.ZipFile(path) as archive:
      bad = archive.testzip()
  except zipfile.BadZipFile:
    return  # not a zip (legacy format) or truncated: torch.load reports it
  except (OSError, EOFError, zlib.error) as error:
    raise ReaderError(f'{path} is a damaged zip archive ({_first_line(error)}). '
                      'Download it again.') from None
  if bad is not None:
    raise ReaderError(
        f'{path} is corrupt: the CRC-32 of its member {bad!r} does not match its content. '
        'Download it again; `qscore convert <model id>` re-downloads it.')


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


# ---------------------------------------------------------------- TF1

def _tf1_prefix(path: pathlib.Path) -> pathlib.Path:
  """The checkpoint prefix of a TF1 checkpoint given as prefix, .index file or directory."""
  if path.is_dir():
    state = path / 'checkpoint'
    if state.is_file():  # "model_checkpoint_path: ..." names the newest prefix
      for line in state.read_text().splitlines():
        if line.startswith('model_checkpoint_path:'):
          name = line.split(':', 1)[1].strip().strip('"')
          return path / pathlib.Path(name).name
    indexes = sorted(path.glob('*.index'))
    if len(indexes) != 1:
      raise ReaderError(f'{path} should hold exactly one TF1 checkpoint (*.index file); '
                        f'found {len(indexes)}. Pass the checkpoint prefix instead.')
    return indexes[0].with_suffix('')
  if path.suffix == '.index':
    return path.with_suffix('')
  if path.name.endswith('.data-00000-of-00001'):
    return path.with_name(path.name[:-len('.data-00000-of-00001')])
  return path


def is_tf1_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` (a prefix, ``.index``/``.data`` file or directory) names a TF1 checkpoint.

  Args:
    path: the path to test (its ``<prefix>.index`` file must exist).
  """
  path = pathlib.Path(path)
  try:
    prefix = _tf1_prefix(path)
  except ReaderError:
    return False
  return prefix.with_name(prefix.name + '.index').is_file()


def read_tf1(path: str | os.PathLike) -> FlatCheckpoint:
  """Reads every variable of a TF1 checkpoint (needs TensorFlow).

  Args:
    path: the checkpoint prefix, its ``.index`` or ``.data`` file, or a directory.
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  prefix = _tf1_prefix(pathlib.Path(path))
  if not prefix.with_name(prefix.name + '.index').is_file():
    raise ReaderError(f'{prefix}.index does not exist: {path} is not a TF1 checkpoint prefix.')
  # TensorFlow only for TF1 checkpoints.
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  try:
    reader = tf.train.load_checkpoint(str(prefix))
    names = sorted(reader.get_variable_to_shape_map())
    return FlatCheckpoint({name: np.asarray(reader.get_tensor(name)) for name in names})
  except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as error:
    raise ReaderError(
        f'The TF1 checkpoint {prefix} is truncated or corrupt ({_first_line(error)}). '
        'Download its .index and .data files again.') from None


def read_zip(path: str | os.PathLike) -> FlatCheckpoint:
  """Reads the TF1 checkpoint inside a zip archive (SimCLR v1's ResNet50_*x.zip).

  Args:
    path: the zip file; it must contain exactly one ``*.index``.
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  try:
    with zipfile.ZipFile(path) as archive:
      members = [m for m in archive.namelist()
                 if m.endswith('.index') or '.data-' in m.rsplit('/', 1)[-1]]
      indexes = [m for m in members if m.endswith('.index')]
      if len(indexes) != 1:
        raise ReaderError(f'{path} should contain exactly one TF1 checkpoint (*.index); '
                          f'it contains {len(indexes)}.')
      prefix = indexes[0][:-len('.index')]
      with tempfile.TemporaryDirectory(prefix='qscore_jax_zip_') as tmp:
        for member in members:
          if member.startswith(prefix + '.'):
            target = pathlib.Path(tmp) / pathlib.Path(member).name
            with archive.open(member) as src, open(target, 'wb') as dst:
              while chunk := src.read(1 << 24):
                dst.write(chunk)
        return read_tf1(pathlib.Path(tmp) / pathlib.Path(prefix).name)
  except (zipfile.BadZipFile, EOFError, OSError) as error:
    raise ReaderError(f'{path} is a damaged zip archive ({_first_line(error)}). '
                      'Download it again.') from None


# ---------------------------------------------------------------- restricted pickle

# Field names of the namedtuples the published pickles hold, so that their
# positional arguments flatten to readable names (BYOL's checkpointing.py).
_KNOWN_FIELDS = {
    'byol.byol_experiment._ByolExperimentState': (
        'online_params', 'target_params', 'online_state', 'target_state', 'opt_state'),
    'byol.utils.optimizers.LarsState': ('mu',),
}
# Classes that only hold data and whose pickled content is read as a plain
# container, never instantiated: the namedtuples above, Haiku's immutable
# parameter mappings, Lightning's AttributeDict.
_KNOWN_CONTAINERS = frozenset(_KNOWN_FIELDS) | frozenset(_LIGHTNING_ATTRIBUTE_DICTS) | {
    'haiku._src.data_structures.FlatMapping', 'haiku._src.data_structures.FlatMap',
    'haiku.data_structures.FlatMapping',
}


def _pure_path(*parts):
  """``pathlib.PosixPath(*parts)`` as pickled in training arguments, rebuilt as text."""
  return str(pathlib.PurePosixPath(*[str(p) for p in parts]))


class _Placeholder:
  """What a class or function named in an untrusted pickle turns into.

  It records its name, the arguments it is called or instantiated with and
  any state or items given to it, and does nothing else: no module is
  imported, no code of the file runs. :meth:`as_container` exposes what it
  holds so that the arrays inside (a namedtuple's fields, a mapping's items)
  can still be flattened.
  """

  def __new__(cls, *args, **kwargs):
    if isinstance(cls, _Placeholder):  # NEWOBJ: "cls.__new__(cls, *args)" on a placeholder class
      return _Placeholder(cls.name, args, kwargs)
    return object.__new__(cls)

  def __init__(self, name: str, args=(), kwargs=None):
    self.name, self.args, self.kwargs = name, tuple(args), dict(kwargs or {})
    self.state, self.items = None, []

  def __call__(self, *args, **kwargs):  # REDUCE: a call of the named class or function
    return _Placeholder(self.name, args, kwargs)

  def __setstate__(self, state):  # BUILD
    self.state = state

  def __setitem__(self, key, value):  # SETITEMS
    self.items.append((key, value))

  def append(self, value):  # APPENDS
    self.items.append((len(self.items), value))

  def extend(self, values):
    for value in values:
      self.append(value)

  def is_known_container(self) -> bool:
    """Whether this stands for a data class whose content can be read as a container."""
    module, _, cls = self.name.rpartition('.')
    # optax's and BYOL's optimizer states are NamedTuples of arrays (ScaleByLarsState,
    # AddWeightDecayState, ScaleState, ...): their fields are read, nothing is called.
    optimizer_state = cls.endswith('State') and (
        module == 'optax' or module.startswith('optax.') or module == 'byol.utils.optimizers')
    return self.name in _KNOWN_CONTAINERS or optimizer_state

  def as_container(self) -> Any:
    if self.items:
      return dict(self.items)
    if isinstance(self.state, Mapping):
      return dict(self.state)
    if self.state is not None:
      return self.state
    fields = _KNOWN_FIELDS.get(self.name)
    if fields and len(self.args) <= len(fields):
      return {**dict(zip(fields, self.args)), **self.kwargs}
    if len(self.args) == 1 and isinstance(self.args[0], (Mapping, list, tuple)) and not self.kwargs:
      return self.args[0]
    return {**{str(i): a for i, a in enumerate(self.args)}, **self.kwargs}

  def __repr__(self):
    return f'<placeholder {self.name}>'


def _new_placeholder(cls, *args):
  """``copyreg.__newobj__``: cls.__new__(cls, *args) without running any class."""
  if isinstance(cls, _Placeholder):
    return _Placeholder(cls.name, args)
  raise pickle.UnpicklingError(f'refusing to instantiate {cls!r}')


def _latin1_encode(text, encoding='utf-8', errors='strict'):
  """``_codecs.encode`` as protocol-2 pickles use it to carry bytes (latin-1 only)."""
  if encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'refusing _codecs.encode with encoding {encoding!r}')
  return text.encode('latin-1', errors)


def _reconstruct_dict(cls, base, state):  # copyreg._reconstructor
  del base
  if isinstance(cls, _Placeholder):
    return _Placeholder(cls.name, (state,) if state is not None else ())
  raise pickle.UnpicklingError(f'refusing to reconstruct {cls!r}')


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Rebuilds numpy arrays and builtin containers; everything else is a placeholder.

  The pure-Python unpickler is used because the C one insists that NEWOBJ
  targets are real types, which a placeholder for an unknown class is not.
  """

  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'): _multiarray._reconstruct,  # pylint: disable=protected-access
      ('numpy._core.multiarray', '_reconstruct'): _multiarray._reconstruct,  # pylint: disable=protected-access
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): np.dtype,
      ('numpy.core.multiarray', 'scalar'): _multiarray.scalar,
      ('numpy._core.multiarray', 'scalar'): _multiarray.scalar,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('builtins', 'dict'): dict, ('builtins', 'list'): list, ('builtins', 'tuple'): tuple,
      ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
      ('builtins', 'bytearray'): bytearray, ('builtins', 'complex'): complex,
      ('__builtin__', 'dict'): dict, ('__builtin__', 'list'): list,
      ('copy_reg', '_reconstructor'): _reconstruct_dict,
      ('copyreg', '_reconstructor'): _reconstruct_dict,
      ('copyreg', '__newobj__'): _new_placeholder,
      ('_codecs', 'encode'): _latin1_encode,
      ('builtins', 'object'): object,
      ('collections', 'defaultdict'): collections.defaultdict,
      ('pathlib', 'PosixPath'): _pure_path, ('pathlib', 'PurePosixPath'): _pure_path,
      ('pathlib', 'WindowsPath'): _pure_path, ('pathlib', 'PureWindowsPath'): _pure_path,
      ('pathlib', 'Path'): _pure_path,
  }
  _EXTRA: Mapping[tuple[str, str], Any] = {}  # more allowed globals (torch's, for torch files)

  def __init__(self, file, *, encoding: str = 'ASCII'):
    super().__init__(file, encoding=encoding)
    self.neutralised: set[str] = set()  # names that became placeholders

  def find_class(self, module: str, name: str):
    allowed = self._ALLOWED.get((module, name), self._EXTRA.get((module, name)))
    if allowed is not None:
      return allowed
    self.neutralised.add(f'{module}.{name}')
    return _Placeholder(f'{module}.{name}')


def read_pickle(path: str | os.PathLike) -> FlatCheckpoint:
  """Reads an untrusted (dill) pickle such as BYOL's, without running its code.

  Numpy arrays and builtin containers are rebuilt, and so are the data classes
  of the releases (BYOL's experiment-state namedtuple, Haiku's parameter
  mappings); every other object the file names is a placeholder, recorded in
  :attr:`FlatCheckpoint.neutralised` (see :func:`read_torch` for what the
  converter then does).

  Args:
    path: the pickle file.
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  try:
    with open(path, 'rb') as f:
      unpickler = _RestrictedUnpickler(f)
      obj = unpickler.load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, MemoryError) as error:
    raise ReaderError(
        f'{path} is not a readable pickle: it is truncated, corrupt or uses constructs '
        f'qscore_jax does not rebuild ({type(error).__name__}: {_first_line(error)}). '
        'Download it again.') from None
  named = ''
  if unpickler.neutralised:
    named = (f' It names {", ".join(sorted(unpickler.neutralised)[:6])}, which qscore_jax '
             'neither imported nor called.')
  if isinstance(obj, _Placeholder) and not obj.is_known_container():
    raise ReaderError(f'{path} is not a checkpoint: its content is a call of {obj.name}, '
                      f'refused because loading it would run code.{named}')
  flat = flatten(obj)
  if not any(value.dtype.kind in 'fiub' and value.ndim > 0 for value in flat.values()):
    raise ReaderError(f'{path} contains no arrays; it is not a checkpoint.{named}')
  return flat


# ---------------------------------------------------------------- dispatch

def read_checkpoint(path: str | os.PathLike) -> FlatCheckpoint:
  """Reads any supported checkpoint, choosing the reader from the file's content.

  Args:
    path: a PyTorch file, a TF1 checkpoint (prefix, ``.index``, directory or
      zip) or a pickle.
  Returns:
    The :class:`FlatCheckpoint` (see :func:`flatten`).
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  flat = _read_any(pathlib.Path(path).expanduser())
  flat.source = str(path)
  return flat


def _read_any(path: pathlib.Path) -> FlatCheckpoint:
  """The reader for what ``path`` holds (see :func:`read_checkpoint`)."""
  if is_tf1_checkpoint(path):
    return read_tf1(path)
  if not path.exists():
    raise ReaderError(f'{path} does not exist. Give the path of a downloaded checkpoint, '
                      'or a registry id to download it (`qscore models` lists them).')
  if path.is_dir():
    raise ReaderError(f'{path} is a directory without a TF1 checkpoint in it.')
  with open(path, 'rb') as f:
    head = f.read(len(_TORCH_LEGACY_MAGIC))
  if not head:
    raise ReaderError(f'{path} is empty. Download it again.')
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(name.endswith('.index') for name in names):
      return read_zip(path)
    return read_torch(path)
  if head == _TORCH_LEGACY_MAGIC:
    return read_torch(path)
  if head[:1] == b'\x80':  # a pickle protocol header
    return read_pickle(path)
  if head[:2] == b'PK':  # a zip whose central directory is missing: truncated
    raise ReaderError(f'{path} is a truncated zip archive (PyTorch checkpoint or SimCLR zip). '
                      'Download it again.')
  raise ReaderError(
      f'{path} is not a checkpoint qscore_jax can read (it starts with {head[:8]!r}). '
      'Supported: PyTorch .pth/.pth.tar/.ckpt, TF1 checkpoints (prefix, .index or zip), '
      'and BYOL .pkl pickles.')


__all__ = ['FlatCheckpoint', 'ReaderError', 'flatten', 'refused_globals', 'summarize', 'is_tf1_checkpoint', 'read_checkpoint', 'read_pickle',
           'read_tf1', 'read_torch', 'read_zip']

"""Readers of the published checkpoint files; each returns a flat ``{name: array}``.

* PyTorch ``.pth`` / ``.pth.tar`` / Lightning ``.ckpt``: ``torch.load`` with
  ``weights_only=True`` (tensors and plain containers only). DINO's full
  checkpoints carry an ``argparse.Namespace`` and Lightning's may carry an
  ``AttributeDict``; exactly those two classes are allowed in addition.
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
module path>/w``); every leaf becomes a numpy array (numbers and strings as
0-d arrays).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import pickle
import tempfile
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

try:  # numpy >= 2
  from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
  from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

# A legacy (pre-1.6, non-zip) torch file starts with this pickled magic number.
_TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


class ReaderError(ValueError):
  """A checkpoint file cannot be read; the message says why and what to do."""


# ----------------------------------------------------------------- flattening

def flatten(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """Flattens dicts, lists, tuples, namedtuples and Namespaces into ``{path: array}``.

  Args:
    tree: the loaded object.
    prefix: path of ``tree`` itself (default ``''``); levels are joined with ``/``.
  Returns:
    ``{path: numpy array}`` (numbers and strings as 0-d arrays).
  """
  out: dict[str, np.ndarray] = {}

  def visit(node, path):
    if isinstance(node, argparse.Namespace):
      node = vars(node)
    if isinstance(node, _Placeholder):
      node = node.as_container()
    if hasattr(node, '_asdict') and isinstance(node, tuple):  # namedtuple
      node = node._asdict()
    if isinstance(node, Mapping):
      if not node and path:
        out[path] = np.asarray({}, dtype=object)
      for key, value in node.items():
        visit(value, f'{path}/{key}' if path else str(key))
    elif isinstance(node, (list, tuple)):
      if not node and path:
        out[path] = np.asarray([], dtype=np.float32)
      for index, value in enumerate(node):
        visit(value, f'{path}/{index}' if path else str(index))
    else:
      out[path] = _to_numpy(node)

  visit(tree, prefix)
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach') and hasattr(value, 'numpy'):  # torch.Tensor
    tensor = value.detach().cpu()
    if str(tensor.dtype) == 'torch.bfloat16':
      tensor = tensor.float()
    return tensor.numpy()
  if isinstance(value, np.ndarray):
    return value
  if isinstance(value, (bool, int, float, str, bytes, np.generic)) or value is None:
    return np.asarray(value)
  return np.asarray(repr(value))


# ---------------------------------------------------------------- PyTorch

# Lightning's AttributeDict (a dict with attribute access) is rebuilt as a plain
# dict: torch's weights-only unpickler fills only exact dicts.
_LIGHTNING_ATTRIBUTE_DICTS = ('pytorch_lightning.utilities.parsing.AttributeDict',
                              'lightning.fabric.utilities.data.AttributeDict',
                              'lightning_fabric.utilities.data.AttributeDict')


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint with ``weights_only=True`` into ``{path: array}``.

  Args:
    path: a ``.pth`` / ``.pth.tar`` / Lightning ``.ckpt`` file (needs torch).
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ReaderError(
        f'Reading {path} needs PyTorch, which is not installed. Install the converter '
        'extra: pip install "qscore-jax[convert]" (or pip install torch).') from None
  allowed = [argparse.Namespace] + [(dict, name) for name in _LIGHTNING_ATTRIBUTE_DICTS]
  _check_zip_crc(path)
  try:
    with torch.serialization.safe_globals(allowed):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    raise ReaderError(
        f'{path} contains Python objects that qscore_jax refuses to load, because '
        f'unpickling them could run code from the file ({_first_line(error)}). Only tensors, '
        'plain containers, argparse.Namespace and Lightning AttributeDicts are read. If you '
        'trust the file, re-save just its weights in PyTorch: '
        'torch.save(torch.load(path, weights_only=False)["state_dict"], "weights.pth").') from None
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
    raise ReaderError(
        f'{path} is not a readable PyTorch checkpoint: it is truncated or corrupt '
        f'({_first_line(error)}). Download it again; `qscore convert <model id>` '
        're-downloads a file whose digest does not match the registry.') from None
  if hasattr(obj, 'state_dict') and not isinstance(obj, Mapping):
    raise ReaderError(f'{path} holds a whole module object, not a state dict.')
  return flatten(obj)


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


def read_tf1(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every variable of a TF1 checkpoint (needs TensorFlow).

  Args:
    path: the checkpoint prefix, its ``.index`` or ``.data`` file, or a directory.
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  prefix = _tf1_prefix(pathlib.Path(path))
  if not prefix.with_name(prefix.name + '.index').is_file():
    raise ReaderError(f'{prefix}.index does not exist: {path} is not a TF1 checkpoint prefix.')
  from qscore_jax.data._tensorflow import tf  # pylint: disable=import-outside-toplevel
  try:
    reader = tf.train.load_checkpoint(str(prefix))
    names = sorted(reader.get_variable_to_shape_map())
    return {name: np.asarray(reader.get_tensor(name)) for name in names}
  except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as error:
    raise ReaderError(
        f'The TF1 checkpoint {prefix} is truncated or corrupt ({_first_line(error)}). '
        'Download its .index and .data files again.') from None


def read_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
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
  }

  def __init__(self, file):
    super().__init__(file)
    self.neutralised: set[str] = set()  # names that became placeholders

  def find_class(self, module: str, name: str):
    allowed = self._ALLOWED.get((module, name))
    if allowed is not None:
      return allowed
    self.neutralised.add(f'{module}.{name}')
    return _Placeholder(f'{module}.{name}')


def read_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads an untrusted (dill) pickle such as BYOL's, without running its code.

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
  if isinstance(obj, _Placeholder):
    raise ReaderError(f'{path} is not a checkpoint: its content is a call of {obj.name}, '
                      f'refused because loading it would run code.{named}')
  flat = flatten(obj)
  if not any(value.dtype.kind in 'fiub' and value.ndim > 0 for value in flat.values()):
    raise ReaderError(f'{path} contains no arrays; it is not a checkpoint.{named}')
  return flat


# ---------------------------------------------------------------- dispatch

def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads any supported checkpoint, choosing the reader from the file's content.

  Args:
    path: a PyTorch file, a TF1 checkpoint (prefix, ``.index``, directory or
      zip) or a pickle.
  Returns:
    ``{path: numpy array}`` (see :func:`flatten`).
  Raises:
    ReaderError: the file cannot be read (the message says why and what to do).
  """
  path = pathlib.Path(path).expanduser()
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


__all__ = ['ReaderError', 'flatten', 'is_tf1_checkpoint', 'read_checkpoint', 'read_pickle',
           'read_tf1', 'read_torch', 'read_zip']

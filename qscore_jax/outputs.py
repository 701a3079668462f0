"""Output directories: which ones qscore_jax wrote, and replacing them without losing anything.

Every output directory the tool creates carries a marker file, ``.qscore-output.json``
(``{"kind", "qscore_jax_version", "created"}``; kinds in :data:`KINDS`). Before a command
writes, :func:`check_output` looks at its directory:

* absent or empty: a new output;
* the marker of the same kind (or an older version's output, recognised by its exact layout,
  below): the kind's own behaviour. Stores, fine-tuning workdirs, the pipeline's analyses and
  interpretations are resumed or reused in place; a saved model and the report of
  ``qscore analyze`` are refused unless ``overwrite``, and then replaced;
* anything else (files without the marker, or the marker of another kind): refused, naming up
  to five of the files and their count. The tool deletes, replaces or writes into only the
  directories it wrote itself.

Staging. A replacement is written next to its target, in ``.<name>.partial-<random>/``:
``staging.json`` (pid, host, boot id and process start time of the writer) and ``output/``,
the new output. Once ``output/`` is complete, the old output is moved into the staging
directory, ``output/`` is renamed into place and the staging directory is deleted, so a
reader sees the old output or the new one, never half of one (:func:`staged_output`).
Removing a store for ``qscore embed --overwrite`` moves it into a staging directory first
(:func:`remove_output`). Every staging or removal first deletes the staging directories in
the same parent whose writer is no longer running on this host (:func:`clean_stale_staging`),
with a one-line note on stderr; one killed between its two renames gets its old output back.
Staging directories of a live process, of another host, or without ``staging.json`` (older
versions wrote none) are kept.

Outputs of versions before the marker are accepted as the tool's only when their whole
layout is the tool's: every entry is one the tool writes for that kind, and the JSON file
that defines the kind parses with its fields (a saved model: ``metadata.json`` with
``format_version`` 1, ``arch``, ``saved_at`` and an orbax ``variables/``; a store:
``metadata.json`` with ``shard_count``, ``dim``, ``split_size`` and only its own
``shard-*-of-*`` directories of ``.npy`` files and ``progress.json``; an analysis:
``report.json`` with ``feature_stats`` and ``misclassification`` beside ``scores.npz``,
``analysis_settings.json`` and its plots; an interpretation: ``interpret.json`` (or a
two-model ``comparison.json``) beside ``ious.npz`` and its figures; a fine-tuning workdir:
``run.json`` of exactly ``config`` and ``init``). Subdirectories that are themselves outputs
of the tool (a compare folder's stores, an interpretation's analysis, an experiment run's
``eval/``) are allowed inside the last four. One extra file makes the directory foreign. A
directory recognised this way gets its marker when it is reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import warnings
from typing import Any, Iterator

from qscore_jax._version import __version__

MARKER_FILE = '.qscore-output.json'
STAGING_FILE = 'staging.json'
STAGING_INFIX = '.partial-'
_PAYLOAD = 'output'
_REPLACED = 'replaced'
# Files listed in a refusal, and files counted before the count says "more than".
_SHOWN, _COUNTED = 5, 10_000

KINDS = {'model': 'a saved model', 'store': 'a representation store',
         'analysis': 'an analysis report', 'interpretation': 'an interpretation',
         'finetune': 'a fine-tuning workdir', 'track': 'a tracking report (qscore track)',
         'study': 'a study (qscore study)'}


class OutputError(FileExistsError):
  """An output directory holds something the tool may not replace, delete or write into."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _note(message: str) -> None:
  print(f'note: {message}', file=sys.stderr, flush=True)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'unknown output kind {kind!r}; kinds: {", ".join(KINDS)}.')


def _json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def write_json_atomic(path: pathlib.Path, data: Any, *, exclusive: bool = False) -> bool:
  """Writes ``data`` as JSON to ``path`` through a synced temporary file of its own (two
  processes never share one), renamed over ``path``; with ``exclusive``, linked instead,
  so that only the first of several writers creates it.

  Args:
    path: the file.
    data: what to write (JSON-serialisable).
    exclusive: create ``path`` only if it does not exist yet.
  Returns:
    Whether this call wrote ``path``.
  """
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared output from its readers
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(data, f, indent=2)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    if not exclusive:
      os.replace(tmp, path)
      return True
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)


def _is_bookkeeping(name: str) -> bool:
  return name == MARKER_FILE or name.startswith(MARKER_FILE + '.tmp-')


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The marker of an output directory, or None when it has none (or an unreadable one).

  Args:
    directory: the directory.
  """
  marker = _json(pathlib.Path(directory) / MARKER_FILE)
  return marker if isinstance(marker, dict) and marker.get('kind') in KINDS else None


def write_marker(directory: str | os.PathLike, kind: str) -> None:
  """Marks ``directory`` (created if needed) as an output of ``kind`` written by the tool.

  Written atomically; a marker of the same kind is kept as it is.

  Args:
    directory: the output directory.
    kind: one of :data:`KINDS`.
  Raises:
    OutputError: the directory carries the marker of another kind.
  """
  _check_kind(kind)
  directory = pathlib.Path(directory)
  existing = read_marker(directory)
  if existing is not None:
    if existing['kind'] != kind:
      raise OutputError(f'{directory} holds {KINDS[existing["kind"]]} written by qscore_jax, '
                        f'not {KINDS[kind]}; choose another output directory.')
    return
  directory.mkdir(parents=True, exist_ok=True)
  write_json_atomic(directory / MARKER_FILE, {'kind': kind, 'qscore_jax_version': __version__,
                                              'created': _now()})


# ------------------------------------------------------------- outputs of older versions

_SHARD = re.compile(r'shard-(\d{5})-of-(\d{5})')
_SHARD_FILES = {'representations.npy', 'labels.npy', 'ids.npy', 'progress.json',
                'progress.json.tmp'}
_ANALYSIS_FILES = {'report.json', 'scores.npz', 'analysis_settings.json',
                   'activation_frequencies.png', 'qscore_histograms.png', 'precision_recall.png',
                   'class_accuracy_vs_qscore.png', 'compression.png'}
_INTERPRETATION_FILES = {'interpret.json', 'ious.npz', 'heatmaps_by_qscore.png', 'report.md',
                         'comparison.json'}
_FEATURE_FIGURE = re.compile(r'feature_\d+_top_images\.png')
_FINETUNE_ENTRIES = {'run.json', 'run.tmp', 'checkpoints', 'best', 'metrics.jsonl',
                     'tensorboard', 'model'}


def _entries(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.iterdir() if not _is_bookkeeping(p.name))


def _has_keys(data: Any, *keys: str) -> bool:
  return isinstance(data, dict) and all(k in data for k in keys)


def _legacy_model(directory: pathlib.Path, names: set[str]) -> bool:
  # The layout weights.save_model wrote before markers.
  if not {'metadata.json', 'variables'} <= names <= {'metadata.json', 'variables', 'heads'}:
    return False
  meta = _json(directory / 'metadata.json')
  return (_has_keys(meta, 'format_version', 'arch', 'arch_options', 'heads', 'provenance',
                    'qscore_jax_version', 'saved_at') and meta['format_version'] == 1
          and all((directory / name / '_CHECKPOINT_METADATA').is_file()
                  for name in names - {'metadata.json'}))


def _legacy_store(directory: pathlib.Path, names: set[str]) -> bool:
  # The layout store.ShardWriter wrote before markers.
  meta = _json(directory / 'metadata.json')
  if not (_has_keys(meta, 'format_version', 'shard_count', 'dim', 'split_size')
          and meta['format_version'] == 1 and isinstance(meta['shard_count'], int)):
    return False
  for name in names - {'metadata.json', 'metadata.json.tmp'}:
    match = _SHARD.fullmatch(name)
    path = directory / name
    if (not match or int(match[2]) != meta['shard_count'] or int(match[1]) >= int(match[2])
        or path.is_symlink() or not path.is_dir()
        or not {p.name for p in path.iterdir()} <= _SHARD_FILES):
      return False
  return True


def _legacy_analysis(directory: pathlib.Path, names: set[str]) -> bool:
  return (_has_keys(_json(directory / 'report.json'), 'feature_stats', 'misclassification')
          and all(n in _ANALYSIS_FILES or _made_by_tool(directory / n) for n in names))


def _legacy_interpretation(directory: pathlib.Path, names: set[str]) -> bool:
  return ((_has_keys(_json(directory / 'interpret.json'), 'summary', 'config')
           or _has_keys(_json(directory / 'comparison.json'), 'paired_delta'))
          and all(n in _INTERPRETATION_FILES or _FEATURE_FIGURE.fullmatch(n)
                  or _made_by_tool(directory / n) for n in names))


def _legacy_finetune(directory: pathlib.Path, names: set[str]) -> bool:
  run = _json(directory / 'run.json')
  return (isinstance(run, dict) and set(run) == {'config', 'init'}
          and all(n in _FINETUNE_ENTRIES or _made_by_tool(directory / n) for n in names))


_LEGACY = {'model': _legacy_model, 'store': _legacy_store, 'analysis': _legacy_analysis,
           'interpretation': _legacy_interpretation, 'finetune': _legacy_finetune}


def _legacy_kind(directory: pathlib.Path) -> str | None:
  names = {p.name for p in _entries(directory)}
  return next((kind for kind, test in _LEGACY.items() if names and test(directory, names)), None)


def _made_by_tool(path: pathlib.Path) -> bool:
  """A subdirectory that is itself an output of the tool (marked, or of an older version)."""
  return (not path.is_symlink() and path.is_dir()
          and (read_marker(path) is not None or _legacy_kind(path) is not None))


# ------------------------------------------------------------------------ the check

@dataclasses.dataclass(frozen=True)
class _Found:
  state: str  # 'absent', 'empty', 'same', 'other', 'contents' (only the tool's outputs), 'foreign'
  kind: str | None = None
  marker: dict[str, Any] | None = None


def _look(directory: pathlib.Path, kind: str) -> _Found:
  if not directory.exists() and not directory.is_symlink():
    return _Found('absent')
  if directory.is_symlink() or not directory.is_dir():
    return _Found('foreign')
  marker = read_marker(directory)
  if marker is not None:
    return _Found('same' if marker['kind'] == kind else 'other', marker['kind'], marker)
  entries = _entries(directory)
  if not entries:
    return _Found('empty')
  legacy = _LEGACY.get(kind)  # kinds newer than the markers have no unmarked layout
  if legacy is not None and legacy(directory, {p.name for p in entries}):
    return _Found('same', kind)
  if all(_made_by_tool(p) for p in entries):
    return _Found('contents')
  return _Found('foreign', _legacy_kind(directory))


def _files(directory: pathlib.Path) -> tuple[list[str], int]:
  """Up to :data:`_SHOWN` paths under ``directory`` (files, and empty folders with a /) and
  their count (stopping at :data:`_COUNTED`)."""
  shown, count = [], 0
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    names = sorted(f for f in files if not _is_bookkeeping(f))
    if not names and not dirs and pathlib.Path(root) != directory:
      names = ['']  # an empty folder
    for name in names:
      count += 1
      if len(shown) < _SHOWN:
        relative = (pathlib.Path(root) / name).relative_to(directory)
        shown.append(f'{relative}/' if not name else str(relative))
      if count > _COUNTED:
        return shown, count
  return shown, count


def _foreign_message(directory: pathlib.Path, kind: str, found: _Found, option: str,
                     overwrite: bool) -> str:
  if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
    return (f'{directory} is {"a link" if directory.is_symlink() else "a file"}, not a '
            f'directory qscore_jax wrote; choose another output directory ({option}).')
  shown, count = _files(directory)
  total = f'more than {_COUNTED}' if count > _COUNTED else str(count)
  held = f'it holds {total} files, e.g. {", ".join(shown)}' if count else 'it holds no files'
  if found.state == 'other':
    what = f'{directory} holds {KINDS[found.kind]} written by qscore_jax, not {KINDS[kind]}'
  elif found.kind is not None:
    what = (f'{directory} looks like {KINDS[found.kind]} of an older qscore_jax, not '
            f'{KINDS[kind]}')
  else:
    what = f'{directory} is not empty and was not written by qscore_jax'
  verb = 'replaces' if overwrite else 'writes into, replaces or deletes'
  return (f'{what} ({held}). qscore_jax {verb} only directories it wrote itself as '
          f'{KINDS[kind]} (they carry {MARKER_FILE}); nothing was changed. Choose another '
          f'output directory ({option}): a new or empty one.')


def check_output(directory: str | os.PathLike, kind: str, *, overwrite: bool = False,
                 existing: str = 'keep', option: str = '--out',
                 contents_ok: bool = True) -> str:
  """Whether ``directory`` may receive an output of ``kind``; changes nothing.

  Args:
    directory: the output directory.
    kind: one of :data:`KINDS`.
    overwrite: the caller will replace an existing output of ``kind``.
    existing: what an existing output of ``kind`` without ``overwrite`` gets:
      ``'keep'`` (resumed or reused in place) or ``'refuse'`` (an error offering
      ``--overwrite``).
    option: how the user names the directory, for the messages (``'--out'``).
    contents_ok: an unmarked directory holding only the tool's own outputs (e.g. stores)
      counts as new (writers in place); False refuses it (a replacement would delete them).
  Returns:
    ``'new'`` (absent or empty, or only the tool's outputs) or ``'existing'`` (an output
    of ``kind``: reuse it, or replace it when ``overwrite``).
  Raises:
    OutputError: the directory holds anything else, or ``existing='refuse'`` and no
      ``overwrite``; the message lists some of its files and the ways out.
  """
  _check_kind(kind)
  if existing not in ('keep', 'refuse'):
    raise ValueError(f"existing must be 'keep' or 'refuse', not {existing!r}.")
  directory = pathlib.Path(directory).expanduser().resolve()
  found = _look(directory, kind)
  if found.state in ('absent', 'empty') or (found.state == 'contents' and contents_ok):
    return 'new'
  if found.state == 'same':
    if overwrite or existing == 'keep':
      return 'existing'
    written = (f' (written by qscore_jax {found.marker.get("qscore_jax_version")} on '
               f'{found.marker.get("created")})' if found.marker else '')
    raise OutputError(f'{directory} already holds {KINDS[kind]}{written}; pass --overwrite '
                      f'(overwrite=True) to replace it, or choose another output directory '
                      f'({option}).')
  raise OutputError(_foreign_message(directory, kind, found, option, overwrite))


def prepare_output(directory: str | os.PathLike, kind: str, *, option: str = '--out',
                   write: bool = True) -> str:
  """Checks an output written in place (resumed or reused when it exists) and marks it.

  Args:
    directory: the output directory.
    kind: one of :data:`KINDS`.
    option: how the user names the directory, for the messages.
    write: create and mark the directory (False on processes that do not write it).
  Returns:
    :func:`check_output`'s ``'new'`` or ``'existing'``.
  Raises:
    OutputError: see :func:`check_output`.
  """
  state = check_output(directory, kind, option=option)
  if write:
    write_marker(pathlib.Path(directory).expanduser(), kind)
  return state


# ------------------------------------------------------------------------ staging

def _boot_id() -> str | None:
  try:
    return pathlib.Path('/proc/sys/kernel/random/boot_id').read_text().strip()
  except OSError:
    return None


def _process_start(pid: int) -> int | None:
  """The start time of process ``pid`` (clock ticks after boot; Linux), None if unknown."""
  try:
    fields = pathlib.Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    return int(fields[19])
  except (OSError, IndexError, ValueError):
    return None


def writer_identity() -> dict[str, Any]:
  """Who this process is, for a later process to tell whether it still runs
  (:func:`writer_alive`): pid, host, boot id, the process's start time, and when."""
  return {'pid': os.getpid(), 'host': socket.gethostname(), 'boot_id': _boot_id(),
          'start_time': _process_start(os.getpid()), 'since': _now()}


def writer_alive(owner: dict[str, Any]) -> bool | None:
  """Whether the process a :func:`writer_identity` describes still runs: None when that
  cannot be told here (another host).

  Args:
    owner: a :func:`writer_identity` (``pid`` and ``host`` at least).
  """
  if owner.get('host') != socket.gethostname():
    return None
  if owner.get('boot_id') and _boot_id() and owner['boot_id'] != _boot_id():
    return False  # the machine restarted since
  pid = owner['pid']
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's live process
  started = _process_start(pid)
  if owner.get('start_time') is not None and started is not None:
    return started == owner['start_time']  # otherwise the pid was reused
  return True



class WriterLock:
  """An exclusive lock on an output, held while its writer lives.

  ``flock`` on the lock file (released by the kernel when the holder dies, however it
  dies); the file names the holder (:func:`writer_identity`) for the error a second
  writer gets, and is emptied on a clean release, so a non-empty file found unlocked is
  the stale lock of a killed writer, taken over with a warning. Where the file system has
  no ``flock``, the holder's pid is checked instead (same host only).

  Args:
    path: the lock file (created if missing; its directory must exist).
    error: the exception raised when another writer holds it.
    in_use: what the error says after "in use by pid N on HOST (since T):".
    taken_over: what the warning says after a stale lock is taken over.
  """

  def __init__(self, path: pathlib.Path, *, error: type[Exception] = OutputError,
               in_use: str = 'another qscore_jax process is writing it.',
               taken_over: str = ''):
    self.path = pathlib.Path(path)
    self._error, self._in_use_text, self._taken_over = error, in_use, taken_over
    self.file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      self._acquire()
    except BaseException:
      self.file.close()
      raise

  def _holder(self) -> dict[str, Any] | None:
    self.file.seek(0)
    try:
      holder = json.loads(self.file.read() or 'null')
    except json.JSONDecodeError:
      return {'pid': None, 'host': None, 'since': None}
    return holder if isinstance(holder, dict) else None

  def _in_use(self, holder: dict[str, Any]) -> Exception:
    return self._error(
        f'{self.path.parent} is in use by pid {holder.get("pid")} on {holder.get("host")} '
        f'(since {holder.get("since")}): {self._in_use_text} If that process is gone, '
        f'delete {self.path}.')

  def _acquire(self) -> None:
    try:
      fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      raise self._in_use(self._holder() or {}) from None
    except OSError as error:
      if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      locked = False
    holder = self._holder()
    if holder and holder.get('pid') != os.getpid():
      # Without flock here, trust the holder's identity (another host's counts as running).
      alive = writer_alive(holder) if isinstance(holder.get('pid'), int) else None
      if not locked and alive is not False:
        raise self._in_use(holder)
      warnings.warn(f'{self.path.parent}: taking over the lock of pid {holder.get("pid")} on '
                    f'{holder.get("host")}, which no longer runs (a killed writer); '
                    f'{self._taken_over}'.rstrip('; '), stacklevel=3)
    self.file.seek(0)
    self.file.truncate()
    json.dump(writer_identity(), self.file)
    self.file.flush()

  def release(self) -> None:
    """Empties the lock file (a clean release, not stale) and unlocks it."""
    if self.file.closed:
      return
    self.file.seek(0)
    self.file.truncate()
    self.file.flush()
    fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
    self.file.close()

def _owner(staging: pathlib.Path) -> dict[str, Any] | None:
  owner = _json(staging / STAGING_FILE)
  if (isinstance(owner, dict) and isinstance(owner.get('pid'), int) and owner['pid'] > 0
      and isinstance(owner.get('host'), str) and isinstance(owner.get('target'), str)):
    return owner
  return None


def clean_stale_staging(parent: str | os.PathLike) -> list[pathlib.Path]:
  """Deletes the staging directories in ``parent`` left by writers that no longer run.

  A staging directory (``.<name>.partial-*`` with ``staging.json``) is deleted only when its
  writer ran on this host and is gone (no such process, a reused pid, or a restart). If it
  was killed between moving the old output aside and renaming the new one into place, the
  old output is put back first. Each deletion prints a one-line note.

  Args:
    parent: the directory holding the outputs.
  Returns:
    The deleted staging directories.
  """
  parent = pathlib.Path(parent)
  removed = []
  if not parent.is_dir():
    return removed
  for staging in sorted(parent.glob(f'.*{STAGING_INFIX}*')):
    if staging.is_symlink() or not staging.is_dir():
      continue
    owner = _owner(staging)
    if owner is None:
      _note(f'kept {staging}: an unfinished output without {STAGING_FILE} (left by an older '
            'qscore_jax or being created); delete it by hand if no qscore command is writing '
            f'into {parent}.')
      continue
    if writer_alive(owner) is not False:
      continue  # a live writer's, or another host's
    target = parent / pathlib.Path(owner['target']).name
    replaced = staging / _REPLACED
    if replaced.is_dir() and not target.exists() and not target.is_symlink():
      try:
        os.rename(replaced, target)
        _note(f'restored {target}: a replacement of it was killed before it finished.')
      except OSError:
        pass  # another process restored it first
    shutil.rmtree(staging, ignore_errors=True)
    _note(f'removed {staging}: the unfinished output of process {owner["pid"]} on '
          f'{owner["host"]}, which is no longer running.')
    removed.append(staging)
  return removed


def _new_staging(directory: pathlib.Path) -> pathlib.Path:
  """A fresh staging directory beside ``directory``, carrying its writer's identity."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  clean_stale_staging(directory.parent)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{directory.name}{STAGING_INFIX}',
                                          dir=directory.parent))
  write_json_atomic(staging / STAGING_FILE, {**writer_identity(), 'target': directory.name})
  return staging


@contextlib.contextmanager
def staged_output(directory: str | os.PathLike, kind: str, *, overwrite: bool = False,
                  existing: str = 'refuse', option: str = '--out') -> Iterator[pathlib.Path]:
  """Writes an output of ``kind`` beside ``directory`` and renames it into place when done.

  Usage: ``with staged_output(path, 'model', overwrite=...) as staging: <write into staging>``.
  The output is checked before anything is written (:func:`check_output`, an unmarked
  directory of the tool's outputs counting as foreign) and again just before the swap. The
  old output, if any, is deleted only once the new one is in place; on an error the staging
  directory is deleted and the old output is untouched.

  Args:
    directory: the output directory.
    kind: one of :data:`KINDS`.
    overwrite: replace an existing output of ``kind``.
    existing: ``'refuse'`` (default) or ``'keep'``, see :func:`check_output`.
    option: how the user names the directory, for the messages.
  Yields:
    The (marked, otherwise empty) directory to write the new output into.
  Raises:
    OutputError: see :func:`check_output`.
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  checks = dict(overwrite=overwrite, existing=existing, option=option, contents_ok=False)
  check_output(directory, kind, **checks)
  staging = _new_staging(directory)
  try:
    payload = staging / _PAYLOAD
    write_marker(payload, kind)
    yield payload
    check_output(directory, kind, **checks)  # it may have changed while the output was made
    moved = directory.exists()
    if moved:
      os.rename(directory, staging / _REPLACED)
    try:
      os.rename(payload, directory)
    except BaseException:
      if moved:
        os.rename(staging / _REPLACED, directory)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def remove_output(directory: str | os.PathLike, kind: str, *, option: str = '--out') -> None:
  """Deletes an output of ``kind`` the tool wrote (for ``--overwrite`` of outputs written in
  place, such as stores). It is moved into a staging directory first, so a run killed while
  deleting leaves nothing half-deleted in its place.

  Args:
    directory: the output directory.
    kind: one of :data:`KINDS`.
    option: how the user names the directory, for the messages.
  Raises:
    OutputError: the directory is not an output of ``kind`` (nothing is deleted).
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  if check_output(directory, kind, overwrite=True, option=option) != 'existing':
    return
  staging = _new_staging(directory)
  try:
    os.rename(directory, staging / 'removed')  # not _REPLACED: never restored
  finally:
    shutil.rmtree(staging, ignore_errors=True)


__all__ = ['KINDS', 'MARKER_FILE', 'OutputError', 'WriterLock', 'check_output',
           'clean_stale_staging', 'prepare_output', 'read_marker', 'remove_output',
           'staged_output', 'write_marker']

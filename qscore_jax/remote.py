"""Outputs and inputs on ``gs://`` (or any other URL fsspec handles), through a local copy.

Everything else in qscore_jax reads and writes local directories: locks, staged
replacements and the checks of what a directory holds need a POSIX file system. A URL is
therefore worked on through a local copy in the cache (:func:`cache_root`,
``$QSCORE_REMOTE_CACHE`` or ``~/.cache/qscore_jax/remote``), at
``<cache>/<scheme>/<bucket>/<path>``:

* **an input** (a saved model, a store to analyse, a checkpoint file) is pulled
  (:func:`local_input`);
* **an output** (``--out``, ``--workdir``) is a :class:`WorkingCopy`: pulled when the
  command starts (so that a store or a fine-tuning run resumes from the bucket, and the
  usual checks of what the directory holds apply), pushed when it ends, whether it
  succeeded or not (a partial store is resumable), and, for fine-tuning, after every
  checkpoint (a preempted machine resumes from the bucket).

What a push guarantees. Each object is uploaded whole (cloud storage never shows half
an object), but a directory is many objects. So a push first marks the directory's
manifest, ``<url>/.qscore-sync.json``, incomplete, then uploads the files that changed
and deletes the ones the command removed, and writes the manifest last, listing every
file with its size and XXH3-64 hash. A pull verifies every file it downloads against the
manifest; an input whose manifest is missing a file, or says incomplete (a push that was
interrupted), is refused. A directory copied into the bucket by other means (no
manifest) is pulled as it is.

One writer at a time. While a working copy is open, ``<url>/.qscore-sync-lock.json``
names its writer (host, pid); a second writer is refused, on any machine. A lock whose
writer is known to be gone (same host) is taken over.

Limits: one process (``jax.process_count() == 1``): on a multi-host pod, every host would
push its own copy, so use a file system that all hosts mount (Filestore, gcsfuse) there.
tfds data directories are not copied: TensorFlow reads and writes ``gs://`` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Callable, Iterator

import fsspec
import jax
import xxhash

from qscore_jax import outputs

MANIFEST = '.qscore-sync.json'
LOCK = '.qscore-sync-lock.json'
# The writer locks of stores and workdirs (store.LOCK_FILE, finetune.workdir.LOCK_FILE) are
# this machine's (flock, a local pid): never uploaded, so that a copy pulled elsewhere holds
# no stale holder. The URL's own lock, LOCK, stands for them in the bucket.
LOCAL_ONLY = frozenset({'lock'})
_URL = re.compile(r'^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.+)$')
_CHUNK = 1 << 22


class RemoteError(OSError):
  """A URL that cannot be read or written as asked (what was wrong and what to do)."""


def is_url(path: str | os.PathLike | None) -> bool:
  """Whether ``path`` is a URL (``gs://...``, ``s3://...``; not ``file://``).

  Args:
    path: a path, a URL, or None.
  """
  if path is None or isinstance(path, pathlib.PurePath):
    return False
  match = _URL.match(os.fspath(path))
  return bool(match) and match['scheme'].lower() != 'file'


def cache_root() -> pathlib.Path:
  """Where local copies of URLs live: ``$QSCORE_REMOTE_CACHE``, else
  ``~/.cache/qscore_jax/remote``."""
  root = os.environ.get('QSCORE_REMOTE_CACHE') or '~/.cache/qscore_jax/remote'
  return pathlib.Path(root).expanduser().resolve()


def local_path(url: str) -> pathlib.Path:
  """The local copy of ``url``: ``<cache>/<scheme>/<bucket>/<path>``.

  Args:
    url: a URL (:func:`is_url`).
  Raises:
    RemoteError: ``url`` has no path, or ``..`` / empty parts.
  """
  match = _URL.match(str(url))
  parts = match['rest'].strip('/').split('/') if match else []
  if not parts or any(p in ('', '.', '..') for p in parts):
    raise RemoteError(f'{url!r} is not a URL of a directory or file: give '
                      'SCHEME://BUCKET/PATH, e.g. gs://my-bucket/qscore/store.')
  return cache_root().joinpath(match['scheme'].lower(), *parts)


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
  try:
    fs, path = fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as error:
    raise RemoteError(f'cannot open {url}: {error} (gs:// needs gcsfs, which qscore_jax '
                      'installs; other schemes need their fsspec package, e.g. s3fs).') from error
  fs.invalidate_cache()  # listings of an earlier call may be stale
  return fs, path.rstrip('/')


def exists(url: str) -> bool:
  """Whether the object or directory ``url`` exists.

  Args:
    url: a URL (:func:`is_url`).
  """
  fs, path = _fs(url)
  return fs.exists(path)


# Hashes by (path, size, mtime): a fine-tuning push after each checkpoint rereads only the
# files that changed, not every earlier checkpoint.
_HASHES: dict[tuple[str, int, int], str] = {}


def _hash(path: pathlib.Path) -> str:
  stat = path.stat()
  key = (str(path), stat.st_size, stat.st_mtime_ns)
  if key not in _HASHES:
    _HASHES[key] = _hash_bytes(path)
  return _HASHES[key]


def _hash_bytes(path: pathlib.Path) -> str:
  digest = xxhash.xxh3_64()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _local_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Every file under ``root`` by its '/'-joined relative path, writer locks excluded."""
  return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob('*'))
          if p.is_file() and p.name not in LOCAL_ONLY}


def _remote_files(fs, path: str) -> dict[str, int]:
  """Every object under directory ``path`` (bookkeeping excluded), with its size."""
  found = fs.find(path, detail=True) if fs.isdir(path) else {}
  files = {}
  for name, info in found.items():
    rel = name[len(path):].lstrip('/')
    if rel and rel not in (MANIFEST, LOCK) and info.get('type', 'file') == 'file':
      files[rel] = int(info.get('size') or 0)
  return files


def _read_json(fs, path: str) -> Any:
  try:
    return json.loads(fs.cat_file(path))
  except FileNotFoundError:
    return None
  except ValueError:
    return {'complete': False}  # unreadable: treat as an interrupted push


def _create(fs, path: str, data: bytes) -> None:
  """Writes ``path`` only if it does not exist (GCS ``ifGenerationMatch=0``), else raises
  FileExistsError; on a file system without exclusive writes, checks first."""
  try:
    fs.pipe_file(path, data, mode='create')
  except TypeError:  # an fsspec implementation without mode='create'
    if fs.exists(path):
      raise FileExistsError(path) from None
    fs.pipe_file(path, data)


def _download(fs, remote: str, local: pathlib.Path) -> None:
  local.parent.mkdir(parents=True, exist_ok=True)
  partial = local.with_name(local.name + '.qscore-download')
  fs.get_file(remote, str(partial))
  os.replace(partial, local)  # never half a file in the cache


def pull(url: str, *, must_exist: bool = True, strict: bool = True) -> pathlib.Path:
  """Makes the local copy of ``url`` (a directory or one file) identical to it.

  Files whose local copy already has the manifest's hash are not downloaded again;
  local files the URL no longer has are deleted (the copy is the tool's own).

  Args:
    url: the directory or file.
    must_exist: raise if ``url`` does not exist (else return the path of an empty copy).
    strict: refuse a directory whose manifest says an upload was interrupted or misses
      a file (inputs); otherwise download what is there (an output to resume, whose own
      checks follow).
  Returns:
    The local copy (:func:`local_path`).
  Raises:
    RemoteError: ``url`` is missing, incompletely uploaded, or a file differs from its
      manifest after download.
  """
  local = local_path(url)
  fs, path = _fs(url)
  if fs.isfile(path):
    _download(fs, path, local)
    return local
  remote = _remote_files(fs, path)
  manifest = _read_json(fs, f'{path}/{MANIFEST}')
  if not remote and manifest is None:
    if must_exist:
      raise RemoteError(f'{url} does not exist (or is empty); check the URL.')
    if local.exists():
      shutil.rmtree(local) if local.is_dir() else local.unlink()
    return local
  listed = (manifest or {}).get('files', {})
  if strict and manifest is not None:
    missing = sorted(set(listed) - set(remote))
    if not manifest.get('complete') or missing:
      raise RemoteError(
          f'{url} was being uploaded, or its upload was interrupted ('
          + (f'missing {missing[:3]}' if missing else 'its manifest is marked incomplete')
          + '): rerun the command that wrote it.')
  if local.is_file():
    local.unlink()
  have = _local_files(local) if local.is_dir() else {}
  for rel, file in have.items():
    if rel not in remote:
      file.unlink()
  for rel, size in remote.items():
    target = local / rel
    expected = listed.get(rel, {}).get('xxh3') if manifest and manifest.get('complete') else None
    if expected and rel in have and target.stat().st_size == size and _hash(target) == expected:
      continue
    _download(fs, f'{path}/{rel}', target)
    if expected and _hash(target) != expected:
      target.unlink()
      raise RemoteError(f'{url}/{rel} does not match its manifest after download (it changed '
                        'during the download, or the transfer was damaged): run again.')
  _prune_empty_dirs(local)
  local.mkdir(parents=True, exist_ok=True)
  return local


def _prune_empty_dirs(root: pathlib.Path) -> None:
  if not root.is_dir():
    return
  for directory in sorted((p for p in root.rglob('*') if p.is_dir()), reverse=True):
    if not any(directory.iterdir()):
      directory.rmdir()


def push(local: pathlib.Path, url: str) -> dict[str, int]:
  """Makes ``url`` identical to the local directory ``local``; the manifest goes last.

  Args:
    local: the local copy (a directory).
    url: where it goes.
  Returns:
    ``{'uploaded', 'deleted', 'unchanged'}`` file counts.
  """
  fs, path = _fs(url)
  files = _local_files(local) if local.is_dir() else {}
  hashes = {rel: _hash(file) for rel, file in files.items()}
  old = _read_json(fs, f'{path}/{MANIFEST}') or {}
  old_listed = old.get('files', {}) if old.get('complete') else {}
  remote = _remote_files(fs, path)
  changed = [rel for rel in files
             if rel not in remote or old_listed.get(rel, {}).get('xxh3') != hashes[rel]]
  removed = [rel for rel in remote if rel not in files]
  if not changed and not removed and old.get('complete'):
    return {'uploaded': 0, 'deleted': 0, 'unchanged': len(files)}
  fs.pipe_file(f'{path}/{MANIFEST}', json.dumps({'complete': False}).encode())
  for rel in changed:
    fs.put_file(str(files[rel]), f'{path}/{rel}')
  for rel in removed:
    fs.rm_file(f'{path}/{rel}')
  manifest = {'complete': True, 'written_by': outputs.writer_identity(),
              'files': {rel: {'size': files[rel].stat().st_size, 'xxh3': hashes[rel]}
                        for rel in files}}
  fs.pipe_file(f'{path}/{MANIFEST}', json.dumps(manifest, indent=1).encode())
  return {'uploaded': len(changed), 'deleted': len(removed),
          'unchanged': len(files) - len(changed)}


def local_input(path: str | os.PathLike) -> str | os.PathLike:
  """``path`` itself, or for a URL its pulled local copy (:func:`pull`).

  Args:
    path: a local path or a URL of a directory or file.
  """
  return str(pull(str(path))) if is_url(path) else path


def _single_process(url: str) -> None:
  if jax.process_count() > 1:
    raise RemoteError(f'{url}: URL outputs are written through one local copy, which a '
                      f'{jax.process_count()}-process run does not have; on a multi-host pod '
                      'use a directory that every host mounts (Filestore, gcsfuse).')


class WorkingCopy:
  """An output at a URL, worked on locally (see the module's docstring).

  Use as a context manager: the URL is locked and pulled on entry, pushed (and unlocked)
  on exit. :meth:`push` uploads in between (after a checkpoint).

  Args:
    url: the output's URL.
    note: called with one line after each push (default: stderr).
  """

  def __init__(self, url: str, *, note: Callable[[str], None] | None = None):
    self.url = str(url).rstrip('/')
    self.path = local_path(self.url)
    self._note = note or (lambda line: print(line, file=sys.stderr))

  def _lock(self) -> None:
    fs, path = _fs(self.url)
    identity = json.dumps(outputs.writer_identity()).encode()
    for _ in range(2):
      try:
        _create(fs, f'{path}/{LOCK}', identity)
        return
      except FileExistsError:
        holder = _read_json(fs, f'{path}/{LOCK}')
        if not isinstance(holder, dict) or outputs.writer_alive(holder) is not False:
          holder = holder if isinstance(holder, dict) else {}
          raise RemoteError(
              f'{self.url} is being written by pid {holder.get("pid")} on '
              f'{holder.get("host")} (since {holder.get("since")}). If that process is '
              f'gone, delete {self.url}/{LOCK}.') from None
        self._note(f'{self.url}: taking over the lock of pid {holder.get("pid")}, which '
                   'is no longer running')
        with contextlib.suppress(FileNotFoundError):
          fs.rm_file(f'{path}/{LOCK}')
    raise RemoteError(f'{self.url}: another writer took the lock first; run again.')

  def _unlock(self) -> None:
    fs, path = _fs(self.url)
    with contextlib.suppress(FileNotFoundError):
      fs.rm_file(f'{path}/{LOCK}')

  def __enter__(self) -> 'WorkingCopy':
    _single_process(self.url)
    self._lock()
    try:
      pull(self.url, must_exist=False, strict=False)
    except BaseException:
      self._unlock()
      raise
    return self

  def push(self) -> dict[str, int]:
    """Uploads what changed; returns the counts of :func:`push`."""
    counts = push(self.path, self.url)
    if counts['uploaded'] or counts['deleted']:
      self._note(f'synced {self.url}: {counts["uploaded"]} files uploaded, '
                 f'{counts["deleted"]} deleted, {counts["unchanged"]} unchanged')
    return counts

  def __exit__(self, *exc) -> None:
    try:
      # Only an output the tool wrote (it carries the marker): a refused folder of
      # someone else's files is left exactly as it was, no manifest added.
      if self.path.exists() and outputs.read_marker(self.path) is not None:
        self.push()
    finally:
      self._unlock()


@contextlib.contextmanager
def working_copy(path: str | os.PathLike | None) -> Iterator[str | os.PathLike | None]:
  """``path`` itself, or for a URL the local path of its :class:`WorkingCopy` (pushed on
  exit).

  Args:
    path: a local output directory, a URL, or None.
  """
  if not is_url(path):
    yield path
    return
  with WorkingCopy(str(path)) as copy:
    yield str(copy.path)

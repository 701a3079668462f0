"""Downloading official checkpoint files, verified, with a progress bar.

Files land in a cache directory (``$QSCORE_JAX_CACHE/downloads``, default
``~/.cache/qscore_jax/downloads``). A download is written to ``<name>.part``
and renamed only when complete and, where the registry knows the sha256,
verified; a failed or mismatching download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import urllib.error
import urllib.request

from tqdm.auto import tqdm

CHUNK = 1 << 20


class DownloadError(OSError):
  """A file could not be downloaded or did not match its expected digest."""


def cache_dir() -> pathlib.Path:
  """Where downloads are kept: ``$QSCORE_JAX_CACHE/downloads``, else
  ``~/.cache/qscore_jax/downloads``."""
  root = os.environ.get('QSCORE_JAX_CACHE')
  return (pathlib.Path(root) if root else pathlib.Path.home() / '.cache' / 'qscore_jax'
          ) / 'downloads'


def file_digest(path: str | os.PathLike, algorithm: str = 'sha256') -> str:
  """Hex digest of a file, read in chunks.

  Args:
    path: the file.
    algorithm: a :func:`hashlib.new` name (default ``'sha256'``).
  """
  digest = hashlib.new(algorithm)
  with open(path, 'rb') as f:
    while chunk := f.read(CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
  """The sha256 hex digest of the file ``path``.

  Args:
    path: the file.
  """
  return file_digest(path, 'sha256')


def _verify(path: pathlib.Path, url: str, sha256: str | None, md5_prefix: str | None) -> None:
  for algorithm, expected in (('sha256', sha256), ('md5', md5_prefix)):
    if expected is None:
      continue
    actual = file_digest(path, algorithm)
    if not actual.startswith(expected):
      raise DownloadError(
          f'{url} downloaded, but its {algorithm} is {actual}, not the expected {expected}'
          f'{"..." if algorithm == "md5" else ""}. The file was deleted. The server may have '
          'changed the file or the transfer was corrupted: try again, and if it persists, '
          'check the URL in the registry.')


def download(url: str, destination: str | os.PathLike, *, sha256: str | None = None,
             md5_prefix: str | None = None, progress: bool = True,
             timeout: float = 60.0) -> pathlib.Path:
  """Downloads ``url`` to ``destination`` unless a verified copy is already there.

  Args:
    url: http(s) or file URL.
    destination: final path of the file.
    sha256: expected hex digest; a mismatch deletes the download and raises.
    md5_prefix: expected leading hex digits of the md5 (as READMEs publish).
    progress: show a tqdm progress bar (bytes, rate, ETA).
    timeout: socket timeout in seconds.
  Returns:
    ``destination`` as a path.
  """
  destination = pathlib.Path(destination)
  if destination.is_file():
    try:
      _verify(destination, url, sha256, md5_prefix)
      return destination
    except DownloadError:
      destination.unlink()  # a stale or damaged copy: fetch it again
  destination.parent.mkdir(parents=True, exist_ok=True)
  partial = destination.with_name(destination.name + '.part')
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, 'wb') as out:
      total = int(response.headers.get('Content-Length') or 0) or None
      with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                desc=destination.name, disable=not progress) as bar:
        while chunk := response.read(CHUNK):
          out.write(chunk)
          bar.update(len(chunk))
    if total is not None and partial.stat().st_size != total:
      raise DownloadError(f'the connection closed after {partial.stat().st_size} of {total} '
                          f'bytes of {url}; run the command again.')
    _verify(partial, url, sha256, md5_prefix)
    shutil.move(partial, destination)
  except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
    partial.unlink(missing_ok=True)
    raise DownloadError(f'could not download {url}: {getattr(error, "reason", error)}. '
                        'Check the network, or download the file yourself and pass it with '
                        '--file.') from None
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  return destination

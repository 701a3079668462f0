"""The computation dtype of a model: float32, or bfloat16 where the hardware has it.

Only the computation changes. Parameters, optimizer state and BatchNorm/LayerNorm
statistics stay float32 (Flax's ``param_dtype``; its normalisation layers compute
their statistics in at least float32), the pooled representations are returned in
float32 (the backbones pool in float32), and the statistics, losses and regularizer
that consume them run in float32.

The default, ``'auto'``, is bfloat16 on TPUs and GPUs, whose matrix units run it at
two or more times the float32 rate, and float32 on CPUs: there XLA emulates most
bfloat16 work through float32 and gains nothing (``benchmarks/README.md`` measures
what bfloat16 changes in the results).

On a CPU with bfloat16 matrix units (AMX-BF16 or AVX512-BF16 in ``/proc/cpuinfo``)
an explicit ``bfloat16`` takes another path, :func:`uses_cpu_dots`: the
convolutions that pay are written as bfloat16 dot products accumulating in float32
(``qscore_jax.models.cpu_conv``), the only bfloat16 work XLA:CPU hands to those
units, and the activations between them stay float32. ``QSCORE_JAX_CPU_BF16_DOTS=0``
(read when a model is traced, so set it before the first compilation) turns that path
off (bfloat16 activations as on other CPUs); ``QSCORE_JAX_CPU_FLAGS`` replaces the
flags read from ``/proc/cpuinfo`` (to simulate another CPU). What a run computed in is recorded, resolved
(never ``'auto'``): in every store's metadata (``compute_dtype``, one of the fields a
store is compared on) and in a fine-tuning run's ``run.json``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from qscore_jax.models import cpu_conv

DTYPES = ('float32', 'bfloat16')
CHOICES = ('auto',) + DTYPES
# /proc/cpuinfo flags of bfloat16 matrix units XLA:CPU's dot kernels (YNNPACK) use.
BF16_UNIT_FLAGS = ('amx_bf16', 'avx512_bf16')
FLAGS_ENV = 'QSCORE_JAX_CPU_FLAGS'
DOTS_ENV = 'QSCORE_JAX_CPU_BF16_DOTS'


@functools.lru_cache(maxsize=None)
def _proc_cpuinfo_flags() -> frozenset[str]:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:  # not Linux: no flags known, so no bfloat16 units assumed
    pass
  return frozenset()


def cpu_flags() -> frozenset[str]:
  """The host CPU's feature flags: ``$QSCORE_JAX_CPU_FLAGS`` (space-separated) if set,
  else ``/proc/cpuinfo``'s (empty where there is none)."""
  override = os.environ.get(FLAGS_ENV)
  return frozenset(override.split()) if override is not None else _proc_cpuinfo_flags()


def cpu_bf16_units() -> tuple[str, ...]:
  """The bfloat16 matrix units of the host CPU (flags of :data:`BF16_UNIT_FLAGS`)."""
  flags = cpu_flags()
  return tuple(flag for flag in BF16_UNIT_FLAGS if flag in flags)


def uses_cpu_dots(dtype: Any, backend: str | None = None) -> bool:
  """Whether a model computing in ``dtype`` takes the CPU matrix-unit path: bfloat16,
  on the CPU backend, on a CPU with bfloat16 units, not turned off by
  ``$QSCORE_JAX_CPU_BF16_DOTS=0``.

  Args:
    dtype: the model's computation dtype.
    backend: the JAX backend (default ``jax.default_backend()``).
  """
  if name_of(dtype) != 'bfloat16' or (backend or jax.default_backend()) != 'cpu':
    return False
  if os.environ.get(DOTS_ENV, '1').lower() in ('0', 'false', 'no'):
    return False
  return bool(cpu_bf16_units())


STANDARD_PATH = 'standard'
CPU_DOTS_PATH = 'cpu_bf16_dots'


def compute_path(dtype: Any) -> str:
  """How a model computing in ``dtype`` computes here: :data:`CPU_DOTS_PATH` on the CPU
  matrix-unit path (:func:`uses_cpu_dots`), else :data:`STANDARD_PATH`. Recorded beside
  the dtype: the two bfloat16 paths round differently, so their rows are never mixed.

  Args:
    dtype: the model's computation dtype.
  """
  return CPU_DOTS_PATH if uses_cpu_dots(dtype) else STANDARD_PATH


def activation_dtype(dtype: Any) -> Any:
  """The dtype of a model's activations: ``dtype``, or float32 on the CPU
  matrix-unit path (:func:`uses_cpu_dots`).

  Args:
    dtype: the model's computation dtype.
  """
  return jnp.float32 if uses_cpu_dots(dtype) else dtype


def _layer_options(dtype: Any, **cpu_functions: Any) -> dict[str, Any]:
  """A Flax layer's dtype, and on the CPU matrix-unit path float32 with ``cpu_functions``
  (its products written as :mod:`qscore_jax.models.cpu_conv`'s bfloat16 dots)."""
  if uses_cpu_dots(dtype):
    return {'dtype': jnp.float32, **cpu_functions}
  return {'dtype': dtype}


def conv_options(dtype: Any) -> dict[str, Any]:
  """Keyword arguments of ``flax.linen.Conv`` for a model computing in ``dtype``.

  Args:
    dtype: the model's computation dtype.
  """
  return _layer_options(dtype, conv_general_dilated=cpu_conv.conv_general_dilated)


def dense_options(dtype: Any) -> dict[str, Any]:
  """Keyword arguments of ``flax.linen.Dense`` for a model computing in ``dtype``.

  Args:
    dtype: the model's computation dtype.
  """
  return _layer_options(dtype, dot_general=cpu_conv.dot_general)


def attention_options(dtype: Any) -> dict[str, Any]:
  """Keyword arguments of ``flax.linen.MultiHeadDotProductAttention``: on the CPU
  matrix-unit path its projections are bfloat16 dots (the attention itself, a small
  share of a ViT's work, stays float32).

  Args:
    dtype: the model's computation dtype.
  """
  return _layer_options(dtype, qkv_dot_general=cpu_conv.dot_general,
                        out_dot_general=cpu_conv.dot_general)


def resolve(name: str | None = 'auto', backend: str | None = None) -> str:
  """The dtype a run computes in, by name.

  Args:
    name: ``'float32'``, ``'bfloat16'`` or ``'auto'``/None (bfloat16 on TPU and GPU,
      float32 on CPU).
    backend: the JAX backend ``'auto'`` is resolved for (default
      ``jax.default_backend()``).
  Returns:
    ``'float32'`` or ``'bfloat16'``.
  Raises:
    ValueError: an unknown name.
  """
  if name is None or name == 'auto':
    return 'bfloat16' if (backend or jax.default_backend()) in ('tpu', 'gpu') else 'float32'
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(CHOICES)}, got {name!r}.')
  return name


def as_jnp(name: str) -> Any:
  """``jnp.float32`` or ``jnp.bfloat16`` for a resolved name.

  Args:
    name: one of :data:`DTYPES`.
  """
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[resolve(name)]


def name_of(dtype: Any) -> str:
  """The name of a module's computation dtype (``jnp.float32`` -> ``'float32'``).

  Args:
    dtype: a dtype, a dtype name, or None (Flax's default: float32).
  """
  return 'float32' if dtype is None else jnp.dtype(dtype).name


__all__ = ['BF16_UNIT_FLAGS', 'CHOICES', 'CPU_DOTS_PATH', 'DTYPES', 'STANDARD_PATH',
           'activation_dtype', 'as_jnp', 'attention_options', 'compute_path', 'conv_options',
           'dense_options',
           'cpu_bf16_units', 'cpu_flags', 'name_of', 'resolve', 'uses_cpu_dots']

"""The computation dtype of a model: float32, or bfloat16 where the hardware has it.

Only the computation changes. Parameters, optimizer state and BatchNorm/LayerNorm
statistics stay float32 (Flax's ``param_dtype``; its normalisation layers compute
their statistics in at least float32), the pooled representations are returned in
float32 (the backbones pool in float32), and the statistics, losses and regularizer
that consume them run in float32.

The default, ``'auto'``, is bfloat16 on TPUs and GPUs, whose matrix units run it at
two or more times the float32 rate, and float32 on CPUs: there XLA emulates most
bfloat16 work through float32 and gains nothing (``benchmarks/README.md`` measures
what bfloat16 changes in the results). What a run computed in is recorded, resolved
(never ``'auto'``): in every store's metadata (``compute_dtype``, one of the fields a
store is compared on) and in a fine-tuning run's ``run.json``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = ('float32', 'bfloat16')
CHOICES = ('auto',) + DTYPES


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


__all__ = ['CHOICES', 'DTYPES', 'as_jnp', 'name_of', 'resolve']

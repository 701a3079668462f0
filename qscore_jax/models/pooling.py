"""Max pooling whose gradient is fast on XLA:CPU.

``flax.linen.max_pool`` is ``lax.reduce_window``, whose gradient XLA lowers to
``select_and_scatter``. On XLA:CPU that op runs about 6x slower than PyTorch's
max-pool backward: the ResNet stem pool alone (batch 32, 112x112x64) took
0.59 s of a 4.7 s train step (``benchmarks/README.md``). :func:`max_pool`
computes the same values with ``reduce_window`` and has a custom gradient made of
plain elementwise ops that XLA fuses on every backend: the forward pass of the
gradient records, per output, which of the k*k window positions held the
maximum (an int8), and the backward pass routes each output gradient back to
that position (a strided "scatter" written as interior-padded ``lax.pad``).

Semantics are those of ``select_and_scatter`` and of PyTorch: the *first*
maximum in row-major window order receives the gradient (ties are common after
a ReLU), and NaN propagates in the forward pass.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pair = tuple[int, int]


def _explicit_padding(spatial: Sequence[int], window: Pair, strides: Pair,
                      padding: str | Sequence[Pair]) -> tuple[Pair, Pair]:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(tuple(spatial), window, strides, padding)
  if len(padding) != 2:
    raise ValueError(f'max_pool needs padding for the 2 spatial dims (H, W), got {padding!r}.')
  return tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[return-value]


def _window_slices(padded: jax.Array, window: Pair, strides: Pair, out_hw: Pair):
  """Yields, for each window offset (i, j) in row-major order, the strided view
  padded[:, i::sh, j::sw, :] cut to the output size (N, out_h, out_w, C)."""
  n, _, _, c = padded.shape
  for i in range(window[0]):
    for j in range(window[1]):
      limit = (n, i + (out_hw[0] - 1) * strides[0] + 1, j + (out_hw[1] - 1) * strides[1] + 1, c)
      yield lax.slice(padded, (0, i, j, 0), limit, (1, strides[0], strides[1], 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window: Pair, strides: Pair, padding: tuple[Pair, Pair]):
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                           (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def _max_pool_fwd(x, window, strides, padding):
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  out_hw = tuple((padded.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(2))
  best = argmax = None
  for k, view in enumerate(_window_slices(padded, window, strides, out_hw)):
    if best is None:
      best, argmax = view, jnp.zeros(view.shape, jnp.int8)
      continue
    # Strict '>' keeps the first maximum; NaN wins so that it propagates.
    take = (view > best) | jnp.isnan(view)
    best = jnp.where(take, view, best)
    argmax = jnp.where(take, jnp.int8(k), argmax)
  return best, (argmax, x.shape)


def _max_pool_bwd(window, strides, padding, residuals, grad):
  argmax, shape = residuals
  padded_hw = (shape[1] + sum(padding[0]), shape[2] + sum(padding[1]))
  out_hw = grad.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  total = None
  for k in range(window[0] * window[1]):
    offset = divmod(k, window[1])
    # The transpose of the strided slice of window offset k: interior padding
    # puts the outputs' gradients back on the stride grid, shifted by the offset.
    spatial = tuple((offset[a], padded_hw[a] - offset[a] - (out_hw[a] - 1) * strides[a] - 1,
                     strides[a] - 1) for a in range(2))
    part = lax.pad(jnp.where(argmax == k, grad, zero), zero, ((0, 0, 0), *spatial, (0, 0, 0)))
    total = part if total is None else total + part
  start = (0, padding[0][0], padding[1][0], 0)
  return (lax.slice(total, start, tuple(s + d for s, d in zip(start, shape))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Pair, strides: Pair,
             padding: str | Sequence[Pair] = 'VALID') -> jax.Array:
  """2-D max pooling of x (N, H, W, C) -> (N, H', W', C), as ``flax.linen.max_pool``.

  Args:
    x: floating-point feature maps, NHWC.
    window: (kh, kw) window size (at most 127 positions, the int8 argmax).
    strides: (sh, sw).
    padding: ``'SAME'``, ``'VALID'`` or ((top, bottom), (left, right)); padded
      positions hold -inf, so they never win.
  """
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'max_pool takes floating-point NHWC feature maps, got shape {x.shape} '
                     f'of dtype {x.dtype}.')
  window, strides = tuple(map(int, window)), tuple(map(int, strides))
  if window[0] * window[1] > 127:
    raise ValueError(f'max_pool supports windows of at most 127 positions, got {window}.')
  return _max_pool(x, window, strides, _explicit_padding(x.shape[1:3], window, strides, padding))

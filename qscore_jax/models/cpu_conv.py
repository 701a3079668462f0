"""bfloat16 convolutions and dense layers that reach a CPU's matrix units (AMX, AVX512-BF16).

XLA:CPU (jaxlib 0.10) has no bfloat16 convolution: it converts a bfloat16
convolution's operands to float32 and runs XLA's float32 (Eigen) kernel, so a
bfloat16 ResNet on a CPU is a float32 one plus conversions. Its *dot products*
are different: a bfloat16 x bfloat16 dot that accumulates in float32
(``preferred_element_type=float32``) goes to YNNPACK, whose kernels use AMX or
AVX512-BF16 (on an Intel Xeon with AMX, 0.7-1.9 TFLOP/s against ~0.3 for the
float32 convolution; ``benchmarks/README.md``).

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated``
(Flax's ``nn.Conv(conv_general_dilated=...)``) that writes the convolutions
where this pays as such dots, in bfloat16 with float32 accumulation and a
float32 result, and leaves the rest to XLA's float32 convolution:

* a 1x1 convolution (any stride) is a strided slice and one dot;
* a patch embedding (kernel = stride, "valid": a ViT's) is a reshape and one dot;
* a 3x3 stride-1 convolution with "same" padding on a feature map of at most
  :data:`MAX_DOT_3X3_SIZE` pixels a side is three dots over a width-wise
  im2col (K = 3 x channels): XLA's copies that build the columns are slow, so
  on larger maps the float32 convolution is faster (measured), and stays.

:func:`dot_general` does the same for dense layers (Flax's
``nn.Dense(dot_general=...)``, a ViT's projections and MLPs). Activations stay float32
between the convolutions (BatchNorm, ReLU, residual adds: XLA:CPU converts bfloat16
element-wise work to float32 anyway), so only
the operands of the dots are rounded to bfloat16. Gradients are those of the
dots (JAX differentiates them); the values equal the float32 convolution up to
that rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# The largest feature map (pixels a side) whose 3x3 convolutions are written as dots:
# ResNet-50's stage 3 (14) and 4 (7); at 28 and 56 the float32 convolution was faster.
MAX_DOT_3X3_SIZE = 14
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., K) x (K, O) -> (..., O) float32, operands rounded to bfloat16."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _is_zero_padding(padding: Any, kernel: tuple[int, int]) -> bool:
  """Whether ``padding`` adds nothing for ``kernel`` ("same" adds nothing to a 1x1)."""
  if isinstance(padding, str):
    return padding.upper() == 'VALID' or (padding.upper() == 'SAME' and kernel == (1, 1))
  return all(tuple(p) == (0, 0) for p in padding)


def _is_same_3x3(padding: Any) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return [tuple(p) for p in padding] == [(1, 1), (1, 1)]


def conv_1x1(x: jax.Array, w: jax.Array, stride: Sequence[int]) -> jax.Array:
  """A 1x1 convolution as one dot.

  Args:
    x: (N, H, W, C) input.
    w: (1, 1, C, O) kernel.
    stride: (sh, sw).
  Returns:
    (N, ceil(H / sh), ceil(W / sw), O) float32.
  """
  return _bf16_dot(x[:, ::stride[0], ::stride[1], :], w[0, 0])


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
  """``lax.dot_general`` of the bfloat16-rounded operands, accumulated in float32.

  Args:
    lhs, rhs, dimension_numbers: as ``lax.dot_general``.
    precision, preferred_element_type: accepted for Flax's call; the result is float32.
  Returns:
    The product, float32.
  """
  del precision, preferred_element_type
  return lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                         preferred_element_type=jnp.float32)


def conv_patches(x: jax.Array, w: jax.Array) -> jax.Array:
  """A "valid" convolution whose stride is its kernel (a patch embedding) as one dot.

  Args:
    x: (N, H, W, C) input (rows and columns past a multiple of the kernel are dropped,
      as the convolution drops them).
    w: (k, k, C, O) kernel.
  Returns:
    (N, H // k, W // k, O) float32.
  """
  n, h, width, c = x.shape
  k = w.shape[0]
  rows, cols = h // k, width // k
  patches = x[:, :rows * k, :cols * k].reshape(n, rows, k, cols, k, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows, cols, k * k * c)
  return _bf16_dot(patches, w.reshape(k * k * c, w.shape[-1]))  # (i, j, c) order, as HWIO


def conv_3x3_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """A 3x3 stride-1 "same" convolution as three dots over a width-wise im2col.

  The padded input's three column shifts are concatenated along channels
  (K = 3C); the rows of that (N * (H + 2) * W, 3C) matrix, shifted by 0, W and
  2W, give the kernel's three rows, so each is one dot on a contiguous slice.

  Args:
    x: (N, H, W, C) input.
    w: (3, 3, C, O) kernel.
  Returns:
    (N, H, W, O) float32.
  """
  n, h, width, c = x.shape
  out = w.shape[-1]
  padded = jnp.pad(x.astype(jnp.bfloat16), ((0, 0), (1, 1), (1, 1), (0, 0)))
  columns = jnp.concatenate([padded[:, :, j:j + width] for j in range(3)], axis=-1)
  rows = n * (h + 2) * width
  # Two rows of zeros past the end keep the last shifted slices in range.
  columns = jnp.pad(columns.reshape(rows, 3 * c), ((0, 2 * width), (0, 0)))
  kernel_rows = w.reshape(3, 3 * c, out)  # (kh, kw * C, O), kw-major as the columns
  total = sum(_bf16_dot(lax.slice_in_dim(columns, i * width, i * width + rows), kernel_rows[i])
              for i in range(3))
  return total.reshape(n, h + 2, width, out)[:, :h]


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with bfloat16 dots where they are faster on a CPU.

  Args:
    lhs: (N, H, W, C) input (NHWC; other layouts take the fallback).
    rhs: (kh, kw, C, O) kernel (HWIO).
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
    feature_group_count, batch_group_count, precision, preferred_element_type:
      as ``lax.conv_general_dilated``.
  Returns:
    (N, H', W', O) float32 (the fallback: XLA's float32 convolution).
  """
  plain = ((not lhs_dilation or all(d == 1 for d in lhs_dilation))
           and (not rhs_dilation or all(d == 1 for d in rhs_dilation))
           and feature_group_count == 1 and batch_group_count == 1 and lhs.ndim == 4
           and (dimension_numbers is None or dimension_numbers == _NHWC
                or dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                                   _NHWC)))
  kernel = tuple(rhs.shape[:2])
  if plain and kernel == (1, 1) and _is_zero_padding(padding, kernel):
    return conv_1x1(lhs, rhs, window_strides)
  if (plain and kernel[0] == kernel[1] > 1 and tuple(window_strides) == kernel
      and _is_zero_padding(padding, kernel)):
    return conv_patches(lhs, rhs)
  if (plain and kernel == (3, 3) and tuple(window_strides) == (1, 1) and _is_same_3x3(padding)
      and max(lhs.shape[1:3]) <= MAX_DOT_3X3_SIZE):
    return conv_3x3_same(lhs, rhs)
  return lax.conv_general_dilated(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32), window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


__all__ = ['MAX_DOT_3X3_SIZE', 'conv_1x1', 'conv_3x3_same', 'conv_general_dilated',
           'conv_patches', 'dot_general']

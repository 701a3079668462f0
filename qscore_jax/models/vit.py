"""Vision Transformers as released by DINO and MoCo v3 (timm/DeiT layout).

Pre-norm blocks, q/k/v and output projections with bias (every release has
them), LayerNorm eps 1e-6, exact (erf) GELU, a
learned class token, and a position embedding with a slot for the class token
(``pos_embed`` of shape (1, 1 + g*g, D)). The representation is the class token
after the final LayerNorm, as DINO's and MoCo v3's linear evaluations use it.

The head count is configuration, not something the weights reveal: DINO's
ViT-S has 6 heads, MoCo v3's ViT-S has 12, with identical parameter shapes in
PyTorch. Here the attention kernels are stored per head, (D, H, D/H), so the
choice is visible in every converted parameter tree.

Images of another size than the pre-training one get a resampled position
embedding, either as timm does (``'timm'``: bicubic, antialiased, to the new
grid) or as DINO does (``'dino'``: bicubic without antialias, with DINO's
+0.1 scale-factor offset).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qscore_jax.models import precision
from qscore_jax.models.features import expose_feature
from qscore_jax.models.inputs import check_image_batch

PosEmbedInterpolation = Literal['timm', 'dino']
POS_EMBED_INTERPOLATIONS = ('timm', 'dino')

_dense_init = nn.initializers.truncated_normal(0.02)  # timm's Linear init


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel; a = -0.75 is PyTorch's non-antialiased bicubic."""
  x = np.abs(x)
  return np.where(
      x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """Interpolation matrix (out_size, in_size) of ``F.interpolate(mode='bicubic')``.

  Reproduces PyTorch's non-antialiased bicubic with ``align_corners=False``:
  source coordinate ``(dst + 0.5) / scale - 0.5``, Keys kernel with a = -0.75,
  out-of-range taps clamped to the border. ``scale`` is the scale factor
  PyTorch uses for coordinates (``out/in`` for a given size, the given
  ``scale_factor`` otherwise, as in DINO).

  Args:
    in_size: number of source samples.
    out_size: number of output samples.
    scale: the coordinate scale factor.
  Returns:
    float64 (out_size, in_size).
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
  base = np.floor(src)
  frac = src - base
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(-1, 3):
    weight = _cubic(frac - tap)
    index = np.clip(base + tap, 0, in_size - 1).astype(np.int64)
    np.add.at(matrix, (np.arange(out_size), index), weight)
  return matrix


def resample_pos_embed(grid: jax.Array, new_hw: tuple[int, int], *,
                       mode: PosEmbedInterpolation) -> jax.Array:
  """Resamples patch position embeddings (g, g, D) to (h, w, D).

  ``'timm'`` matches ``timm.layers.resample_abs_pos_embed`` (bicubic with
  antialias, which for both up- and down-sampling is the Keys a = -0.5 kernel,
  widened when shrinking: the same as ``jax.image.resize(..., 'cubic')``).
  ``'dino'`` matches DINO's ``interpolate_pos_encoding``:
  ``F.interpolate(scale_factor=((h + 0.1)/g, (w + 0.1)/g), mode='bicubic')``.

  Args:
    grid: (g_h, g_w, D) patch position embeddings (class slot excluded).
    new_hw: ``(h, w)``, the new patch grid.
    mode: ``'timm'`` or ``'dino'``.
  Returns:
    (h, w, D).
  """
  g_h, g_w, dim = grid.shape
  h, w = new_hw
  if mode == 'timm':
    return jax.image.resize(grid, (h, w, dim), method='cubic', antialias=True)
  if mode == 'dino':
    rows = torch_bicubic_matrix(g_h, h, (h + 0.1) / g_h)
    cols = torch_bicubic_matrix(g_w, w, (w + 0.1) / g_w)
    return jnp.einsum('hi,wj,ijd->hwd', rows.astype(np.float32),
                      cols.astype(np.float32), grid,
                      precision=jax.lax.Precision.HIGHEST)
  raise ValueError(f'pos_embed_interpolation must be one of '
                   f'{POS_EMBED_INTERPOLATIONS}, got {mode!r}.')


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2, as timm's ``Mlp``.

  Attributes:
    hidden_dim: width of fc1.
    out_dim: width of fc2 (the output).
    dtype: computation dtype.
  """
  hidden_dim: int
  out_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """(..., D_in) -> (..., out_dim).

    Args:
      x: (..., D_in) tokens.
    """
    dense = functools.partial(nn.Dense, kernel_init=_dense_init,
                              **precision.dense_options(self.dtype))
    x = dense(self.hidden_dim, name='fc1')(x)
    # PyTorch's nn.GELU is the exact erf form; Flax defaults to the tanh one.
    x = nn.gelu(x, approximate=False)
    return dense(self.out_dim, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: MLP hidden width relative to the token width.
    layer_norm_eps: LayerNorm epsilon.
    dtype: computation dtype.
  """
  num_heads: int
  mlp_ratio: float
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """(N, T, D) tokens -> (N, T, D).

    Args:
      x: (N, T, D) tokens (class token first).
    """
    dim = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps,
                             dtype=precision.activation_dtype(self.dtype))
    y = norm(name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, use_bias=True, kernel_init=_dense_init,
        deterministic=True, name='attn', **precision.attention_options(self.dtype))(y, y)
    x = x + y
    y = norm(name='norm2')(x)
    y = Mlp(int(dim * self.mlp_ratio), dim, self.dtype, name='mlp')(y)
    return x + y


class VisionTransformer(nn.Module):
  """ViT backbone returning the class token after the final norm, (N, D).

  Attributes:
    patch_size: 16 or 8 for the released models.
    embed_dim: 384 (ViT-S) or 768 (ViT-B).
    depth: number of blocks (12).
    num_heads: attention heads; 6 for DINO ViT-S, 12 for MoCo v3 ViT-S and ViT-B.
    mlp_ratio: hidden width of the MLP relative to ``embed_dim``.
    layer_norm_eps: 1e-6 in DINO, MoCo v3 and timm.
    image_size: pre-training resolution; ``pos_embed`` holds
      (image_size // patch_size)**2 patch positions plus the class slot.
    pos_embed_interpolation: ``'timm'`` or ``'dino'`` for other input sizes.
    dtype: computation dtype (parameters stay float32).
  """
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  image_size: int = 224
  pos_embed_interpolation: PosEmbedInterpolation = 'timm'
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by '
                       f'num_heads {self.num_heads}.')
    if self.pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
      raise ValueError(f'pos_embed_interpolation must be one of '
                       f'{POS_EMBED_INTERPOLATIONS}, got '
                       f'{self.pos_embed_interpolation!r}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of '
                       f'patch_size {self.patch_size}.')
    super().__post_init__()

  @property
  def num_features(self) -> int:
    """Dimension d of the representation (``embed_dim``)."""
    return self.embed_dim

  @property
  def feature_names(self) -> tuple[str, ...]:
    """Sown token arrays (N, 1 + h*w, D), input side first."""
    return ('embedding',) + tuple(f'block{i}' for i in range(self.depth))

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Maps images (N, H, W, 3), preprocessed, to class tokens (N, embed_dim).

    ``train`` is accepted for interface parity with :class:`ResNet`; the
    released ViTs use no dropout, so it changes nothing.

    Args:
      images: (N, H, W, 3) float network input, H and W >= ``patch_size``
        (remainder pixels beyond a multiple of the patch are dropped).
      train: ignored.
    Returns:
      (N, embed_dim) float32.
    """
    del train
    check_image_batch(images, model_name=type(self).__name__,
                      min_size=self.patch_size)
    x = images.astype(precision.activation_dtype(self.dtype))
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size),
                (self.patch_size, self.patch_size), padding='VALID',
                name='patch_embed', **precision.conv_options(self.dtype))(x)
    n, h, w, dim = x.shape
    x = x.reshape(n, h * w, dim)

    grid = self.image_size // self.patch_size
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, dim))
    pos_embed = self.param('pos_embed', _dense_init, (1, 1 + grid * grid, dim))
    patch_pos = pos_embed[0, 1:]
    if (h, w) != (grid, grid):
      patch_pos = resample_pos_embed(
          patch_pos.reshape(grid, grid, dim), (h, w),
          mode=self.pos_embed_interpolation).reshape(h * w, dim)
    pos = jnp.concatenate([pos_embed[0, :1], patch_pos], axis=0)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls_token, (n, 1, dim)).astype(x.dtype), x], axis=1)
    x = x + pos.astype(x.dtype)
    x = expose_feature(self, 'embedding', x)

    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.layer_norm_eps,
                self.dtype, name=f'blocks_{i}')(x)
      x = expose_feature(self, f'block{i}', x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps,
                     dtype=precision.activation_dtype(self.dtype), name='norm')(x)
    return x[:, 0].astype(jnp.float32)

"""ResNet v1.5 backbones that reproduce the SSL releases' PyTorch/TF/Haiku nets.

One module covers every ResNet the eight methods published:

* ResNet-18/34 (BasicBlock) and ResNet-50/101/152/200 (Bottleneck), the
  stride in the 3x3 convolution ("v1.5", as torchvision, TF SimCLR and Haiku).
* ``width_multiplier`` scales *all* channels (stem, inner and output), the
  "x2/w2" models of SimCLR, SwAV, VICReg and BYOL; ``width_per_group=128`` is
  torchvision's ``wide_resnet50_2``, which widens only the inner 3x3.
* ``conv_padding`` / ``pool_padding``: ``'torch'`` pads symmetrically
  (k // 2 on each side, as torchvision); ``'tf_same'`` is TensorFlow's SAME,
  which on even inputs to a stride-2 layer pads one pixel less at the top/left
  (BYOL's Haiku nets everywhere; SimCLR's TF code in the stem max-pool only).
* ``stem='cifar'``: solo-learn's 3x3/stride-1/padding-2 stem without max-pool.
* ``sk_ratio > 0``: SimCLR v2's selective-kernel nets (the ``_sk1`` releases,
  ``sk_ratio=0.0625``), exactly as google-research/simclr ``resnet.py`` builds
  them when ``FLAGS.sk_ratio > 0``: the ResNet-D stem (three 3x3 convolutions,
  ``32w`` stride 2, ``32w``, ``64w``, each with BatchNorm and ReLU, then the
  max-pool), the ResNet-D projection shortcut (2x2 average pool, then a 1x1
  convolution and BatchNorm) and a selective-kernel 3x3 convolution in every
  bottleneck (see :func:`_selective_kernel_conv`).

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer3_2/conv2``,
``layer2_0/downsample_conv``), so a converted ``state_dict`` reads naturally.
The selective-kernel nets add ``stem_conv1..3``/``stem_bn1..3`` (the ResNet-D
stem, in place of ``conv1``/``bn1``) and, per block, ``sk_conv1``, ``sk_bn1``,
``sk_conv2`` (the mixing-weight branch; ``conv2``/``bn2`` is the two-stream
3x3 convolution with ``2 * inner`` channels).
The model returns the globally average-pooled representation, shape
(N, num_features); the feature maps of the stem and of every stage are sown into
the ``'intermediates'`` collection and exposed to gradients through
``'perturbations'`` (see :func:`qscore_jax.models.apply_with_features`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qscore_jax.models import precision
from qscore_jax.models.features import expose_feature
from qscore_jax.models.inputs import check_image_batch
from qscore_jax.models.pooling import max_pool

PaddingMode = Literal['torch', 'tf_same']
PADDING_MODES = ('torch', 'tf_same')

# torchvision initialises convolutions with kaiming_normal(mode='fan_out').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Stage depths of the published ResNets.
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


def _padding(kernel_size: int, mode: str):
  """Flax padding argument for a square kernel under ``mode``."""
  if mode == 'tf_same':
    return 'SAME'
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


def _runtime_one(images, dtype):
  """1.0 that XLA cannot constant-fold: 1 + 0 * max(images).

  Only used in training mode, where BatchNorm's batch statistics already make
  every output non-finite if any pixel is, so it changes no result. (A
  reduction, not ``images[0, 0, 0, 0]``: slicing a batch sharded over an
  explicit mesh axis is an error.)
  """
  return (1 + 0 * jax.lax.stop_gradient(jnp.max(images))).astype(dtype)


def _materialized(x, one):
  """x itself (x / 1.0 is exact), computed once into memory on XLA:CPU.

  Why: in the backward pass XLA:CPU computes each filter gradient as a
  convolution over a transposed copy of the layer's input (channels and batch
  swapped). XLA fuses the cheap elementwise ops that produced that input
  (BatchNorm, residual add, ReLU of this and the previous block) into the
  transposing copy, which then re-reads five feature maps in transposed order,
  an expensive access pattern: 0.85 s of a 3.4 s ResNet-18 step. A division
  counts as expensive for XLA's fusion, so it is not duplicated: the feature map
  is written once and the transposing copy reads just that. ``one=None`` (not
  training, or not on CPU) leaves x untouched.
  """
  return x if one is None else x / one


def _conv_bn(x, train: bool, *, features: int, kernel_size: int, stride: int,
             padding: Any, norm: Any, conv_name: str, bn_name: str, dtype: Any,
             bn_scale_init: Any = nn.initializers.ones):
  """Bias-free convolution then BatchNorm, created in the calling module's scope
  (so parameters are named ``<block>/conv2``, ``<block>/bn2`` as in torchvision)."""
  x = nn.Conv(features, (kernel_size, kernel_size), (stride, stride),
              padding=padding, use_bias=False, kernel_init=_conv_init,
              name=conv_name, **precision.conv_options(dtype))(x)
  return norm(scale_init=bn_scale_init, name=bn_name)(x, use_running_average=not train)


def _resnet_d_pool(x, stride: int):
  """The average pool of SimCLR's ResNet-D projection shortcut (before its 1x1 conv).

  As google-research/simclr ``bottleneck_block`` (``FLAGS.sk_ratio > 0``):
  stride 2 pads the input explicitly by ``fixed_padding(k=2)`` (0 rows/columns
  before, 1 after) and pools 2x2/2 with VALID padding, so on odd sizes the
  padded zeros *count* in the last average; stride 1 pools 2x2/1 with TF
  'SAME' (1 row/column after), whose average *excludes* the padding.

  Args:
    x: (N, H, W, C).
    stride: 1 or 2.
  Returns:
    (N, ceil(H / stride), ceil(W / stride), C).
  """
  pad = ((0, 1), (0, 1))
  if stride == 1:
    return nn.avg_pool(x, (2, 2), (1, 1), padding=pad, count_include_pad=False)
  return nn.avg_pool(x, (2, 2), (stride, stride), padding=pad, count_include_pad=True)


def _selective_kernel_conv(x, train: bool, *, features: int, stride: int, sk_ratio: float,
                           padding: Any, norm: Any, dtype: Any, one=None, min_dim: int = 32):
  """SimCLR v2's selective-kernel 3x3 convolution (``sk_conv2d`` of its ``resnet.py``).

  A 3x3 convolution to ``2 * features`` channels (carrying the stride) with
  BatchNorm and ReLU, split into two streams; the spatial mean of their sum
  goes through a bias-free 1x1 conv to ``max(int(features * sk_ratio),
  min_dim)`` channels, BatchNorm and ReLU, and a bias-free 1x1 conv to
  ``2 * features``; a softmax over the two streams then weighs them per
  channel. Created in the calling block's scope: ``conv2``/``bn2`` (two
  streams), ``sk_conv1``/``sk_bn1``, ``sk_conv2``.

  Args:
    x: (N, H, W, C) feature map.
    train: training mode (batch statistics).
    features: ``filters`` of the official code (the bottleneck's inner width).
    stride: stride of the 3x3 convolution.
    sk_ratio: reduction ratio of the mixing branch (SimCLR: 0.0625).
    padding: Flax padding of the 3x3 convolution.
    norm: BatchNorm constructor.
    dtype: computation dtype.
    one: see :func:`_materialized`.
    min_dim: the smallest mixing width (32 in SimCLR).
  Returns:
    (N, H / stride, W / stride, features).
  """
  streams = _conv_bn(x, train, features=2 * features, kernel_size=3, stride=stride,
                     padding=padding, norm=norm, conv_name='conv2', bn_name='bn2', dtype=dtype)
  streams = _materialized(nn.relu(streams), one)
  first, second = jnp.split(streams, 2, axis=-1)
  mid = max(int(features * sk_ratio), min_dim)
  context = jnp.mean(first + second, axis=(1, 2), keepdims=True)  # (N, 1, 1, features)
  context = nn.relu(_conv_bn(context, train, features=mid, kernel_size=1, stride=1,
                             padding='VALID', norm=norm, conv_name='sk_conv1',
                             bn_name='sk_bn1', dtype=dtype))
  logits = nn.Conv(2 * features, (1, 1), use_bias=False, kernel_init=_conv_init,
                   name='sk_conv2', **precision.conv_options(dtype))(context)
  weights = jax.nn.softmax(jnp.stack(jnp.split(logits, 2, axis=-1)), axis=0)  # (2, N, 1, 1, f)
  return weights[0] * first + weights[1] * second


class _Block(nn.Module):
  """Fields shared by the residual blocks; ``planes`` is torchvision's name."""
  planes: int
  stride: int
  conv_padding: str
  norm: Any
  dtype: Any
  width_per_group: int = 64
  zero_init_residual: bool = False
  sk_ratio: float = 0.0

  def _last_bn_init(self):
    return nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34).

  Attributes:
    planes: torchvision's ``planes``: the block's base width (its output has
      ``planes * expansion`` channels).
    stride: stride of the block (of its 3x3 convolution, and of the 1x1
      downsample shortcut).
    conv_padding: ``'torch'`` or ``'tf_same'``.
    norm: BatchNorm constructor (a ``functools.partial`` of ``nn.BatchNorm``).
    dtype: computation dtype.
    width_per_group: inner width per 64 planes (bottleneck only; default 64).
    zero_init_residual: initialise the last BN scale to zero (default False).
    sk_ratio: must stay 0: SimCLR's selective-kernel nets are bottleneck nets
      (:class:`ResNet` refuses ``sk_ratio > 0`` with basic blocks).
  """
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, one=None):
    """Applies the block.

    Args:
      x: (N, H, W, C) feature map.
      train: training mode (batch statistics).
      one: None, or a runtime 1.0 that makes XLA:CPU write intermediate maps
        once (training on CPU only; changes no value).
    Returns:
      (N, H / stride, W / stride, planes * expansion).
    """
    last_bn_init = self._last_bn_init()
    conv_bn = functools.partial(_conv_bn, train=train, norm=self.norm, dtype=self.dtype)
    out = conv_bn(x, features=self.planes, kernel_size=3, stride=self.stride,
                  padding=_padding(3, self.conv_padding), conv_name='conv1', bn_name='bn1')
    out = _materialized(nn.relu(out), one)
    out = conv_bn(out, features=self.planes, kernel_size=3, stride=1,
                  padding=_padding(3, self.conv_padding), conv_name='conv2',
                  bn_name='bn2', bn_scale_init=last_bn_init)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = conv_bn(x, features=self.planes, kernel_size=1, stride=self.stride,
                  padding=_padding(1, self.conv_padding), conv_name='downsample_conv',
                  bn_name='downsample_bn')
    return _materialized(nn.relu(out + x), one)


class Bottleneck(_Block):
  """1x1 -> 3x3 (carries the stride, v1.5) -> 1x1 with 4x expansion.

  Attributes:
    planes: torchvision's ``planes``: the block's base width (its output has
      ``planes * expansion`` channels).
    stride: stride of the block (of its 3x3 convolution, and of the 1x1
      downsample shortcut).
    conv_padding: ``'torch'`` or ``'tf_same'``.
    norm: BatchNorm constructor (a ``functools.partial`` of ``nn.BatchNorm``).
    dtype: computation dtype.
    width_per_group: inner width per 64 planes (bottleneck only; default 64).
    zero_init_residual: initialise the last BN scale to zero (default False).
    sk_ratio: 0 (default), or SimCLR v2's selective-kernel ratio: the 3x3
      becomes :func:`_selective_kernel_conv` and the projection shortcut the
      ResNet-D one (:func:`_resnet_d_pool`, then a stride-1 1x1 conv + BN).
  """
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, one=None):
    """Applies the block.

    Args:
      x: (N, H, W, C) feature map.
      train: training mode (batch statistics).
      one: None, or a runtime 1.0 that makes XLA:CPU write intermediate maps
        once (training on CPU only; changes no value).
    Returns:
      (N, H / stride, W / stride, planes * expansion).
    """
    inner = self.planes * self.width_per_group // 64
    out_features = self.planes * self.expansion
    last_bn_init = self._last_bn_init()
    conv_bn = functools.partial(_conv_bn, train=train, norm=self.norm, dtype=self.dtype)
    out = conv_bn(x, features=inner, kernel_size=1, stride=1,
                  padding=_padding(1, self.conv_padding), conv_name='conv1', bn_name='bn1')
    out = _materialized(nn.relu(out), one)
    if self.sk_ratio > 0:
      out = _selective_kernel_conv(out, train, features=inner, stride=self.stride,
                                   sk_ratio=self.sk_ratio, padding=_padding(3, self.conv_padding),
                                   norm=self.norm, dtype=self.dtype, one=one)
    else:
      out = conv_bn(out, features=inner, kernel_size=3, stride=self.stride,
                    padding=_padding(3, self.conv_padding), conv_name='conv2', bn_name='bn2')
      out = nn.relu(out)
    out = _materialized(out, one)
    out = conv_bn(out, features=out_features, kernel_size=1, stride=1,
                  padding=_padding(1, self.conv_padding), conv_name='conv3',
                  bn_name='bn3', bn_scale_init=last_bn_init)
    if self.stride != 1 or x.shape[-1] != out_features:
      if self.sk_ratio > 0:  # ResNet-D: pool, then a stride-1 projection
        x = conv_bn(_resnet_d_pool(x, self.stride), features=out_features, kernel_size=1,
                    stride=1, padding='VALID', conv_name='downsample_conv',
                    bn_name='downsample_bn')
      else:
        x = conv_bn(x, features=out_features, kernel_size=1, stride=self.stride,
                    padding=_padding(1, self.conv_padding), conv_name='downsample_conv',
                    bn_name='downsample_bn')
    return _materialized(nn.relu(out + x), one)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet v1.5 backbone returning the pooled representation.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: ``'basic'`` or ``'bottleneck'``.
    width_multiplier: multiplies every channel count (SimCLR/SwAV/VICReg/BYOL
      "x2" models); the representation has ``num_features`` dimensions.
      Fractions (e.g. 0.25: 16 stem channels) make small encoders for CPU
      experiments; ``64 * width_multiplier`` must be a whole number.
    width_per_group: inner width of a bottleneck per 64 planes; 128 gives
      torchvision's ``wide_resnet50_2``.
    stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'``
      (solo-learn: 3x3/1 conv with padding 2, no max-pool).
    conv_padding: ``'torch'`` (symmetric) or ``'tf_same'`` for every conv.
    pool_padding: ``'torch'`` or ``'tf_same'`` for the stem max-pool.
    bn_momentum: weight of the *old* running statistic, Flax convention;
      0.9 equals PyTorch's ``momentum=0.1``, TF/Haiku ``decay=0.9``.
    bn_epsilon: BatchNorm epsilon (1e-5 in every release).
    bn_axis_name: mapped axis over which training BatchNorm statistics are
      averaged under ``pmap``/``shard_map`` (``None`` under ``jit``, where the
      batch mean is already global).
    zero_init_residual: initialise the last BN scale of each block to zero
      (only affects training from scratch).
    sk_ratio: 0 (default: the nets above), or > 0 for SimCLR v2's
      selective-kernel ResNets (``0.0625`` in every ``_sk1`` release): ResNet-D
      stem and projection shortcuts and selective-kernel 3x3 convolutions
      (bottleneck blocks and the ImageNet stem only).
    dtype: computation dtype (parameters stay float32).
  """
  stage_sizes: Sequence[int]
  block: str = 'bottleneck'
  width_multiplier: float = 1
  width_per_group: int = 64
  stem: str = 'imagenet'
  conv_padding: PaddingMode = 'torch'
  pool_padding: PaddingMode = 'torch'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None
  zero_init_residual: bool = False
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ValueError(f'block must be one of {sorted(BLOCKS)}, got {self.block!r}.')
    for field in ('conv_padding', 'pool_padding'):
      if getattr(self, field) not in PADDING_MODES:
        raise ValueError(f'{field} must be one of {PADDING_MODES}, '
                         f'got {getattr(self, field)!r}.')
    if self.stem not in ('imagenet', 'cifar'):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
    if self.width_multiplier <= 0 or (64 * self.width_multiplier) % 1:
      raise ValueError('64 * width_multiplier must be a positive whole number of channels, '
                       f'got width_multiplier={self.width_multiplier}.')
    if self.block == 'basic' and self.width_per_group != 64:
      raise ValueError('width_per_group other than 64 exists only for '
                       'bottleneck blocks (wide_resnet50_2).')
    if self.sk_ratio < 0:
      raise ValueError(f'sk_ratio must be >= 0, got {self.sk_ratio}.')
    if self.sk_ratio > 0 and (self.block != 'bottleneck' or self.stem != 'imagenet'):
      raise ValueError('sk_ratio > 0 (SimCLR v2 selective-kernel nets) needs bottleneck blocks '
                       f"and the ImageNet stem, got block={self.block!r}, stem={self.stem!r}.")
    if len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1:
      raise ValueError('stage_sizes must hold 4 positive block counts, got '
                       f'{tuple(self.stage_sizes)}.')
    super().__post_init__()

  @property
  def num_features(self) -> int:
    """Dimension d of the pooled representation."""
    return int(512 * self.width_multiplier) * BLOCKS[self.block].expansion

  @property
  def feature_names(self) -> tuple[str, ...]:
    """Names of the sown/perturbable feature maps, input side first."""
    return ('stem', 'layer1', 'layer2', 'layer3', 'layer4')

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Maps images (N, H, W, 3), preprocessed, to representations (N, d).

    Args:
      images: (N, H, W, 3) float network input (checked: rank, channels, dtype).
      train: training mode: batch statistics, ``batch_stats`` updated when
        mutable (default False).
    Returns:
      (N, num_features) float32, the globally average-pooled last stage.
    """
    check_image_batch(images, model_name=type(self).__name__)
    # On a CPU's matrix-unit path only the convolutions' dots are bfloat16.
    activations = precision.activation_dtype(self.dtype)
    norm = functools.partial(
        nn.BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        axis_name=self.bn_axis_name, dtype=activations)
    base = int(64 * self.width_multiplier)
    x = images.astype(activations)
    stem = functools.partial(_conv_bn, train=train, features=base, norm=norm,
                             conv_name='conv1', bn_name='bn1', dtype=self.dtype)
    if self.stem == 'cifar':
      x = nn.relu(stem(x, kernel_size=3, stride=1, padding=((2, 2), (2, 2))))
    elif self.sk_ratio > 0:  # ResNet-D stem: 3x3/2 to base // 2, 3x3 to base // 2, 3x3 to base
      for index, features in enumerate((base // 2, base // 2, base)):
        x = nn.relu(stem(x, features=features, kernel_size=3, stride=2 if index == 0 else 1,
                         padding=_padding(3, self.conv_padding),
                         conv_name=f'stem_conv{index + 1}', bn_name=f'stem_bn{index + 1}'))
      x = max_pool(x, (3, 3), (2, 2), padding=_padding(3, self.pool_padding))
    else:
      x = nn.relu(stem(x, kernel_size=7, stride=2, padding=_padding(7, self.conv_padding)))
      x = max_pool(x, (3, 3), (2, 2), padding=_padding(3, self.pool_padding))
    x = expose_feature(self, 'stem', x)

    one = _runtime_one(images, activations) if train and jax.default_backend() == 'cpu' else None
    block_cls = BLOCKS[self.block]
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        x = block_cls(
            planes=base * 2**stage,
            stride=2 if stage > 0 and index == 0 else 1,
            conv_padding=self.conv_padding,
            norm=norm,
            dtype=self.dtype,
            width_per_group=self.width_per_group,
            zero_init_residual=self.zero_init_residual,
            sk_ratio=self.sk_ratio,
            name=f'layer{stage + 1}_{index}')(x, train, one)
      x = expose_feature(self, f'layer{stage + 1}', x)
    # Pool in float32 so a bfloat16 forward still yields float32 features.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

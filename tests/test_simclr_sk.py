"""SimCLR v2 selective-kernel ResNets (the ``_sk1`` releases) against a PyTorch reference.

The reference below is written here, independently of ``qscore_jax``, from
google-research/simclr ``resnet.py`` (TF1, ``FLAGS.sk_ratio > 0``):

* ``conv2d_fixed_padding``: stride 1 pads TF 'SAME', stride 2 pads
  ``fixed_padding(k)`` by hand then convolves VALID;
* ResNet-D stem: 3x3/2 to ``64w // 2``, 3x3 to ``64w // 2``, 3x3 to ``64w``,
  each BN + ReLU, then a 3x3/2 TF-'SAME' max-pool;
* ResNet-D projection shortcut: stride 2: ``fixed_padding(2)`` (zeros that
  count in the average) and a VALID 2x2/2 average pool; stride 1: a TF-'SAME'
  2x2/1 average pool, which leaves the padding out of the average; then a 1x1
  conv and BN;
* ``sk_conv2d``: 3x3 conv (with the stride) to ``2 * filters``, BN + ReLU,
  split in two streams, spatial mean of their sum, bias-free 1x1 conv to
  ``max(int(filters * sk_ratio), 32)``, BN + ReLU, bias-free 1x1 conv to
  ``2 * filters``, softmax over the two streams, weighted sum.

Every conv and BN registers itself, as it is constructed, in the order the
official code calls (creates) them; the TF1 names ``conv2d_N`` /
``batch_normalization_N`` of the synthesised checkpoints come from that list,
not from the converter's own table. Weights are random, BatchNorm statistics
too (running_mean ~ N(0, 1), running_var ~ U(0.5, 2), gamma ~ U(0.5, 1.5),
beta ~ N(0, 0.2)), in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qscore_jax.convert import convert_checkpoint
from qscore_jax.convert.api import convert_state
from qscore_jax.models import apply_with_features, get_model_spec, list_models, load_model
from reference_models import max_relative_error

TOLERANCE = 1e-4
SK_RATIO = 0.0625
STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


# ------------------------------------------------------------ the reference

@dataclasses.dataclass
class Variant:
  """Deliberate deviations from the official net, for the negative controls."""
  stride1_pool_counts_padding: bool = False  # TF SAME average pool excludes it
  stride2_pool_excludes_padding: bool = False  # fixed_padding zeros count
  swap_sk_branches: bool = False  # mixing weight 0 belongs to the first stream


class Created:
  """The convs and BNs in TF creation order (what ``conv2d_N`` / ``batch_normalization_N`` number)."""

  def __init__(self):
    self.convs: list[nn.Conv2d] = []
    self.bns: list[nn.BatchNorm2d] = []

  def conv(self, cin, cout, k, stride=1):
    conv = nn.Conv2d(cin, cout, k, stride, padding=0, bias=False)
    self.convs.append(conv)
    return conv

  def bn(self, c):
    bn = nn.BatchNorm2d(c, eps=1e-5)
    self.bns.append(bn)
    return bn


def _tf_same(x, k, stride, value=0.0):
  """TF 'SAME' padding by hand: total = max((ceil(n/s) - 1) s + k - n, 0), the odd one after."""
  pads = []
  for n in (x.shape[-1], x.shape[-2]):
    total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads, value=value)


def _fixed_padding(x, k):
  beg = (k - 1) // 2
  end = k - 1 - beg
  return F.pad(x, (beg, end, beg, end))


class FixedPaddingConv(nn.Module):
  """``conv2d_fixed_padding``."""

  def __init__(self, created, cin, cout, k, stride):
    super().__init__()
    self.k, self.stride = k, stride
    self.conv = created.conv(cin, cout, k, stride)

  def forward(self, x):
    x = _fixed_padding(x, self.k) if self.stride > 1 else _tf_same(x, self.k, 1)
    return self.conv(x)


class SKConv(nn.Module):
  """``sk_conv2d``."""

  def __init__(self, created, cin, filters, stride, variant):
    super().__init__()
    self.variant = variant
    self.streams = FixedPaddingConv(created, cin, 2 * filters, 3, stride)
    self.streams_bn = created.bn(2 * filters)
    mid = max(int(filters * SK_RATIO), 32)
    self.reduce = created.conv(filters, mid, 1)
    self.reduce_bn = created.bn(mid)
    self.expand = created.conv(mid, 2 * filters, 1)

  def forward(self, x):
    x = F.relu(self.streams_bn(self.streams(x)))
    streams = torch.stack(torch.chunk(x, 2, dim=1))  # (2, N, filters, H, W)
    context = streams.sum(0).mean(dim=(2, 3), keepdim=True)
    context = F.relu(self.reduce_bn(self.reduce(context)))
    mixing = torch.softmax(torch.stack(torch.chunk(self.expand(context), 2, dim=1)), dim=0)
    if self.variant.swap_sk_branches:
      mixing = mixing.flip(0)
    return (streams * mixing).sum(0)


class SKBottleneck(nn.Module):
  """``bottleneck_block`` with ``FLAGS.sk_ratio > 0``: the shortcut is created first."""

  def __init__(self, created, cin, filters, stride, projection, variant):
    super().__init__()
    self.stride, self.projection, self.variant = stride, projection, variant
    if projection:
      self.short_conv = FixedPaddingConv(created, cin, 4 * filters, 1, 1)
      self.short_bn = created.bn(4 * filters)
    self.conv1 = FixedPaddingConv(created, cin, filters, 1, 1)
    self.bn1 = created.bn(filters)
    self.sk = SKConv(created, filters, filters, stride, variant)
    self.conv3 = FixedPaddingConv(created, filters, 4 * filters, 1, 1)
    self.bn3 = created.bn(4 * filters)

  def _pool(self, x):
    if self.stride > 1:
      if self.variant.stride2_pool_excludes_padding:
        ones = torch.ones_like(x[:, :1])
        return (F.avg_pool2d(_fixed_padding(x, 2), 2, self.stride)
                / F.avg_pool2d(_fixed_padding(ones, 2), 2, self.stride))
      return F.avg_pool2d(_fixed_padding(x, 2), 2, self.stride)  # VALID on the padded map
    total = F.avg_pool2d(_tf_same(x, 2, 1), 2, 1)
    if self.variant.stride1_pool_counts_padding:
      return total
    count = F.avg_pool2d(_tf_same(torch.ones_like(x[:, :1]), 2, 1), 2, 1)
    return total / count  # TF's average over the window's valid entries only

  def forward(self, x):
    shortcut = self.short_bn(self.short_conv(self._pool(x))) if self.projection else x
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.sk(out)
    out = self.bn3(self.conv3(out))
    return F.relu(out + shortcut)


class SKResNet(nn.Module):
  """``resnet_v1_generator`` (ImageNet stem) with ``FLAGS.sk_ratio > 0``; returns the pooled
  representation and the stem/stage maps (NCHW)."""

  def __init__(self, depth, width, variant=None):
    super().__init__()
    variant = variant or Variant()
    self.created = created = Created()
    self.stem = nn.ModuleList([
        FixedPaddingConv(created, 3, 64 * width // 2, 3, 2), created.bn(64 * width // 2),
        FixedPaddingConv(created, 64 * width // 2, 64 * width // 2, 3, 1),
        created.bn(64 * width // 2),
        FixedPaddingConv(created, 64 * width // 2, 64 * width, 3, 1), created.bn(64 * width)])
    cin = 64 * width
    self.stages = nn.ModuleList()
    for stage, blocks in enumerate(STAGES[depth]):
      filters = 64 * width * 2**stage
      group = nn.ModuleList()
      for index in range(blocks):
        group.append(SKBottleneck(created, cin, filters, 2 if stage and not index else 1,
                                  projection=index == 0, variant=variant))
        cin = 4 * filters
      self.stages.append(group)

  def forward(self, x):
    maps = {}
    for i in range(0, 6, 2):
      x = F.relu(self.stem[i + 1](self.stem[i](x)))
    x = F.max_pool2d(_tf_same(x, 3, 2, value=-math.inf), 3, 2)
    maps['stem'] = x
    for stage, group in enumerate(self.stages):
      for block in group:
        x = block(x)
      maps[f'layer{stage + 1}'] = x
    return x.mean(dim=(2, 3)), maps


def randomize_(model: SKResNet, seed: int) -> SKResNet:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for conv in model.created.convs:
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen)
                        / math.sqrt(conv.weight[0].numel()))
    for bn in model.created.bns:
      c = bn.num_features
      bn.running_mean.copy_(torch.randn(c, generator=gen))
      bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
      bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
      bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
  return model.eval()


@functools.lru_cache(maxsize=2)
def reference(depth, width, seed=0):
  return randomize_(SKResNet(depth, width), seed)


def tf1_variables(model: SKResNet, prefix='') -> dict[str, np.ndarray]:
  """The TF1 checkpoint variables of the net: ``base_model/conv2d[_N]/kernel`` (HWIO) and
  ``base_model/batch_normalization[_N]/{gamma,beta,moving_mean,moving_variance}``,
  numbered in creation order."""
  out = {}
  for n, conv in enumerate(model.created.convs):
    name = 'conv2d' + (f'_{n}' if n else '')
    out[f'{prefix}base_model/{name}/kernel'] = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  for n, bn in enumerate(model.created.bns):
    name = 'batch_normalization' + (f'_{n}' if n else '')
    for leaf, value in [('gamma', bn.weight), ('beta', bn.bias), ('moving_mean', bn.running_mean),
                        ('moving_variance', bn.running_var)]:
      out[f'{prefix}base_model/{name}/{leaf}'] = value.detach().numpy()
  return out


# ------------------------------------------------------------------ helpers

def _images(height, width, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def _torch_outputs(model, images):
  with torch.no_grad():
    pooled, maps = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  return pooled.numpy(), {k: v.permute(0, 2, 3, 1).numpy() for k, v in maps.items()}


@functools.lru_cache(maxsize=4)
def _jitted(model):
  return jax.jit(functools.partial(apply_with_features, model))  # one compilation per shape


def _flax_outputs(model, variables, images):
  pooled, maps = _jitted(model)(variables, images)
  return np.asarray(pooled), {k: np.asarray(v) for k, v in maps.items()}


def _errors(model, variables, torch_model, images):
  """Max relative error of the pooled output and of each stage map."""
  expected, expected_maps = _torch_outputs(torch_model, images)
  actual, actual_maps = _flax_outputs(model, variables, images)
  assert actual.shape == expected.shape == (len(images), model.num_features)
  errors = {'pooled': max_relative_error(actual, expected)}
  for name, expected_map in expected_maps.items():
    assert actual_maps[name].shape == expected_map.shape, name
    errors[name] = max_relative_error(actual_maps[name], expected_map)
  return errors


def _convert(torch_model, model_id):
  spec = get_model_spec(model_id)
  return convert_state(tf1_variables(torch_model), method='simclr', arch=spec.arch,
                       arch_options=spec.arch_options)


@functools.lru_cache(maxsize=1)
def _converted_r50x1():
  return _convert(reference(50, 1), 'simclr-v2-r50x1-sk1')


def _spec_shape(model_id):
  spec = get_model_spec(model_id)
  depth = int(spec.arch.removeprefix('resnet'))
  return depth, int(spec.arch_options.get('width_multiplier', 1))


# -------------------------------------------------------------------- tests

def test_every_sk1_entry_is_supported_with_the_official_options():
  ids = sorted(s.id for s in list_models('simclr') if s.id.endswith('-sk1'))
  assert ids == sorted(f'simclr-v2-{n}-sk1' for n in
                       ('r50x1', 'r50x2', 'r101x1', 'r101x2', 'r152x1', 'r152x2', 'r152x3'))
  for model_id in ids:
    spec = get_model_spec(model_id)
    assert spec.supported and not spec.reason
    assert spec.arch_options['sk_ratio'] == SK_RATIO
    assert spec.arch_options['pool_padding'] == 'tf_same'
    assert spec.arch_options.get('conv_padding', 'torch') == 'torch'
    sk0 = get_model_spec(model_id.replace('-sk1', '-sk0')) if 'r152x3' not in model_id else None
    if sk0 is not None:  # same net otherwise
      assert {k: v for k, v in spec.arch_options.items() if k != 'sk_ratio'} == sk0.arch_options


@pytest.mark.parametrize('size', [(224, 224), (225, 193)])
def test_r50x1_sk1_outputs_match_the_reference(size):
  """Pooled output and every stage map; 225x193 gives every stride-2 layer an odd input (the
  shortcut's fixed_padding zero then enters an average)."""
  torch_model = reference(50, 1)
  result = _converted_r50x1()
  errors = _errors(result['model'], result['variables'], torch_model, _images(*size))
  print(size, errors)
  assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize('variant,size', [
    (Variant(stride1_pool_counts_padding=True), (224, 224)),
    (Variant(stride2_pool_excludes_padding=True), (225, 193)),
    (Variant(swap_sk_branches=True), (224, 224))])
def test_negative_controls_fail(variant, size):
  """The comparison (pooled output and stage maps, as above) detects each plausible slip: the
  Flax net converted from the official weights must *not* match a reference that pools or
  mixes differently."""
  official = reference(50, 1)
  wrong = SKResNet(50, 1, variant).eval()
  wrong.load_state_dict(official.state_dict())
  result = _converted_r50x1()
  errors = _errors(result['model'], result['variables'], wrong, _images(*size))
  print(variant, size, errors)
  assert max(errors.values()) > 10 * TOLERANCE, errors


def test_stride2_padding_only_matters_at_odd_sizes():
  """At 224x224 the stride-2 pools never reach the padding, so that variant agrees there: the odd
  size is what tests it."""
  official = reference(50, 1)
  wrong = SKResNet(50, 1, Variant(stride2_pool_excludes_padding=True)).eval()
  wrong.load_state_dict(official.state_dict())
  images = _images(64, 64)
  assert max_relative_error(_torch_outputs(wrong, images)[0],
                            _torch_outputs(official, images)[0]) < 1e-6


def _tf1_checkpoint(tmp_path, torch_model, seed=7):
  """A SimCLR v2 TF1 checkpoint as the official training writes it: backbone, head_contrastive
  (3 layers, the last BN without beta), head_supervised, /Momentum slots for every trainable
  variable, global_step. (The ema_model/ copy some files hold is the same rule for every
  depth, tested by test_convert.py::test_simclr_ema_weights.)"""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  d = torch_model.stages[-1][-1].bn3.num_features
  tensors = {**tf1_variables(torch_model), 'global_step': np.int64(250228)}
  proj = {}
  dims = [d, 64, 64, 16]
  for i in range(3):
    p = f'head_contrastive/nl_{i}/'
    proj[p + 'dense/kernel'] = (rng.standard_normal((dims[i], dims[i + 1]))
                                / math.sqrt(dims[i])).astype(np.float32)
    proj[p + 'batch_normalization/gamma'] = rng.uniform(0.5, 1.5, dims[i + 1]).astype(np.float32)
    if i < 2:
      proj[p + 'batch_normalization/beta'] = (0.2 * rng.standard_normal(dims[i + 1])).astype(
          np.float32)
    proj[p + 'batch_normalization/moving_mean'] = rng.standard_normal(dims[i + 1]).astype(
        np.float32)
    proj[p + 'batch_normalization/moving_variance'] = rng.uniform(0.5, 2, dims[i + 1]).astype(
        np.float32)
  tensors.update(proj)
  tensors['head_supervised/linear_layer/dense/kernel'] = (
      rng.standard_normal((d, 10)) / math.sqrt(d)).astype(np.float32)
  tensors['head_supervised/linear_layer/dense/bias'] = (0.1 * rng.standard_normal(10)).astype(
      np.float32)
  for name in list(tensors):
    if name != 'global_step' and not name.endswith(('moving_mean', 'moving_variance')):
      tensors[name + '/Momentum'] = np.zeros_like(tensors[name])
  prefix = tmp_path / 'r50_1x_sk1' / 'model.ckpt-250228'
  prefix.parent.mkdir(parents=True)
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tensors[n] for n in names])
  return prefix, tensors


def _projector_reference(tensors, h):
  """head_contrastive by its formula: dense -> BN (-> ReLU) x 2, dense -> BN(no beta)."""
  for i in range(3):
    p = f'head_contrastive/nl_{i}/'
    h = h @ tensors[p + 'dense/kernel']
    bn = p + 'batch_normalization/'
    h = ((h - tensors[bn + 'moving_mean']) / np.sqrt(tensors[bn + 'moving_variance'] + 1e-5)
         * tensors[bn + 'gamma'] + tensors.get(bn + 'beta', 0.0))
    if i < 2:
      h = np.maximum(h, 0)
  return h


def test_tf1_checkpoint_end_to_end(tmp_path):
  torch_model = reference(50, 1)
  prefix, tensors = _tf1_checkpoint(tmp_path, torch_model)
  converted = convert_checkpoint(file=prefix, model_id='simclr-v2-r50x1-sk1',
                                 out_dir=tmp_path / 'out', progress=False)
  assert converted.metadata['arch_options']['sk_ratio'] == SK_RATIO
  dropped = converted.metadata['provenance']['dropped']
  assert dropped == {'momentum optimizer slots': sum(k.endswith('/Momentum') for k in tensors),
                     'training step': 1}
  images = _images(224, 224)
  model, variables, _ = load_model(converted.directory)  # what was saved, rebuilt from metadata
  assert model == converted.model and model.sk_ratio == SK_RATIO
  errors = _errors(model, variables, torch_model, images)
  print(errors)
  assert max(errors.values()) <= TOLERANCE, errors
  rep, _ = _flax_outputs(converted.model, converted.variables, images)
  projector, variables = converted.heads['projector']
  expected = _projector_reference(tensors, rep.astype(np.float64))
  assert max_relative_error(np.asarray(projector.apply(variables, rep)), expected) <= TOLERANCE
  classifier, variables = converted.heads['classifier']
  expected = (rep.astype(np.float64) @ tensors['head_supervised/linear_layer/dense/kernel']
              + tensors['head_supervised/linear_layer/dense/bias'])
  assert max_relative_error(np.asarray(classifier.apply(variables, rep)), expected) <= TOLERANCE
  # Without a registry id or --arch the file alone tells: 87 convs, a 3x3 stem conv.
  inferred = convert_checkpoint(file=prefix, method='simclr', save=False, progress=False)
  assert inferred.metadata['arch'] == 'resnet50'
  assert inferred.metadata['arch_options'] == {'pool_padding': 'tf_same', 'sk_ratio': SK_RATIO}
  assert inferred.model == converted.model
  jax.tree.map(np.testing.assert_array_equal, inferred.variables, converted.variables)


def test_plain_arch_on_an_sk_file_is_refused_with_the_options_to_pass(tmp_path):
  from qscore_jax.convert import ConversionError  # pylint: disable=import-outside-toplevel
  flat = tf1_variables(reference(50, 1))
  with pytest.raises(ConversionError, match=r'sk_ratio: file 0.0625, requested 0.0'):
    convert_state(flat, method='simclr', arch='resnet50')
  with pytest.raises(ConversionError, match='wrong depth'):
    convert_state(flat, method='simclr', arch='resnet101', arch_options={'sk_ratio': SK_RATIO})
  del flat['base_model/conv2d_86/kernel']
  with pytest.raises(ConversionError, match='86 convolutions'):
    convert_state(flat, method='simclr')


def test_sk0_file_under_an_sk1_id_is_refused():
  import checkpoint_factories as factories  # pylint: disable=import-outside-toplevel
  from qscore_jax.convert import ConversionError  # pylint: disable=import-outside-toplevel
  flat = factories._simclr_tf_names(factories.resnet('resnet50'), '')  # pylint: disable=protected-access
  spec = get_model_spec('simclr-v2-r50x1-sk1')
  with pytest.raises(ConversionError, match=r'sk_ratio: file 0.0, requested 0.0625'):
    convert_state(flat, method='simclr', arch=spec.arch, arch_options=spec.arch_options)


def _small_sk_net():
  from qscore_jax.models import ResNet  # pylint: disable=import-outside-toplevel
  return ResNet(stage_sizes=(1, 1, 1, 1), sk_ratio=SK_RATIO, width_multiplier=0.25,
                pool_padding='tf_same')


def test_small_sk_net_shapes_train_step_and_invalid_options():
  """abstract_variables and a jitted training-mode step of a one-block-per-stage narrow SK net
  (the SK context BN sees (N, 1, 1, C) maps); sk_ratio needs bottlenecks and the ImageNet stem."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import abstract_variables, build_model  # pylint: disable=import-outside-toplevel
  model = _small_sk_net()
  shapes = abstract_variables(model, (2, 32, 32, 3))
  params = shapes['params']
  assert params['stem_conv1']['kernel'].shape == (3, 3, 3, 8)
  assert params['stem_conv3']['kernel'].shape == (3, 3, 8, 16)
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 32, 64)  # two streams
  assert params['layer2_0']['sk_conv1']['kernel'].shape == (1, 1, 32, 32)  # max(2, 32)
  assert params['layer2_0']['sk_conv2']['kernel'].shape == (1, 1, 32, 64)
  assert params['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 64, 128)
  assert 'conv1' not in params and 'sk_bn1' in shapes['batch_stats']['layer4_0']
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
                           if len(s.shape) == 4 else np.ones(s.shape, np.float32), shapes)
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  out, state = step(variables, jnp.asarray(_images(32, 32)))
  assert out.shape == (2, 512) and bool(jnp.all(jnp.isfinite(out)))
  assert not np.allclose(state['batch_stats']['layer1_0']['sk_bn1']['mean'],
                         variables['batch_stats']['layer1_0']['sk_bn1']['mean'])
  for options in ({'block': 'basic'}, {'stem': 'cifar'}):
    with pytest.raises(ValueError, match='sk_ratio > 0'):
      build_model('resnet50', sk_ratio=SK_RATIO, **options)


@pytest.mark.slow
def test_init_variables_of_an_sk_net():
  """Slow only for XLA:CPU's compilation of the initialisers (~15-30 s here)."""
  from qscore_jax.models import abstract_variables, init_variables  # pylint: disable=import-outside-toplevel
  model = _small_sk_net()
  variables = init_variables(model, jax.random.key(0), (2, 32, 32, 3))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract_variables(model, (2, 32, 32, 3)))
  assert float(np.std(variables['params']['layer3_0']['sk_conv2']['kernel'])) > 0


# simclr-v2-r50x1-sk1 is converted and compared at 224x224 and 225x193 by
# test_r50x1_sk1_outputs_match_the_reference; the other six rows, at their real depth and
# width on 64x72 images, are slow (r101x1: ~10 s, r152x3: 795M parameters).
ROWS = ['simclr-v2-r101x1-sk1', 'simclr-v2-r50x2-sk1', 'simclr-v2-r101x2-sk1',
        'simclr-v2-r152x1-sk1', 'simclr-v2-r152x2-sk1', 'simclr-v2-r152x3-sk1']


@pytest.mark.slow
@pytest.mark.parametrize('model_id', ROWS)
def test_registry_row_outputs(model_id):
  """The row's net (its depth, width, options) converted from TF1 names, against the
  reference; also its parameter count against the reference's."""
  depth, width = _spec_shape(model_id)
  torch_model = randomize_(SKResNet(depth, width), seed=depth + width)
  result = _convert(torch_model, model_id)
  model = result['model']
  assert model.sk_ratio == SK_RATIO and model.width_multiplier == width
  n_params = sum(v.size for v in jax.tree.leaves(result['variables']['params']))
  assert n_params == sum(p.numel() for p in torch_model.parameters())
  errors = _errors(model, result['variables'], torch_model, _images(64, 72))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'{model_id}: {n_params / 1e6:.1f}M parameters, errors {errors}, peak RSS {peak:.1f} GiB')
  assert max(errors.values()) <= TOLERANCE, errors

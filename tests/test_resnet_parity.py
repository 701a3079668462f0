"""Flax ResNets against torchvision / timm with random weights and BN statistics.

Pooled representations and every stage's feature map must agree to a max
relative error of 1e-4 at 224x224 (every stride-2 layer sees an even input, so
TF 'SAME' pads asymmetrically) and at the odd size 225x193 (odd inputs to every
stride-2 layer, where off-by-one output sizes and padding slips show).
test_registry_backbone_parity does it for every ResNet configuration of the registry
(tests/parity_cases.py) at its real depth and width.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qscore_jax.convert.layout import resnet_from_torch
from qscore_jax.models import apply_with_features, build_model
from parity_cases import (COVERED_ELSEWHERE, SLOW, SMALL_IN_DEFAULT_RUN,
                          registry_configurations)
from reference_models import (max_relative_error, randomize_, state_dict_numpy,
                              tf_same_resnet_, unwrap_tf_same_state)

TOLERANCE = 1e-4
SIZES = [(224, 224), (225, 193)]


def _images(height, width, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def _torch_features(model: nn.Module, images_nhwc: np.ndarray):
  """Pooled output and stage outputs (NHWC) of a torchvision-style ResNet."""
  taps = {}
  names = {'maxpool': 'stem', 'layer1': 'layer1', 'layer2': 'layer2',
           'layer3': 'layer3', 'layer4': 'layer4'}
  hooks = [getattr(model, attr).register_forward_hook(
      lambda _m, _i, out, name=name: taps.__setitem__(name, out))
           for attr, name in names.items()]
  with torch.no_grad():
    pooled = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
  for hook in hooks:
    hook.remove()
  return pooled.numpy(), {k: v.permute(0, 2, 3, 1).numpy() for k, v in taps.items()}


def _flax_features(model, variables, images):
  pooled, features = jax.jit(functools.partial(apply_with_features, model))(variables, images)
  return np.asarray(pooled), {k: np.asarray(v) for k, v in features.items()}


def _assert_parity(torch_model, flax_model, size, state=None, seed=0, batch=2):
  images = _images(*size, batch=batch, seed=seed)
  state = state if state is not None else state_dict_numpy(torch_model)
  state = {k: v for k, v in state.items() if not k.startswith('fc.')}
  variables = resnet_from_torch(state)
  expected, expected_maps = _torch_features(torch_model, images)
  actual, actual_maps = _flax_features(flax_model, variables, images)
  assert actual.shape == expected.shape == (batch, flax_model.num_features)
  for name, expected_map in expected_maps.items():
    assert actual_maps[name].shape == expected_map.shape, name
    assert max_relative_error(actual_maps[name], expected_map) < TOLERANCE, name
  error = max_relative_error(actual, expected)
  assert error < TOLERANCE, error
  return actual, expected


def _torchvision(name, seed, **kwargs):
  model = getattr(torchvision.models, name)(**kwargs)
  model.fc = nn.Identity()
  return randomize_(model, seed)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_parity(arch, size):
  _assert_parity(_torchvision(arch, seed=1), build_model(arch), size)


@pytest.mark.parametrize('size', SIZES)
def test_width_x2_all_channels_parity(size):
  """SwAV/VICReg/SimCLR/BYOL 'x2': every channel doubled.

  Built as SwAV's and VICReg's `widen` does it, from torchvision's own blocks:
  a 128-channel stem and stages of 128/256/512/1024 planes.
  """
  bottleneck = torchvision.models.resnet.Bottleneck
  reference = torchvision.models.ResNet(bottleneck, [3, 4, 6, 3])
  reference.inplanes = 128
  reference.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
  reference.bn1 = nn.BatchNorm2d(128)
  for stage, blocks in enumerate([3, 4, 6, 3]):
    setattr(reference, f'layer{stage + 1}', reference._make_layer(  # pylint: disable=protected-access
        bottleneck, 128 * 2**stage, blocks, stride=1 if stage == 0 else 2))
  reference.fc = nn.Identity()
  reference = randomize_(reference, seed=2)
  model = build_model('resnet50', width_multiplier=2)
  assert model.num_features == 4096
  _assert_parity(reference, model, size)


def test_wide_resnet50_2_parity():
  """torchvision's wide variant widens only the inner 3x3 width."""
  _assert_parity(_torchvision('wide_resnet50_2', seed=3), build_model('wide_resnet50_2'),
                 (224, 224))


@pytest.mark.parametrize('size', [(32, 32), (37, 29)])
def test_cifar_stem_parity(size):
  """solo-learn: conv 3x3 stride 1 padding 2, no max-pool."""
  reference = torchvision.models.resnet18()
  reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
  reference.maxpool = nn.Identity()
  reference.fc = nn.Identity()
  randomize_(reference, seed=4)
  model = build_model('resnet18', stem='cifar')
  _assert_parity(reference, model, size)
  # The 32x32 input grows to 34x34 through padding 2, as in solo-learn.
  _, maps = _flax_features(model, resnet_from_torch(
      {k: v for k, v in state_dict_numpy(reference).items()}), _images(*size))
  assert maps['stem'].shape[1:3] == (size[0] + 2, size[1] + 2)


@pytest.mark.parametrize('size', SIZES)
def test_tf_same_everywhere_parity(size):
  """BYOL: TF 'SAME' in every conv and the max-pool, against hand-padded torch."""
  reference = tf_same_resnet_(_torchvision('resnet50', seed=5), convs=True, pool=True)
  model = build_model('resnet50', conv_padding='tf_same', pool_padding='tf_same')
  state = unwrap_tf_same_state(state_dict_numpy(reference))
  actual, _ = _assert_parity(reference, model, size, state=state)
  if size == (224, 224):
    # Guard: on even sizes SAME pads asymmetrically, so the symmetric torchvision
    # model must differ. (On 225x193 every feature map is odd and SAME pads
    # symmetrically: there the two agree, which the parity above also shows.)
    symmetric, _ = _torch_features(_torchvision('resnet50', seed=5), _images(*size))
    assert max_relative_error(actual, symmetric) > 1e-3


@pytest.mark.parametrize('size', SIZES)
def test_simclr_same_maxpool_parity(size):
  """SimCLR: symmetric conv padding, TF 'SAME' max-pool only."""
  reference = tf_same_resnet_(_torchvision('resnet18', seed=6), convs=False, pool=True)
  model = build_model('resnet18', pool_padding='tf_same')
  state = unwrap_tf_same_state(state_dict_numpy(reference))
  actual, _ = _assert_parity(reference, model, size, state=state)
  if size == (224, 224):  # the max-pool input is 112x112: SAME pads (0, 1)
    symmetric, _ = _torch_features(_torchvision('resnet18', seed=6), _images(*size))
    assert max_relative_error(actual, symmetric) > 1e-3


# Stage sizes of torchvision's resnet50/101/152 (test_stage_sizes_are_torchvisions) and of
# ResNet-200 (He et al. 2016, "Identity mappings"; BYOL's and VICReg's ResNet-200).
STAGES = {'resnet50': [3, 4, 6, 3], 'resnet101': [3, 4, 23, 3], 'resnet152': [3, 8, 36, 3],
          'resnet200': [3, 24, 36, 3]}
# The heavy configurations' default-run check: even at every stride-2 layer (64 -> 32 -> ...
# -> 2: TF SAME pads asymmetrically), and odd at every one (97 -> 49 -> 25 -> 13 -> 7 -> 4,
# 65 -> 33 -> ... -> 3), as 224x224 and 225x193 are.
SMALL_SIZES = [(64, 64), (97, 65)]


def test_stage_sizes_are_torchvisions():
  for arch in ('resnet50', 'resnet101', 'resnet152'):
    with torch.device('meta'):
      model = getattr(torchvision.models, arch)()
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == STAGES[arch]


def bottleneck_reference(arch, seed, *, width_multiplier=1, conv_padding='torch',
                         pool_padding='torch'):
  """torchvision ``ResNet(Bottleneck, stage sizes)`` with *every* channel times the width
  (as SimCLR/SwAV/VICReg/BYOL widen: stem 64w, stage s of planes 64w*2^s, so inner width
  64w*2^s and output 256w*2^s), random weights and BN statistics, TF SAME padded by hand
  where asked, and the state dict under torchvision's names."""
  bottleneck = torchvision.models.resnet.Bottleneck
  width = width_multiplier
  with torch.device('meta'):  # no torch init of what randomize_ overwrites
    reference = torchvision.models.ResNet(bottleneck, STAGES[arch])
    if width != 1:
      reference.inplanes = 64 * width
      reference.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
      reference.bn1 = nn.BatchNorm2d(64 * width)
      for stage, blocks in enumerate(STAGES[arch]):
        setattr(reference, f'layer{stage + 1}', reference._make_layer(  # pylint: disable=protected-access
            bottleneck, 64 * width * 2**stage, blocks, stride=1 if stage == 0 else 2))
    reference.fc = nn.Identity()
  reference = reference.to_empty(device='cpu')
  # randomize_ fills every parameter and running statistic (all are in Conv2d / BatchNorm2d);
  # the step counters stay, zeroed.
  assert {type(m) for m in reference.modules() if not list(m.children())} <= {
      nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity}
  for name, buffer in reference.named_buffers():
    if name.endswith('num_batches_tracked'):
      buffer.zero_()
  randomize_(reference, seed)
  if 'tf_same' in (conv_padding, pool_padding):
    tf_same_resnet_(reference, convs=conv_padding == 'tf_same', pool=pool_padding == 'tf_same')
  return reference


def _registry_backbone_parity(arch, options, sizes):
  """The configuration's Flax ResNet (as the registry builds it) against its reference, batch 1
  (the batch dimension is checked with 2 by the tests above); returns the max relative error
  over the pooled output and every stage's map."""
  unknown = set(options) - {'width_multiplier', 'conv_padding', 'pool_padding'}
  assert not unknown, f'no torchvision reference for the options {unknown}: add one'
  reference = bottleneck_reference(arch, seed=sum(STAGES[arch]), **options)
  # Views of the torch tensors, moved to the device once (r50x5: 2.3 GB, a strided copy).
  variables = jax.device_put(resnet_from_torch(unwrap_tf_same_state(
      {k: v.numpy() for k, v in reference.state_dict().items()})))
  model = build_model(arch, **options)
  forward = jax.jit(functools.partial(apply_with_features, model))
  errors = []
  for size in sizes:
    images = _images(*size, batch=1)
    expected, expected_maps = _torch_features(reference, images)
    actual, actual_maps = forward(variables, images)
    actual = np.asarray(actual)
    actual_maps = {k: np.asarray(v) for k, v in actual_maps.items()}
    assert actual.shape == expected.shape == (1, model.num_features)
    for name, expected_map in expected_maps.items():
      assert actual_maps[name].shape == expected_map.shape, (size, name)
      errors.append(max_relative_error(actual_maps[name], expected_map))
      assert errors[-1] < TOLERANCE, (size, name, errors[-1])
    errors.append(max_relative_error(actual, expected))
    assert errors[-1] < TOLERANCE, (size, errors[-1])
  print(f'{arch} {options}: max relative error {max(errors):.2e}')
  return max(errors)


_RESNETS = {key: config for key, config in registry_configurations('resnet').items()
            if key not in COVERED_ELSEWHERE}


@pytest.mark.parametrize('arch,options', [
    pytest.param(*config, id=key, marks=[pytest.mark.slow] if key in SLOW else [])
    for key, config in _RESNETS.items()])
def test_registry_backbone_parity(arch, options):
  """Every ResNet configuration of the registry (real depth, real width, its padding) equals
  torchvision at 224x224 and 225x193: stem and stage maps and the pooled output."""
  _registry_backbone_parity(arch, options, SIZES)


@pytest.mark.parametrize('arch,options', [
    pytest.param(*_RESNETS[key], id=key) for key in sorted(SMALL_IN_DEFAULT_RUN)])
def test_registry_backbone_parity_small(arch, options):
  """Slow configurations in the default run at their real depth and width, at sizes (64x64
  and 97x65) that are even / odd at every stride-2 layer as 224x224 / 225x193 are."""
  _registry_backbone_parity(arch, options, SMALL_SIZES)


def test_train_mode_batchnorm_matches_torch():
  """Training-mode forward uses batch statistics; running means move like torch's
  momentum=0.1. Running variances differ by Bessel's factor n/(n-1): torch
  stores the unbiased batch variance, Flax the biased one (both normalise with
  the biased one)."""
  reference = _torchvision('resnet18', seed=7).train()
  images = _images(64, 64, batch=4)
  state = state_dict_numpy(reference)
  variables = resnet_from_torch(state)
  model = build_model('resnet18')
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  actual, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, images)
  assert max_relative_error(actual, expected) < TOLERANCE
  new_stats = updates['batch_stats']
  torch_mean = reference.bn1.running_mean.numpy()
  np.testing.assert_allclose(new_stats['bn1']['mean'], torch_mean, rtol=1e-4, atol=1e-5)
  n = images.shape[0] * 32 * 32  # elements per channel after the stride-2 stem conv
  old_var = state['bn1.running_var']
  torch_batch_var = (reference.bn1.running_var.numpy() - 0.9 * old_var) / 0.1
  flax_batch_var = (np.asarray(new_stats['bn1']['var']) - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(flax_batch_var * n / (n - 1), torch_batch_var, rtol=1e-3)


def test_layout_rejects_leftover_keys():
  state = state_dict_numpy(_torchvision('resnet18', seed=8))
  state['fc.weight'] = np.zeros((10, 512), np.float32)
  state['module.conv1.weight'] = state['conv1.weight']
  with pytest.raises(ValueError, match='not part of a torchvision-layout ResNet') as info:
    resnet_from_torch(state)
  assert 'fc.weight' in str(info.value) and 'module.conv1.weight' in str(info.value)

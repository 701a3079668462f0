"""Heatmaps of discriminative features and their IoU with core / spurious masks.

Grad-CAM and the input gradient are checked against a float64 PyTorch
computation on torchvision / timm models with the same random weights; the
metric against constructed models whose answer is known (one sees only the
object, one only the texture).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint_factories as factories
from helpers import random_variables, run_on_simulated_devices
from qscore_jax import cli, interpret, stats
from qscore_jax.convert.layout import resnet_from_torch, vit_from_torch
from qscore_jax.models import build_model, get_preprocessing, save_model
from qscore_jax.models.features import expose_feature
from reference_models import state_dict_numpy

EPS = 1.0  # many highly active features on random weights, so the targets are rich


def _torch_selection(h, discriminative, eps):
  """L_i ∩ D in float64 torch, with the margin of the closest feature to the threshold."""
  mu = h.mean(dim=1, keepdim=True)
  sigma = h.std(dim=1, unbiased=False, keepdim=True)
  threshold = mu + eps * sigma
  margin = float((h - threshold).abs().min() / sigma.min())
  return ((h > threshold) & torch.from_numpy(discriminative)[None]).double(), margin


def _torch_heatmap(forward, images, discriminative, eps, method):
  """Float64 Grad-CAM / input gradient. ``forward(x) -> (h, stage, as_nchw)``."""
  x = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2).contiguous()
  x.requires_grad_(method == 'input_gradient')
  h, stage, as_nchw = forward(x)
  stage.retain_grad()
  selection, margin = _torch_selection(h.detach(), discriminative, eps)
  (selection * h).sum().backward()
  if method == 'input_gradient':
    raw = x.grad.abs().amax(dim=1)
  else:
    weights = as_nchw(stage.grad).mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * as_nchw(stage)).sum(dim=1, keepdim=True))
    raw = F.relu(F.interpolate(cam, size=images.shape[1:3], mode='bilinear',
                               align_corners=False))[:, 0]
  peak = raw.amax(dim=(1, 2), keepdim=True)
  return (raw / peak).detach().numpy(), selection.sum(1).numpy(), margin


@pytest.fixture(scope='module')
def resnet():
  torch_model = factories.resnet('resnet18', seed=3).double().eval()
  variables = resnet_from_torch(state_dict_numpy(torch_model))
  return torch_model, build_model('resnet18'), variables


def _resnet_forward(model):
  def forward(x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    stage = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(stage), 1), stage, lambda t: t
  return forward


@pytest.mark.parametrize('method', ['gradcam', 'input_gradient'])
def test_resnet_heatmaps_equal_a_float64_torch_computation(resnet, method):
  torch_model, model, variables = resnet
  images = factories.images(96, n=3, seed=1)
  discriminative = np.random.default_rng(0).random(model.num_features) < 0.5
  expected, targets, margin = _torch_heatmap(_resnet_forward(torch_model), images,
                                             discriminative, EPS, method)
  assert margin > 1e-4 and (targets > 3).all()  # the selection cannot flip on rounding
  got = jax.jit(lambda v, x: interpret.heatmaps(model, v, x, discriminative=discriminative,
                                                eps=EPS, method=method))(variables, images)
  np.testing.assert_array_equal(np.asarray(got['num_targets']), targets)
  assert got['heatmap'].shape == (3, 96, 96)
  np.testing.assert_allclose(np.asarray(got['heatmap']), expected, atol=2e-4)


def test_vit_gradcam_uses_the_patch_tokens_entering_the_last_block():
  torch_model = factories.vit(seed=4, depth=3).double().eval()
  model = build_model('vit_small', depth=3)
  variables = vit_from_torch(state_dict_numpy(torch_model), num_heads=6)

  def forward(x):
    tokens = torch_model.blocks[:-1](torch_model._pos_embed(torch_model.patch_embed(x)))  # pylint: disable=protected-access
    h = torch_model.norm(torch_model.blocks[-1](tokens))[:, 0]
    return h, tokens, lambda t: t[:, 1:].reshape(x.shape[0], 14, 14, -1).permute(0, 3, 1, 2)

  images = factories.images(224, n=2, seed=2)
  discriminative = np.random.default_rng(1).random(model.num_features) < 0.5
  expected, targets, margin = _torch_heatmap(forward, images, discriminative, EPS, 'gradcam')
  assert margin > 1e-4 and (targets > 3).all()
  # The class token after the last block sees no other token of that block's output:
  # Grad-CAM taps the tokens entering it (as pytorch-grad-cam's blocks[-1].norm1).
  assert interpret.default_stage(model) == 'block1'
  with pytest.raises(interpret.InterpretError, match="block2's patch tokens do not reach"):
    interpret.check_stage(model, 'block2')
  got = jax.jit(lambda v, x: interpret.heatmaps(model, v, x, discriminative=discriminative,
                                                eps=EPS))(variables, images)
  np.testing.assert_allclose(np.asarray(got['heatmap']), expected, atol=5e-4)


def test_a_given_feature_selection_explains_that_feature(resnet):
  torch_model, model, variables = resnet
  images = factories.images(64, n=2, seed=5)
  one_hot = np.zeros(model.num_features, np.float32)
  one_hot[7] = 1
  x = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2)
  h, stage, _ = _resnet_forward(torch_model)(x)
  stage.retain_grad()
  h[:, 7].sum().backward()
  cam = F.relu((stage.grad.mean(dim=(2, 3), keepdim=True) * stage).sum(1, keepdim=True))
  cam = F.relu(F.interpolate(cam, size=(64, 64), mode='bilinear', align_corners=False))[:, 0]
  expected = (cam / cam.amax(dim=(1, 2), keepdim=True)).detach().numpy()
  got = interpret.heatmaps(model, variables, images, selection=one_hot)
  np.testing.assert_allclose(np.asarray(got['heatmap']), expected, atol=2e-4)
  np.testing.assert_array_equal(np.asarray(got['num_targets']), [1, 1])


# ---------------------------------------------------------------- constructed models


class ColourDetector(nn.Module):
  """A toy backbone that sees one colour only: its stage is ReLU(channel - the others).

  The representation is the pooled map times fixed weights; feature 7 is much
  larger than the rest, so L_i ∩ D = {7} for any image where the colour occurs.
  """
  channel: int
  num_features: int = 8
  feature_names: tuple = ('stage',)

  @nn.compact
  def __call__(self, images, train=False):
    del train
    others = (jnp.sum(images, axis=-1, keepdims=True) - images[..., self.channel:self.channel + 1])
    stage = nn.relu(images[..., self.channel:self.channel + 1] - others / 2)
    stage = expose_feature(self, 'stage', stage)
    weights = jnp.array([1.0] * 7 + [8.0])
    return jnp.mean(stage, axis=(1, 2)) * weights[None, :]


def _scenes(n=6, size=32, seed=0):
  """Red disks (the object) over green stripes (the texture) on grey, with their masks."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size] + 0.5
  images = np.full((n, size, size, 3), 0.5, np.float32)
  core = np.zeros((n, size, size), np.float32)
  spurious = np.zeros_like(core)
  for i in range(n):
    top, left = rng.integers(0, size // 2, 2)
    patch = (y >= top) & (y < top + size // 2) & (x >= left) & (x < left + size // 2)
    stripes = patch & ((y.astype(int) // 2) % 2 == 0)
    images[i][patch] = (0.0, 0.1, 0.0)
    images[i][stripes] = (0.0, 1.0, 0.0)
    cy, cx = rng.uniform(8, size - 8, 2)
    disk = np.hypot(y - cy, x - cx) <= 6
    images[i][disk] = (1.0, 0.0, 0.0)
    core[i], spurious[i] = disk, patch & ~disk
  return images, core, spurious


def _discriminative(model, images):
  h = model.apply({}, images)
  counts = stats.activation_counts(h, EPS)
  return stats.discriminative_features(counts, band=(0.0, 100.0))


@pytest.mark.parametrize('channel,expected', [(0, 'core'), (1, 'spurious')],
                         ids=['object-model', 'texture-model'])
def test_object_model_overlaps_core_and_texture_model_overlaps_spurious(channel, expected):
  images, core, spurious = _scenes()
  model = ColourDetector(channel)
  discriminative = _discriminative(model, images)
  assert np.asarray(discriminative).tolist() == [False] * 7 + [True]
  out = jax.jit(lambda x, c, s, d: interpret.interpret_batch(
      model, {}, x, c, s, d, config=interpret.InterpretConfig(eps=EPS)))(
          images, core, spurious, discriminative)
  assert np.asarray(out['has_target']).all()
  core_iou, spurious_iou = np.asarray(out['core_iou']), np.asarray(out['spurious_iou'])
  other = 'spurious' if expected == 'core' else 'core'
  by_name = {'core': core_iou, 'spurious': spurious_iou}
  # Object model: its region is the disk (IoU ~1); texture model: the bright stripes
  # (about half the patch); the other region is never hit.
  assert by_name[expected].mean() > 0.4 and by_name[other].max() < 0.05, (core_iou, spurious_iou)
  # Against the masks rotated by 180 degrees (the chance baseline) they score far less.
  baseline = np.asarray(out[f'{expected}_iou_baseline'])
  assert by_name[expected].mean() > baseline.mean() + 0.2, (by_name[expected], baseline)


def test_image_without_a_discriminative_feature_is_reported_not_nan():
  images, core, spurious = _scenes(n=3)
  model = ColourDetector(0)
  discriminative = _discriminative(model, images)
  images[1] = 0.5  # grey only: the object detector sees nothing, h = 0
  out = interpret.interpret_batch(model, {}, images, core, spurious, discriminative,
                                  config=interpret.InterpretConfig(eps=EPS))
  assert np.asarray(out['has_target']).tolist() == [True, False, True]
  assert not np.asarray(out['core_defined'])[1] and not np.asarray(out['spurious_defined'])[1]
  maps = interpret.heatmaps(model, {}, images, discriminative=discriminative, eps=EPS)
  assert np.isfinite(np.asarray(maps['heatmap'])).all() and not np.asarray(maps['heatmap'][1]).any()
  per_image = {k: np.asarray(v) for k, v in out.items()}
  per_image['correct'] = np.array([True, True, False])
  summary = interpret.summarize_ious(per_image)
  assert summary['all']['no_discriminative_feature'] == 1
  assert summary['correct']['core']['count'] == 1 and summary['misclassified']['core']['count'] == 1
  json.dumps(summary, allow_nan=False)  # no NaN anywhere


def test_binarization_modes_and_iou():
  heat = jnp.array([[[0.0, 0.2, 0.6, 1.0]]])
  assert interpret.binarize_heatmap(heat, 0.6).tolist() == [[[False, False, True, True]]]
  assert interpret.binarize_heatmap(heat, 0.25, 'top_fraction').tolist() == [
      [[False, False, False, True]]]
  region = jnp.array([[[True, True, False, False]]])
  mask = jnp.array([[[False, True, True, False]]])
  value, defined = interpret.iou(region, mask)
  assert float(value[0]) == pytest.approx(1 / 3) and bool(defined[0])
  value, defined = interpret.iou(jnp.zeros_like(region), jnp.zeros_like(mask))
  assert float(value[0]) == 0.0 and not bool(defined[0])


# ---------------------------------------------------------------- bad inputs


def test_mask_of_another_size_than_the_image():
  images, core, spurious = _scenes(n=2)
  model = ColourDetector(0)
  with pytest.raises(interpret.InterpretError, match=r"masks must have the heatmaps' shape "
                     r'\(2, 32, 32\).*core \(2, 16, 16\)'):
    interpret.interpret_batch(model, {}, images, core[:, ::2, ::2], spurious,
                              _discriminative(model, images))


def test_unknown_stage_lists_the_available_ones(resnet):
  _, model, variables = resnet
  with pytest.raises(interpret.InterpretError,
                     match=r"no stage 'layer5'; its stages are stem, layer1, layer2, layer3, "
                           r'layer4 \(default: layer4\)'):
    interpret.heatmaps(model, variables, factories.images(32, n=1),
                       discriminative=np.ones(512, bool), stage='layer5')


def test_a_one_by_one_stage_is_refused_for_gradcam(resnet):
  _, model, variables = resnet
  with pytest.raises(interpret.InterpretError,
                     match=r'layer4 is 1x1 for 32x32 images.*\(stem 8x8, layer1 8x8, '
                           r'layer2 4x4, layer3 2x2, layer4 1x1\)'):
    interpret.heatmaps(model, variables, factories.images(32, n=1),
                       discriminative=np.ones(512, bool))


def test_bad_options_are_explained():
  with pytest.raises(interpret.InterpretError, match='method must be one of'):
    interpret.InterpretConfig(method='occlusion')
  with pytest.raises(interpret.InterpretError, match=r'heatmap_threshold must be in \(0, 1\]'):
    interpret.InterpretConfig(heatmap_threshold=1.5)
  with pytest.raises(interpret.InterpretError, match='exactly one of discriminative'):
    interpret.heatmaps(ColourDetector(0), {}, np.zeros((1, 8, 8, 3), np.float32))


# ---------------------------------------------------------------- the command


@pytest.fixture(scope='module')
def two_models(tmp_path_factory):
  root = tmp_path_factory.mktemp('models')
  model = build_model('resnet18', width_multiplier=0.25)
  paths = []
  for seed in (0, 1):
    paths.append(save_model(root / f'r18-{seed}', random_variables(model, (1, 32, 32, 3), seed=seed),
                            arch='resnet18', arch_options={'width_multiplier': 0.25},
                            preprocessing=get_preprocessing('cifar')))
  return paths


def test_interpret_command_on_synthetic_shapes(tmp_path, two_models, capsys, model_restores):
  data_dir = str(tmp_path / 'tfds')
  out = tmp_path / 'interpret'
  args = ['interpret', str(two_models[0]), str(two_models[1]), '--dataset', 'synthetic_shapes/tiny',
          '--out', str(out), '--data-dir', data_dir, '--batch-size', '64', '--stage', 'layer3',
          '--probe-epochs', '5', '--no-progress']
  assert cli.main(args) == 0
  assert model_restores == list(two_models)  # one restore per model
  printed = capsys.readouterr().out
  assert 'core mIoU' in printed and 'paired change' in printed
  for name in ('0-r18-0', '1-r18-1'):
    result = json.loads((out / name / 'interpret.json').read_text())
    assert result['config']['stage'] == 'layer3'
    assert result['summary']['all']['images'] == 128
    for figure in result['figures'].values():
      assert (out / name / figure).stat().st_size > 10_000
    ious = np.load(out / name / 'ious.npz')
    assert ious['core_iou'].shape == (128,) and np.isfinite(ious['core_iou']).all()
  comparison = json.loads((out / 'comparison.json').read_text())
  assert comparison['paired_delta']['images'] == 128


def test_interpret_command_errors(tmp_path, two_models, capsys):
  data_dir = str(tmp_path / 'tfds')
  assert cli.main(['interpret', str(two_models[0]), '--dataset', 'sklearn_digits', '--out',
                   str(tmp_path / 'x'), '--data-dir', data_dir]) == 2
  assert 'sklearn_digits has no core/spurious masks' in capsys.readouterr().err
  assert cli.main(['interpret', str(two_models[0]), '--dataset', 'synthetic_shapes/tiny',
                   '--out', str(tmp_path / 'x'), '--data-dir', data_dir,
                   '--stage', 'block3']) == 2
  assert "no stage 'block3'; its stages are stem, layer1" in capsys.readouterr().err
  # A 1x1 stage at the model's input size fails before anything is embedded.
  assert cli.main(['interpret', str(two_models[0]), '--dataset', 'synthetic_shapes/tiny',
                   '--out', str(tmp_path / 'y'), '--data-dir', data_dir]) == 2
  assert 'layer4 is 1x1 for 32x32 images' in capsys.readouterr().err
  assert not (tmp_path / 'y' / 'store_reference').exists()


MULTI_DEVICE = r"""
import functools, jax, numpy as np
import qscore_jax
from qscore_jax import interpret
from qscore_jax.models import build_model, init_variables
assert jax.device_count() == 4, jax.devices()
model = build_model('resnet18', width_multiplier=0.25)
variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
rng = np.random.default_rng(0)
images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
core = (rng.random((8, 32, 32)) < 0.3).astype(np.float32)
spurious = 1 - core
d = rng.random(model.num_features) < 0.5
config = interpret.InterpretConfig(eps=1.0, stage='layer2')
single = jax.jit(functools.partial(interpret.interpret_batch, model, config=config))(
    variables, images, core, spurious, d)
mesh = jax.make_mesh((4,), ('data',))
step = interpret.make_interpret_step(model, config, mesh)
from qscore_jax import parallel
batch = parallel.global_batch({'x': images, 'c': core, 's': spurious}, mesh)
sharded = step(variables, batch['x'], batch['c'], batch['s'], d)
mapped = jax.pmap(functools.partial(interpret.interpret_batch, model, config=config),
                  in_axes=(None, 0, 0, 0, None))(
    variables, images.reshape(4, 2, 32, 32, 3), core.reshape(4, 2, 32, 32),
    spurious.reshape(4, 2, 32, 32), d)
assert np.asarray(single['has_target']).sum() >= 4
for key in single:
  np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(single[key]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(mapped[key]).reshape(np.asarray(single[key]).shape),
                             np.asarray(single[key]), rtol=1e-5, atol=1e-6)
print('ok')
"""


def test_interpret_step_on_four_devices_equals_one_device():
  run_on_simulated_devices(MULTI_DEVICE, 4)


def test_interpret_command_on_salient_imagenet_masks(tmp_path, capsys):
  """imagenet2012 + Salient ImageNet, in miniature: the published layout made here
  (tests/test_salient.py), the reference split from an ImageNet train folder."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import salient  # pylint: disable=import-outside-toplevel
  import test_salient  # pylint: disable=import-outside-toplevel
  root, annotations, train, _ = test_salient._make(tmp_path)  # pylint: disable=protected-access
  data_dir = str(tmp_path / 'tfds')
  salient.prepare(data_dir=data_dir, salient_dir=root, annotations=annotations,
                  imagenet_train_dir=train)
  model = build_model('resnet18', width_multiplier=0.25)
  saved = save_model(tmp_path / 'r18', random_variables(model, (1, 32, 32, 3)), arch='resnet18',
                     arch_options={'width_multiplier': 0.25},
                     preprocessing=dataclasses.replace(get_preprocessing('imagenet'),
                                                       image_size=32))
  out = tmp_path / 'out'
  assert cli.main(['interpret', str(saved), '--dataset', 'salient_imagenet', '--split', 'train',
                   '--reference-dataset', f'folder:{train}', '--out', str(out), '--data-dir',
                   data_dir, '--eps', '1', '--batch-size', '8', '--probe-epochs', '5',
                   '--method', 'input_gradient', '--no-progress']) == 0
  result = json.loads((out / 'interpret.json').read_text())
  assert result['config']['method'] == 'input_gradient'
  assert result['reference'] == f'folder:{train}/train'
  assert result['summary']['all']['images'] == 6
  # Four images carry a core mask, four a spurious one (test_salient's layout).
  ious = np.load(out / 'ious.npz')
  assert ious['core_defined'].sum() <= 4 and ious['spurious_defined'].sum() <= 4
  assert 'core mIoU' in capsys.readouterr().out

"""The backbone interface: input errors, feature maps, registry, architectures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_variables
from qscore_jax import models
from qscore_jax.models import (ARCHITECTURES, abstract_variables, apply_with_features,
                               build_model, embed, get_model_spec, init_variables,
                               list_models)


@pytest.fixture(scope='module')
def resnet18():
  model = build_model('resnet18')
  return model, random_variables(model, (1, 64, 64, 3))


@pytest.fixture(scope='module')
def tiny_vit():
  model = build_model('vit_small', depth=2, embed_dim=64, num_heads=4, image_size=64)
  return model, random_variables(model)


# ---------------------------------------------------------------- bad inputs

BAD_INPUTS = [
    (np.zeros((64, 64, 3), np.float32), ValueError, r'rank 4.*single image.*images\[None\]'),
    (np.zeros((2, 64, 64), np.float32), ValueError, r'rank 4 .*got rank 3'),
    (np.zeros((2, 3, 64, 64), np.float32), ValueError, r'channels-first.*transpose'),
    (np.zeros((2, 64, 64, 1), np.float32), ValueError, r'3 channels.*grey-scale'),
    (np.zeros((2, 64, 64, 4), np.float32), ValueError, r'RGBA'),
    (np.zeros((2, 64, 64, 3), np.uint8), TypeError, r'floating-point.*uint8.*preprocessing'),
    (np.zeros((2, 64, 64, 3), np.int32), TypeError, r'floating-point.*int32'),
    (np.zeros((0, 64, 64, 3), np.float32), ValueError, r'empty batch'),
    ([[1.0, 2.0]], TypeError, r'array of images.*list'),
]


@pytest.mark.parametrize('images,error,message', BAD_INPUTS)
@pytest.mark.parametrize('which', ['resnet18', 'tiny_vit'])
def test_bad_image_batches_give_clear_errors(request, which, images, error, message):
  model, variables = request.getfixturevalue(which)
  with pytest.raises(error, match=message):
    model.apply(variables, images)


def test_bad_inputs_are_caught_under_jit(resnet18):
  model, variables = resnet18
  with pytest.raises(ValueError, match='channels-first'):
    embed(model, variables, jnp.zeros((2, 3, 64, 64)))


def test_vit_rejects_images_smaller_than_a_patch(tiny_vit):
  model, variables = tiny_vit
  with pytest.raises(ValueError, match='at least 16x16'):
    model.apply(variables, np.zeros((1, 8, 8, 3), np.float32))


def test_bfloat16_images_are_accepted(resnet18):
  model, variables = resnet18
  out = embed(model, variables, jnp.zeros((2, 64, 64, 3), jnp.bfloat16))
  assert out.dtype == jnp.float32 and out.shape == (2, 512)


# ------------------------------------------------------------- feature maps

def test_resnet_feature_maps(resnet18):
  model, variables = resnet18
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  rep, features = jax.jit(functools.partial(apply_with_features, model))(variables, images)
  assert set(features) == set(model.feature_names)
  assert features['stem'].shape == (2, 16, 16, 64)
  assert features['layer4'].shape == (2, 2, 2, 512)
  np.testing.assert_allclose(rep, features['layer4'].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # Two compiled programs of the same float32 math: equal up to rounding (once 2.7e-6
  # relative on a value of 6e-4), not bit for bit.
  np.testing.assert_allclose(rep, embed(model, variables, images), rtol=1e-5, atol=1e-6)


def test_gradients_reach_feature_maps_through_perturbations(resnet18):
  """The Grad-CAM hook: d(sum of features)/d(layer4) through 'perturbations'."""
  model, variables = resnet18
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  _, features = apply_with_features(model, variables, images)
  zeros = {name: jnp.zeros_like(value) for name, value in features.items()}
  grads = jax.jit(jax.grad(
      lambda p: model.apply({**variables, 'perturbations': p}, images).sum()))(zeros)
  # rep = mean over the 2x2 positions of layer4 -> gradient 1/4 everywhere.
  np.testing.assert_allclose(grads['layer4'], np.full((2, 2, 2, 512), 0.25), rtol=1e-6)
  assert float(jnp.abs(grads['stem']).sum()) > 0


def test_vit_feature_tokens(tiny_vit):
  model, variables = tiny_vit
  images = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  rep, features = apply_with_features(model, variables, images)
  assert set(features) == {'embedding', 'block0', 'block1'} == set(model.feature_names)
  assert features['block1'].shape == (2, 1 + 16, 64)
  assert rep.shape == (2, 64)


def test_init_variables_hold_only_model_state(tiny_vit):
  model = build_model('resnet18', stem='cifar')
  variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  assert set(variables) == {'params', 'batch_stats'}
  shapes = abstract_variables(model, (1, 32, 32, 3))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
  # torchvision's BatchNorm start: scale 1, bias 0, mean 0, var 1.
  np.testing.assert_array_equal(variables['batch_stats']['bn1']['var'], np.ones(64))
  assert set(init_variables(tiny_vit[0], jax.random.key(0))) == {'params'}


def test_vit_heads_are_visible_in_parameter_shapes():
  six = abstract_variables(build_model('vit_small', num_heads=6))
  twelve = abstract_variables(build_model('vit_small', num_heads=12))
  assert six['params']['blocks_0']['attn']['query']['kernel'].shape == (384, 6, 64)
  assert twelve['params']['blocks_0']['attn']['query']['kernel'].shape == (384, 12, 32)


def test_torch_batchnorm_conventions():
  model = build_model('resnet50')
  # Flax's momentum weighs the old statistic: 0.9 is PyTorch's momentum=0.1.
  assert model.bn_momentum == 0.9 and model.bn_epsilon == 1e-5


# ------------------------------------------------------------ architectures

def _reference_parameter_count(arch):
  """Backbone parameters (no classifier) of the torchvision / timm model."""
  import timm  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  resnet = torchvision.models.resnet
  if arch == 'resnet200':
    reference = resnet.ResNet(resnet.Bottleneck, [3, 24, 36, 3])
  elif arch.startswith('vit'):
    reference = timm.create_model(f'{arch}_patch16_224', pretrained=False, num_classes=0)
  else:
    reference = getattr(torchvision.models, arch)()
  return sum(p.numel() for name, p in reference.named_parameters()
             if not name.startswith('fc.'))


@pytest.mark.parametrize('arch,features', [
    ('resnet18', 512), ('resnet34', 512), ('resnet50', 2048), ('resnet101', 2048),
    ('resnet152', 2048), ('resnet200', 2048), ('wide_resnet50_2', 2048),
    ('vit_small', 384), ('vit_base', 768)])
def test_architecture_sizes_match_the_references(arch, features):
  model = build_model(arch)
  assert model.num_features == features
  params = abstract_variables(model)['params']
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert n_params == _reference_parameter_count(arch)


def test_width_multiplier_scales_every_channel():
  model = build_model('resnet50', width_multiplier=2)
  params = abstract_variables(model)['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 128)
  assert params['layer1_0']['conv1']['kernel'].shape == (1, 1, 128, 128)
  assert params['layer4_2']['conv3']['kernel'].shape == (1, 1, 1024, 4096)
  wide = abstract_variables(build_model('wide_resnet50_2'))['params']
  assert wide['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert wide['layer1_0']['conv2']['kernel'].shape == (3, 3, 128, 128)


@pytest.mark.parametrize('arch,options,message', [
    ('resnet51', {}, r"Unknown architecture 'resnet51'.*Did you mean 'resnet50'"),
    ('resnet50', {'padding': 'same'}, r"Invalid option.*conv_padding"),
    ('resnet50', {'conv_padding': 'same'}, r"conv_padding must be one of"),
    ('resnet50', {'stem': 'deep'}, r"stem must be"),
    ('resnet18', {'width_per_group': 128}, r'only for bottleneck'),
    ('vit_small', {'num_heads': 5}, r'not divisible by num_heads 5'),
    ('vit_small', {'pos_embed_interpolation': 'bilinear'}, r"pos_embed_interpolation"),
])
def test_bad_architecture_options(arch, options, message):
  with pytest.raises((ValueError, TypeError), match=message):
    build_model(arch, **options)


# ------------------------------------------------------------------ registry

def test_registry_covers_the_eight_methods():
  methods = {spec.method for spec in list_models()}
  assert methods == {'simclr', 'swav', 'moco', 'mocov3', 'byol', 'dino', 'simsiam',
                     'vicreg', 'barlowtwins'}
  for model_id in ['swav-r50-800ep', 'dino-vits16', 'mocov3-vits-300ep', 'byol-r50x1',
                   'simclr-v1-r50x1', 'simclr-v2-r50x1-sk0']:
    assert get_model_spec(model_id).supported


def test_registry_entries_build_with_their_architecture_options():
  for spec in list_models():
    assert spec.url.startswith('https://'), spec.id
    if not spec.supported:
      assert 'not implemented' in spec.reason
      with pytest.raises(NotImplementedError, match=spec.id):
        spec.build()
      continue
    model = spec.build()
    assert model.num_features >= 384
  assert get_model_spec('dino-vits16').build().num_heads == 6
  assert get_model_spec('mocov3-vits-300ep').build().num_heads == 12
  byol = get_model_spec('byol-r50x1').build()
  assert (byol.conv_padding, byol.pool_padding) == ('tf_same', 'tf_same')
  simclr = get_model_spec('simclr-v1-r50x1').build()
  assert (simclr.conv_padding, simclr.pool_padding) == ('torch', 'tf_same')
  assert get_model_spec('swav-r50w2-400ep').build().num_features == 4096
  assert get_model_spec('swav-r50-800ep').preprocessing.std[0] == 0.228
  assert get_model_spec('simclr-v2-r50x1-sk0').preprocessing.mean is None


def test_unknown_model_id_suggests_close_ones():
  with pytest.raises(KeyError, match=r"dino-vits16"):
    get_model_spec('dino-vit16')
  with pytest.raises(ValueError, match='Unknown method'):
    list_models('mae')


def test_preprocessing_normalize():
  pre = get_model_spec('dino-vits16').preprocessing
  images = np.full((1, 2, 2, 3), 0.5, np.float32)
  np.testing.assert_allclose(pre.normalize(images)[0, 0, 0],
                             (0.5 - np.array(pre.mean)) / np.array(pre.std), rtol=1e-6)
  simclr = get_model_spec('simclr-v1-r50x1').preprocessing
  assert simclr.normalize(images) is images


def test_all_architectures_listed():
  assert set(ARCHITECTURES) >= {'resnet18', 'resnet50', 'resnet200', 'vit_small', 'vit_base'}
  assert models.STATE_COLLECTIONS == ('params', 'batch_stats')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_cpu_training_speedups_change_no_value(arch, monkeypatch):
  """The CPU-only materialization hint and the fast max-pool gradient leave the
  training-mode outputs, BatchNorm updates and gradients exactly as they were."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import resnet  # pylint: disable=import-outside-toplevel
  model = models.build_model(arch, width_multiplier=0.25)
  variables = models.init_variables(model, jax.random.key(0), (4, 32, 32, 3))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

  def loss_and_grads(variables, images):
    def loss(params):
      out, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 images, train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out)), (out, updates)
    return jax.grad(loss, has_aux=True)(variables['params'])

  fast = jax.jit(loss_and_grads)(variables, images)
  monkeypatch.setattr(resnet, '_materialized', lambda x, one: x)
  monkeypatch.setattr(resnet, 'max_pool', nn.max_pool)
  plain = jax.jit(loss_and_grads)(variables, images)
  # Overlapping pooling windows sum their gradients in another order: float tolerance.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, plain)


def test_top_level_names_are_the_functions_not_submodules():
  # `import qscore_jax.embed` (the submodule) once shadowed the jitted `qscore_jax.embed`.
  import types  # pylint: disable=import-outside-toplevel
  import qscore_jax  # pylint: disable=import-outside-toplevel
  import qscore_jax.embed  # noqa: F401  pylint: disable=import-outside-toplevel,redefined-outer-name
  from qscore_jax import models  # pylint: disable=import-outside-toplevel
  assert qscore_jax.embed is models.embed
  modules = [n for n in qscore_jax.__all__ if isinstance(getattr(qscore_jax, n), types.ModuleType)]
  assert modules == ['models']

"""Flax ViT against timm (and DINO's interpolation) with random weights.

ViT-S/16 with 6 heads (DINO) and 12 heads (MoCo v3): class-token
representation max relative error <= 1e-4 at 224x224 and at 225x193, where the
position embedding is resampled to a 14x12 grid (timm's way, or DINO's), and at
further sizes.
A model built with the wrong head count must fail the same comparison.
test_registry_backbone_parity does the same for every other ViT configuration of the
registry (ViT-S/8, ViT-B/16, ViT-B/8) at its real size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from qscore_jax.convert.layout import vit_from_torch
from qscore_jax.models import build_model
from qscore_jax.models.vit import Mlp, resample_pos_embed, torch_bicubic_matrix
from parity_cases import COVERED_ELSEWHERE, SLOW, registry_configurations
from reference_models import (dino_forward, max_relative_error, randomize_,
                              state_dict_numpy)

TOLERANCE = 1e-4


def _timm_vit(num_heads, seed, depth=12):
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=224, patch_size=16, embed_dim=384, depth=depth, num_heads=num_heads,
      qkv_bias=True, num_classes=0, dynamic_img_size=True)
  assert model.norm.eps == 1e-6
  return randomize_(model, seed, attention_scale=1.5)


def _images(height, width, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def _torch_nchw(images):
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _flax(num_heads, state, images, interpolation='timm'):
  model = build_model('vit_small', patch_size=16, num_heads=num_heads,
                      pos_embed_interpolation=interpolation)
  variables = vit_from_torch(state, num_heads=num_heads)
  return np.asarray(jax.jit(model.apply)(variables, images))


@pytest.fixture(scope='module', params=[6, 12], ids=['6heads', '12heads'])
def reference(request):
  return request.param, _timm_vit(request.param, seed=request.param)


@pytest.mark.parametrize('size', [(224, 224), (225, 193), (256, 160)])
def test_timm_parity(reference, size):
  """timm resamples pos_embed to the new grid. timm refuses sizes that are not
  a multiple of the patch (unless it zero-pads them); like DINO's patch conv,
  ours ignores the remainder rows/columns, so timm sees the cropped image."""
  num_heads, model = reference
  images = _images(*size)
  height, width = size[0] // 16 * 16, size[1] // 16 * 16
  with torch.no_grad():
    expected = model(_torch_nchw(images[:, :height, :width])).numpy()
  actual = _flax(num_heads, state_dict_numpy(model), images, 'timm')
  assert actual.shape == expected.shape == (2, 384)
  assert max_relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize('size', [(224, 224), (225, 193), (160, 320)])
def test_dino_interpolation_parity(reference, size):
  num_heads, model = reference
  images = _images(*size)
  with torch.no_grad():
    expected = dino_forward(model, _torch_nchw(images)).numpy()
  actual = _flax(num_heads, state_dict_numpy(model), images, 'dino')
  assert max_relative_error(actual, expected) < TOLERANCE


def test_wrong_head_count_fails_the_comparison(reference):
  num_heads, model = reference
  images = _images(224, 224)
  with torch.no_grad():
    expected = model(_torch_nchw(images)).numpy()
  wrong = 12 if num_heads == 6 else 6
  actual = _flax(wrong, state_dict_numpy(model), images)
  assert max_relative_error(actual, expected) > 100 * TOLERANCE


# timm's vit_small_* / vit_base_* (timm.models.vision_transformer): embed dim, depth 12.
EMBED_DIM = {'vit_small': 384, 'vit_base': 768}
_VITS = {key: config for key, config in registry_configurations('vit').items()
         if key not in COVERED_ELSEWHERE}


@pytest.mark.parametrize('arch,options', [
    pytest.param(*config, id=key, marks=[pytest.mark.slow] if key in SLOW else [])
    for key, config in _VITS.items()])
def test_registry_backbone_parity(arch, options):
  """Every ViT configuration of the registry (real embed dim, depth, heads and patch) equals a
  timm VisionTransformer at 224x224 and at 225x193, where the position embedding is resampled
  as the row's model does it (timm's way, or DINO's: then against DINO's forward). Batch 1;
  the tests above check batches of 2 with the same code."""
  unknown = set(options) - {'patch_size', 'num_heads', 'pos_embed_interpolation'}
  assert not unknown, f'no timm reference for the options {unknown}: add one'
  patch, num_heads = options['patch_size'], options['num_heads']
  interpolation = options.get('pos_embed_interpolation', 'timm')
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=224, patch_size=patch, embed_dim=EMBED_DIM[arch], depth=12,
      num_heads=num_heads, qkv_bias=True, num_classes=0, dynamic_img_size=True)
  randomize_(reference, seed=patch + num_heads + (interpolation == 'dino'), attention_scale=1.5)
  variables = vit_from_torch(state_dict_numpy(reference), num_heads=num_heads)
  model = build_model(arch, **options)
  errors = []
  for size in [(224, 224), (225, 193)]:
    images = _images(*size, batch=1)
    with torch.no_grad():
      if interpolation == 'dino':
        expected = dino_forward(reference, _torch_nchw(images)).numpy()
      else:  # timm sees the image cropped to whole patches (see test_timm_parity)
        height, width = size[0] // patch * patch, size[1] // patch * patch
        expected = reference(_torch_nchw(images[:, :height, :width])).numpy()
    actual = np.asarray(jax.jit(model.apply)(variables, images))
    assert actual.shape == expected.shape == (1, EMBED_DIM[arch])
    errors.append(max_relative_error(actual, expected))
    assert errors[-1] < TOLERANCE, (size, errors[-1])
  print(f'{arch} {options}: max relative error {max(errors):.2e}')


def test_intermediate_tokens_match_timm():
  model = _timm_vit(6, seed=3, depth=3)
  images = _images(224, 224)
  with torch.no_grad():
    expected = model.forward_intermediates(_torch_nchw(images), indices=3,
                                           norm=False, intermediates_only=True,
                                           output_fmt='NLC')
  flax_model = build_model('vit_small', num_heads=6, depth=3)
  _, features = jax.jit(lambda v, x: flax_model.apply(v, x, mutable=['intermediates']))(
      vit_from_torch(state_dict_numpy(model), num_heads=6), images)
  for i in range(3):
    # timm drops the class token from NLC intermediates; ours keep it first.
    tokens = np.asarray(features['intermediates'][f'block{i}'][0])[:, 1:]
    assert max_relative_error(tokens, expected[i].numpy()) < TOLERANCE


def test_exact_gelu_matches_timm_mlp_and_tanh_does_not():
  mlp = randomize_(timm.layers.Mlp(64, 256), seed=4)
  x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 2
  with torch.no_grad():
    expected = mlp(torch.from_numpy(x)).numpy()
  state = state_dict_numpy(mlp)
  params = {'params': {name: {'kernel': state[f'{name}.weight'].T,
                              'bias': state[f'{name}.bias']} for name in ('fc1', 'fc2')}}
  actual = np.asarray(Mlp(256, 64, jnp.float32).apply(params, x))
  assert np.max(np.abs(actual - expected)) < 1e-5
  # The same MLP with Flax's default tanh-approximate GELU is visibly off.
  fc1, fc2 = params['params']['fc1'], params['params']['fc2']
  hidden = jax.nn.gelu(x @ fc1['kernel'] + fc1['bias'], approximate=True)
  approx = np.asarray(hidden @ fc2['kernel'] + fc2['bias'])
  assert np.max(np.abs(approx - expected)) > 1e-4


@pytest.mark.parametrize('in_size,out_size', [(14, 12), (14, 20), (14, 7), (7, 14)])
def test_dino_bicubic_matrix_equals_torch_interpolate(in_size, out_size):
  grid = np.random.default_rng(1).standard_normal((1, 3, in_size, in_size)).astype(np.float64)
  scale = (out_size + 0.1) / in_size
  expected = F.interpolate(torch.from_numpy(grid), scale_factor=(scale, scale),
                           mode='bicubic').numpy()[0]
  matrix = torch_bicubic_matrix(in_size, out_size, scale)
  actual = np.einsum('hi,wj,cij->chw', matrix, matrix, grid[0])
  np.testing.assert_allclose(actual, expected, atol=1e-10)


@pytest.mark.parametrize('new_hw', [(14, 12), (20, 10), (7, 7), (28, 28)])
def test_timm_resample_equals_antialiased_torch_bicubic(new_hw):
  grid = np.random.default_rng(2).standard_normal((14, 14, 5)).astype(np.float32)
  expected = timm.layers.resample_abs_pos_embed(
      torch.from_numpy(grid.reshape(1, 196, 5)), new_size=list(new_hw),
      num_prefix_tokens=0).numpy().reshape(*new_hw, 5)
  actual = np.asarray(resample_pos_embed(jnp.asarray(grid), new_hw, mode='timm'))
  np.testing.assert_allclose(actual, expected, atol=1e-5)

"""PyTorch tensor layouts -> Flax variables for the qscore_jax backbones.

Input: a flat ``{name: array}`` with the torchvision ResNet names
(``conv1.weight``, ``layer2.0.downsample.1.running_var``) or the timm/DINO/MoCo v3
ViT names (``blocks.3.attn.qkv.weight``), *without* any method prefix.
Output: ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 numpy
arrays, ready for ``model.apply``.

Transforms: conv OIHW -> HWIO, linear (out, in) -> (in, out),
BatchNorm weight/bias/running_mean/running_var -> scale/bias and
batch_stats mean/var, ``num_batches_tracked`` dropped, fused qkv split into
per-head query/key/value kernels (D, H, D/H).

Every input key must be consumed; anything left over is an error, so a wrong
prefix can never load silently nothing.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'),
              'running_var': ('batch_stats', 'var')}


class LayoutError(ValueError):
  """A state dict does not have the layout of the target backbone."""


def _set(tree: dict, collection: str, path: tuple[str, ...], value: np.ndarray) -> None:
  node = tree.setdefault(collection, {})
  for part in path[:-1]:
    node = node.setdefault(part, {})
  if path[-1] in node:
    raise LayoutError(f'{collection}/{"/".join(path)} would be filled twice.')
  node[path[-1]] = value


def _f32(array: Any) -> np.ndarray:
  return np.asarray(array, dtype=np.float32)


def _check_consumed(state: Mapping[str, Any], used: set[str], what: str) -> None:
  left = sorted(set(state) - used)
  if left:
    raise LayoutError(f'{len(left)} keys of the state dict are not part of a {what}: '
                      f'{left[:12]}{" ..." if len(left) > 12 else ""}')


def resnet_from_torch(state: Mapping[str, Any]) -> dict[str, Any]:
  """torchvision-named ResNet state dict -> Flax variables of :class:`ResNet`.

  ``fc.*`` (a classifier) is not part of the backbone and must be removed by
  the caller; it is reported like any other unknown key.
  """
  variables: dict[str, Any] = {}
  used = set()
  module_re = re.compile(r'^(conv1|bn1|layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01]))$')
  for key, value in state.items():
    module, _, leaf = key.rpartition('.')
    match = module_re.match(module)
    if not match:
      continue
    if match.group(2):
      block = f'layer{match.group(2)}_{match.group(3)}'
      inner = {'downsample.0': 'downsample_conv', 'downsample.1': 'downsample_bn'
               }.get(match.group(4), match.group(4))
      path = (block, inner)
    else:
      path = (module,)
    is_conv = path[-1].startswith('conv') or path[-1] == 'downsample_conv'
    if is_conv:
      if leaf != 'weight' or np.ndim(value) != 4:
        continue
      _set(variables, 'params', path + ('kernel',), _f32(value).transpose(2, 3, 1, 0))
    elif leaf == 'num_batches_tracked':
      pass  # an int64 step counter, not model state
    elif leaf in _BN_LEAVES:
      collection, name = _BN_LEAVES[leaf]
      _set(variables, collection, path + (name,), _f32(value))
    else:
      continue
    used.add(key)
  _check_consumed(state, used, 'torchvision-layout ResNet backbone')
  return variables


def vit_from_torch(state: Mapping[str, Any], num_heads: int) -> dict[str, Any]:
  """timm/DINO/MoCo v3-named ViT state dict -> Flax variables of :class:`VisionTransformer`.

  ``num_heads`` decides how the fused qkv rows are split into heads; the
  weights cannot tell (DINO ViT-S: 6, MoCo v3 ViT-S: 12).
  """
  params: dict[str, Any] = {}
  used = set()

  def put(path, value, *keys):
    _set({'params': params}, 'params', path, value)
    used.update(keys)

  def linear(prefix, path):
    put(path + ('kernel',), _f32(state[prefix + '.weight']).T, prefix + '.weight')
    put(path + ('bias',), _f32(state[prefix + '.bias']), prefix + '.bias')

  def layer_norm(prefix, path):
    put(path + ('scale',), _f32(state[prefix + '.weight']), prefix + '.weight')
    put(path + ('bias',), _f32(state[prefix + '.bias']), prefix + '.bias')

  try:
    dim = state['cls_token'].shape[-1]
    put(('cls_token',), _f32(state['cls_token']), 'cls_token')
    put(('pos_embed',), _f32(state['pos_embed']), 'pos_embed')
    put(('patch_embed', 'kernel'),
        _f32(state['patch_embed.proj.weight']).transpose(2, 3, 1, 0),
        'patch_embed.proj.weight')
    put(('patch_embed', 'bias'), _f32(state['patch_embed.proj.bias']),
        'patch_embed.proj.bias')
    if dim % num_heads:
      raise LayoutError(f'embed dim {dim} is not divisible by num_heads={num_heads}.')
    head_dim = dim // num_heads
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    for i in range(depth):
      p, block = f'blocks.{i}', f'blocks_{i}'
      layer_norm(f'{p}.norm1', (block, 'norm1'))
      layer_norm(f'{p}.norm2', (block, 'norm2'))
      qkv_w = _f32(state[f'{p}.attn.qkv.weight'])  # rows [q; k; v], head-major
      qkv_b = _f32(state[f'{p}.attn.qkv.bias'])
      for index, name in enumerate(('query', 'key', 'value')):
        rows = slice(index * dim, (index + 1) * dim)
        put((block, 'attn', name, 'kernel'),
            qkv_w[rows].T.reshape(dim, num_heads, head_dim))
        put((block, 'attn', name, 'bias'), qkv_b[rows].reshape(num_heads, head_dim))
      used.update({f'{p}.attn.qkv.weight', f'{p}.attn.qkv.bias'})
      put((block, 'attn', 'out', 'kernel'),
          _f32(state[f'{p}.attn.proj.weight']).T.reshape(num_heads, head_dim, dim),
          f'{p}.attn.proj.weight')
      put((block, 'attn', 'out', 'bias'), _f32(state[f'{p}.attn.proj.bias']),
          f'{p}.attn.proj.bias')
      linear(f'{p}.mlp.fc1', (block, 'mlp', 'fc1'))
      linear(f'{p}.mlp.fc2', (block, 'mlp', 'fc2'))
    layer_norm('norm', ('norm',))
  except KeyError as error:
    raise LayoutError(f'ViT state dict lacks {error.args[0]!r}.') from None
  _check_consumed(state, used, 'timm-layout ViT backbone')
  return {'params': params}

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

from qscore_jax.models.heads import HeadLayer, HeadSpec

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

  SimCLR v2's selective-kernel nets (``ResNet(sk_ratio > 0)``) have no
  torchvision names; this module names their extra parts in the same style:
  the ResNet-D stem ``stem.conv1``..``stem.conv3`` / ``stem.bn1``..``stem.bn3``
  (-> ``stem_conv1`` ...), and per block the two-stream 3x3 ``conv2``/``bn2``
  and the mixing branch ``sk_conv1``, ``sk_bn1``, ``sk_conv2`` (-> e.g.
  ``layer2_0/sk_conv1``); the ResNet-D shortcut's 1x1 conv and BN keep
  ``downsample.0``/``downsample.1`` (its average pool has no parameters).

  Args:
    state: ``{torchvision name: array}`` with PyTorch layouts (OIHW kernels).
  Returns:
    ``{'params', 'batch_stats'}`` with float32 NumPy arrays (HWIO kernels).
  Raises:
    LayoutError: a key that is not part of a ResNet, or a parameter filled twice.
  """
  variables: dict[str, Any] = {}
  used = set()
  module_re = re.compile(r'^(conv1|bn1|stem\.(?:conv|bn)[123]|'
                         r'layer(\d)\.(\d+)\.((?:sk_)?conv\d|(?:sk_)?bn\d|downsample\.[01]))$')
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
      path = (module.replace('.', '_'),)
    is_conv = (path[-1].startswith(('conv', 'sk_conv', 'stem_conv'))
               or path[-1] == 'downsample_conv')
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

  Args:
    state: ``{timm name: array}`` of the backbone.
    num_heads: the attention head count of the target model.
  Returns:
    ``{'params'}`` with float32 NumPy arrays.
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


def _fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """``torch.nn.utils.weight_norm`` (dim=0) of a Linear: w = g * v / ||v|| per output row."""
  v = np.asarray(v, np.float64)
  norm = np.linalg.norm(v.reshape(v.shape[0], -1), axis=1).reshape((-1,) + (1,) * (v.ndim - 1))
  return (np.asarray(g, np.float64).reshape(norm.shape) * v / norm).astype(np.float32)


def mlp_head_from_torch(state: Mapping[str, Any], *, activation: str | None = 'relu',
                        normalize_input: bool = False):
  """A ``torch.nn.Sequential`` MLP state dict -> (:class:`HeadSpec`, Flax variables).

  ``state`` holds the Sequential's keys without its prefix (``'0.weight'``,
  ``'1.running_mean'``, ...; a bare Linear may use ``'weight'``/``'bias'``).
  The structure is read off the keys: a module with ``running_mean`` is a
  BatchNorm1d (affine, scale-only or statistics-only by which of
  ``weight``/``bias`` exist), any other is a Linear (with or without bias,
  weight-norm ``weight_g``/``weight_v`` folded). A gap in the indices is a
  parameter-free activation (``activation``: ReLU for every release but
  DINO's GELU head). Every key must be consumed.

  Args:
    state: the Sequential's state dict (see above).
    activation: the activation of the gaps (default ``'relu'``; None for none).
    normalize_input: record that the head L2-normalises its input (SwAV
      prototypes, DINO's last layer).
  Returns:
    ``(HeadSpec, {'params'[, 'batch_stats']})``.
  """
  modules: dict[int, dict[str, Any]] = {}
  for key, value in state.items():
    index, _, leaf = key.rpartition('.')
    if not index:
      index, leaf = '0', key  # a bare nn.Linear
    if not index.isdigit():
      raise LayoutError(f'head key {key!r} is not a torch.nn.Sequential entry.')
    modules.setdefault(int(index), {})[leaf] = value
  if not modules:
    raise LayoutError('empty head state dict.')

  layers, params, stats = [], {}, {}
  order = sorted(modules)
  for position, index in enumerate(order):
    leaves = modules[index]
    if 'running_mean' in leaves:  # BatchNorm after the previous linear
      if not layers or 'norm' in layers[-1]:
        raise LayoutError(f'head module {index} is a BatchNorm without a linear layer before it.')
      i = len(layers) - 1
      has_scale, has_shift = 'weight' in leaves, 'bias' in leaves
      layers[-1]['norm'] = ('batchnorm' if has_scale and has_shift else
                            'batchnorm_no_shift' if has_scale else
                            'batchnorm_no_affine' if not has_shift else None)
      if layers[-1]['norm'] is None:
        raise LayoutError(f'head BatchNorm {index} has a shift but no scale.')
      node = {}
      if has_scale:
        node['scale'] = _f32(leaves.pop('weight'))
      if has_shift:
        node['bias'] = _f32(leaves.pop('bias'))
      if node:
        params[f'norm_{i}'] = node
      stats[f'norm_{i}'] = {'mean': _f32(leaves.pop('running_mean')),
                            'var': _f32(leaves.pop('running_var'))}
      leaves.pop('num_batches_tracked', None)
    else:
      if 'weight_g' in leaves and 'weight_v' in leaves:
        weight = _fold_weight_norm(leaves.pop('weight_g'), leaves.pop('weight_v'))
      elif 'weight' in leaves:
        weight = _f32(leaves.pop('weight'))
      else:
        raise LayoutError(f'head module {index} has neither a weight nor BatchNorm '
                          f'statistics (keys {sorted(leaves)}).')
      if weight.ndim != 2:
        raise LayoutError(f'head module {index} weight has shape {weight.shape}; '
                          'a Linear weight is (out, in).')
      i = len(layers)
      node = {'kernel': weight.T.copy()}
      if 'bias' in leaves:
        node['bias'] = _f32(leaves.pop('bias'))
      params[f'dense_{i}'] = node
      layers.append({'features': weight.shape[0], 'use_bias': 'bias' in node})
    if leaves:
      raise LayoutError(f'head module {index} has unexpected keys {sorted(leaves)}.')
    # An index gap before the next module is a parameter-free activation.
    if position + 1 < len(order) and order[position + 1] > index + 1:
      layers[-1]['activation'] = activation
  spec = HeadSpec(tuple(HeadLayer(**layer) for layer in layers), normalize_input)
  variables = {'params': params}
  if stats:
    variables['batch_stats'] = stats
  return spec, variables

"""Synthesised checkpoint files in each method's exact published layout.

Each factory builds the method's reference networks in PyTorch (torchvision /
timm backbones, heads written as the official repositories define them) with
random weights and random BatchNorm statistics, writes a file laid out as the
release is (prefixes, wrappers, momentum encoders, queues, optimizer state,
extra heads), and returns a :class:`Synth` holding the reference outputs:
the pooled representation of a fixed batch and every head's output.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import pathlib
import pickle
import sys
import types
import warnings
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reference_models import randomize_, tf_same_resnet_

IMAGE_SIZE = 64


@dataclasses.dataclass
class Synth:
  path: pathlib.Path
  images: np.ndarray  # (N, H, W, 3), NHWC float32
  representation: np.ndarray  # (N, d)
  heads: dict[str, np.ndarray]  # head name -> output on the representation
  head_inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def images(size=IMAGE_SIZE, n=2, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def resnet(arch='resnet18', seed=0, width=1, cifar=False):
  """torchvision ResNet without fc, random weights and BN statistics."""
  if width == 1:
    model = getattr(torchvision.models, arch)()
  else:  # all channels widened, as SwAV/VICReg/SimCLR do
    bottleneck = torchvision.models.resnet.Bottleneck
    model = torchvision.models.ResNet(bottleneck, [3, 4, 6, 3])
    model.inplanes = 64 * width
    model.conv1 = nn.Conv2d(3, 64 * width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(64 * width)
    for stage, blocks in enumerate([3, 4, 6, 3]):
      setattr(model, f'layer{stage + 1}', model._make_layer(  # pylint: disable=protected-access
          bottleneck, 64 * width * 2**stage, blocks, stride=1 if stage == 0 else 2))
  if cifar:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool = nn.Identity()
  model.fc = nn.Identity()
  return randomize_(model, seed)


def vit(num_heads=6, seed=0, depth=2, embed_dim=384):
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
      qkv_bias=True, num_classes=0)
  return randomize_(model, seed, attention_scale=1.5)


def mlp(dims, *, bias=True, bn=True, last_bn=None, act=nn.ReLU, bias_last=None):
  """Sequential Linear[-BN]-act ... Linear[-BN(last_bn)] with torch's index layout."""
  layers = []
  for i in range(len(dims) - 1):
    last = i == len(dims) - 2
    layers.append(nn.Linear(dims[i], dims[i + 1],
                            bias=(bias_last if last and bias_last is not None else bias)))
    if not last:
      if bn:
        layers.append(nn.BatchNorm1d(dims[i + 1]))
      layers.append(act())
    elif last_bn is not None:
      layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn == 'affine'))
  return nn.Sequential(*layers)


def randomize_head_(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features))
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, nn.BatchNorm1d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
        m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
        if m.affine:
          m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
          m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
  return module.eval()


def _sd(module, prefix=''):
  return {prefix + k: v.clone() for k, v in module.state_dict().items()}


def _optimizer_state(module):
  params = [p for p in module.parameters()]
  opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
  for p in params:
    p.grad = torch.zeros_like(p)
  opt.step()
  for p in params:
    p.grad = None
  return opt.state_dict()


@torch.no_grad()
def _forward(backbone, x):
  return backbone(_nchw(x)).numpy()


@torch.no_grad()
def _head(head, h, normalize=False):
  h = torch.from_numpy(h)
  if normalize:
    h = F.normalize(h, dim=1)
  return head(h).numpy()


# --------------------------------------------------------------- factories

def swav(tmp: pathlib.Path, *, module_prefix=True, width=1) -> Synth:
  backbone = resnet('resnet50', seed=1, width=width)
  dim = 2048 * width
  projector = randomize_head_(mlp([dim, 256, 32]), 11)  # projection_head.{0,1,3}
  prototypes = randomize_head_(nn.Linear(32, 50, bias=False), 12)
  prefix = 'module.' if module_prefix else ''
  state = {**_sd(backbone, prefix), **_sd(projector, prefix + 'projection_head.'),
           prefix + 'prototypes.weight': prototypes.weight.detach().clone()}
  path = tmp / 'swav_800ep_pretrain.pth.tar'
  torch.save(state, path)
  x = images()
  rep = _forward(backbone, x)
  z = _head(projector, rep)
  return Synth(path, x, rep, {'projector': z, 'prototypes': _head(prototypes, z, True)},
               {'prototypes': z})


def moco(tmp: pathlib.Path, *, version=2, module_prefix=True) -> Synth:
  query, key = resnet('resnet50', seed=2), resnet('resnet50', seed=3)
  fc = (randomize_head_(nn.Sequential(nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 16)), 21)
        if version == 2 else randomize_head_(nn.Linear(2048, 16), 21))
  fc_k = randomize_head_(nn.Sequential(nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 16)), 22)
  prefix = 'module.' if module_prefix else ''
  state = {**_sd(query, prefix + 'encoder_q.'), **_sd(fc, prefix + 'encoder_q.fc.'),
           **_sd(key, prefix + 'encoder_k.'), **_sd(fc_k, prefix + 'encoder_k.fc.'),
           prefix + 'queue': torch.randn(16, 64), prefix + 'queue_ptr': torch.zeros(1, dtype=torch.long)}
  path = tmp / f'moco_v{version}_200ep_pretrain.pth.tar'
  torch.save({'epoch': 200, 'arch': 'resnet50', 'state_dict': state,
              'optimizer': _optimizer_state(nn.ModuleList([query, fc]))}, path)
  x = images()
  rep = _forward(query, x)
  return Synth(path, x, rep, {'projector': _head(fc, rep)})


def _mocov3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
  """MoCo v3's _build_mlp: Linear(no bias)-BN-ReLU ... Linear[-BN(affine=False)]."""
  layers = []
  for i in range(num_layers):
    dim1 = input_dim if i == 0 else mlp_dim
    dim2 = output_dim if i == num_layers - 1 else mlp_dim
    layers.append(nn.Linear(dim1, dim2, bias=False))
    if i < num_layers - 1:
      layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
    elif last_bn:
      layers.append(nn.BatchNorm1d(dim2, affine=False))
  return nn.Sequential(*layers)


def mocov3(tmp: pathlib.Path, *, kind='resnet') -> Synth:
  if kind == 'resnet':
    base, momentum = resnet('resnet50', seed=4), resnet('resnet50', seed=5)
    dim, head_name = 2048, 'fc.'
    projector = randomize_head_(_mocov3_mlp(2, dim, 64, 16), 31)
    predictor = randomize_head_(_mocov3_mlp(2, 16, 64, 16, last_bn=False), 32)
  else:
    base, momentum = vit(12, seed=4), vit(12, seed=5)
    dim, head_name = 384, 'head.'
    projector = randomize_head_(_mocov3_mlp(3, dim, 64, 16), 31)
    predictor = randomize_head_(_mocov3_mlp(2, 16, 64, 16), 32)
  state = {**_sd(base, 'module.base_encoder.'), **_sd(projector, 'module.base_encoder.' + head_name),
           **_sd(momentum, 'module.momentum_encoder.'),
           **_sd(projector, 'module.momentum_encoder.' + head_name),
           **_sd(predictor, 'module.predictor.')}
  path = tmp / ('r-50-300ep.pth.tar' if kind == 'resnet' else 'vit-s-300ep.pth.tar')
  torch.save({'epoch': 300, 'arch': 'resnet50' if kind == 'resnet' else 'vit_small',
              'state_dict': state, 'optimizer': _optimizer_state(predictor),
              'scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                         'growth_interval': 2000, '_growth_tracker': 0}}, path)
  x = images(224 if kind == 'vit' else IMAGE_SIZE)
  rep = _forward(base, x)
  z = _head(projector, rep)
  return Synth(path, x, rep, {'projector': z, 'predictor': _head(predictor, z)},
               {'predictor': z})


def _dino_head(in_dim, seed, out_dim=40, hidden=64, bottleneck=16):
  mlp_ = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                       nn.Linear(hidden, bottleneck))
  randomize_head_(mlp_, seed)
  with warnings.catch_warnings():  # DINO uses the (deprecated) weight_g/weight_v form
    warnings.simplefilter('ignore', FutureWarning)
    last = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
  with torch.no_grad():
    gen = torch.Generator().manual_seed(seed + 1)
    last.weight_v.copy_(torch.randn(last.weight_v.shape, generator=gen))
    last.weight_g.copy_(torch.rand(last.weight_g.shape, generator=gen) + 0.5)
  return mlp_.eval(), last.eval()


def dino(tmp: pathlib.Path, *, kind='vit', full=True, submodel='teacher') -> Synth:
  make = (lambda s: vit(6, seed=s)) if kind == 'vit' else (lambda s: resnet('resnet50', seed=s))
  teacher, student = make(6), make(7)
  dim = 384 if kind == 'vit' else 2048
  t_mlp, t_last = _dino_head(dim, 41)
  s_mlp, s_last = _dino_head(dim, 43)
  if full:
    t_prefix = 'backbone.' if kind == 'vit' else 'module.backbone.'  # ViT teacher not DDP-wrapped
    t_head = t_prefix.replace('backbone.', 'head.')
    t_state = {**_sd(teacher, t_prefix), **_sd(t_mlp, t_head + 'mlp.'),
               **_sd(t_last, t_head + 'last_layer.')}
    s_state = {**_sd(student, 'module.backbone.'), **_sd(s_mlp, 'module.head.mlp.'),
               **_sd(s_last, 'module.head.last_layer.')}
    obj = {'student': s_state, 'teacher': t_state, 'optimizer': _optimizer_state(s_mlp),
           'epoch': 100,
           'args': argparse.Namespace(arch='vit_small' if kind == 'vit' else 'resnet50',
                                      patch_size=16, out_dim=40, norm_last_layer=True,
                                      momentum_teacher=0.996, lr=0.0005, output_dir='.'),
           'dino_loss': {'center': torch.randn(1, 40)}}
    path = tmp / f'dino_{"deitsmall16" if kind == "vit" else "resnet50"}_pretrain_full_checkpoint.pth'
  else:
    obj = _sd(teacher)
    path = tmp / f'dino_{"deitsmall16" if kind == "vit" else "resnet50"}_pretrain.pth'
  torch.save(obj, path)
  x = images(224 if kind == 'vit' else IMAGE_SIZE)
  backbone, head_mlp, last = ((teacher, t_mlp, t_last) if submodel == 'teacher'
                              else (student, s_mlp, s_last))
  rep = _forward(backbone, x)
  heads = {}
  if full:
    z = _head(head_mlp, rep)
    heads = {'projector': z, 'prototypes': _head(last, z, True)}
  return Synth(path, x, rep, heads, {'prototypes': heads.get('projector')})


def simsiam(tmp: pathlib.Path) -> Synth:
  encoder = resnet('resnet50', seed=8)
  fc = nn.Sequential(nn.Linear(2048, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
                     nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
                     nn.Linear(64, 64), nn.BatchNorm1d(64, affine=False))
  predictor = nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16),
                            nn.ReLU(inplace=True), nn.Linear(16, 64))
  randomize_head_(fc, 51), randomize_head_(predictor, 52)
  state = {**_sd(encoder, 'module.encoder.'), **_sd(fc, 'module.encoder.fc.'),
           **_sd(predictor, 'module.predictor.')}
  path = tmp / 'checkpoint_0099.pth.tar'
  torch.save({'epoch': 100, 'arch': 'resnet50', 'state_dict': state,
              'optimizer': _optimizer_state(predictor)}, path)
  x = images()
  rep = _forward(encoder, x)
  z = _head(fc, rep)
  return Synth(path, x, rep, {'projector': z, 'predictor': _head(predictor, z)},
               {'predictor': z})


def vicreg_or_barlow(tmp: pathlib.Path, *, method='vicreg', full=True) -> Synth:
  backbone = resnet('resnet18', seed=9)
  if method == 'vicreg':
    projector = randomize_head_(mlp([512, 64, 64, 32], bias=True, bias_last=False), 61)
    bn = None
  else:
    projector = randomize_head_(mlp([512, 64, 64, 32], bias=False), 61)
    bn = randomize_head_(nn.BatchNorm1d(32, affine=False), 62)
  if full:
    model = {**_sd(backbone, 'module.backbone.'), **_sd(projector, 'module.projector.')}
    if bn is not None:
      model.update(_sd(bn, 'module.bn.'))
    obj = {'epoch': 1000, 'model': model, 'optimizer': _optimizer_state(projector)}
    path = tmp / ('resnet50_fullckpt.pth' if method == 'vicreg' else 'checkpoint.pth')
  else:
    obj = _sd(backbone)
    path = tmp / 'resnet50.pth'
  torch.save(obj, path)
  x = images()
  rep = _forward(backbone, x)
  heads = {}
  if full:
    z = _head(projector, rep)
    heads['projector'] = _head(bn, z) if bn is not None else z
  return Synth(path, x, rep, heads)


def solo(tmp: pathlib.Path, *, cifar=True, old_prefix=False, submodel='base') -> Synth:
  backbone, momentum = resnet('resnet18', seed=10, cifar=cifar), resnet('resnet18', seed=11, cifar=cifar)
  classifier = randomize_head_(nn.Linear(512, 10), 71)
  projector = randomize_head_(mlp([512, 64, 32]), 72)
  predictor = randomize_head_(mlp([32, 64, 32]), 73)
  m_projector = randomize_head_(mlp([512, 64, 32]), 74)
  name = 'encoder.' if old_prefix else 'backbone.'
  state = {**_sd(backbone, name), **_sd(momentum, 'momentum_' + name),
           **_sd(classifier, 'classifier.'), **_sd(projector, 'projector.'),
           **_sd(predictor, 'predictor.'), **_sd(m_projector, 'momentum_projector.'),
           'queue': torch.randn(2, 32, 16), 'queue_ptr': torch.zeros(1, dtype=torch.long)}
  ckpt = {'epoch': 399, 'global_step': 1000, 'pytorch-lightning_version': '1.9.5',
          'state_dict': state,
          'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': 400}}}},
          'callbacks': {'LearningRateMonitor': {'logging_interval': 'step'}},
          'optimizer_states': [_optimizer_state(classifier)],
          'lr_schedulers': [{'base_lrs': [0.3], 'last_epoch': 399, 'T_max': 400}],
          'hparams_name': 'kwargs',
          'hyper_parameters': {'method': 'byol', 'backbone': {'name': 'resnet18'}}}
  path = tmp / 'byol-cifar10-abc123-ep=399.ckpt'
  torch.save(ckpt, path)
  x = images(32)
  net, proj = (backbone, projector) if submodel == 'base' else (momentum, m_projector)
  rep = _forward(net, x)
  heads = {'projector': _head(proj, rep)}
  if submodel == 'base':
    heads['classifier'] = _head(classifier, rep)
    heads['predictor'] = _head(predictor, heads['projector'])
  return Synth(path, x, rep, heads, {'predictor': heads['projector']})


# ---------------------------------------------------------------- TF1 SimCLR

def _tf_save(prefix: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tensors[n] for n in names])


def _simclr_tf_names(model, prefix):
  """torchvision ResNet-50 -> SimCLR TF variables in TF creation order (shortcut first)."""
  from qscore_jax.convert.rules import resnet_creation_order  # pylint: disable=import-outside-toplevel
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  out = {}
  for n, conv in enumerate(resnet_creation_order((3, 4, 6, 3), 'bottleneck')):
    suffix = '' if n == 0 else f'_{n}'
    out[f'{prefix}base_model/conv2d{suffix}/kernel'] = state[f'{conv}.weight'].transpose(2, 3, 1, 0)
    bn = 'bn1' if conv == 'conv1' else (conv[:-1] + '1' if conv.endswith('downsample.0')
                                        else conv[:-5] + 'bn' + conv[-1])
    for tf_leaf, leaf in [('gamma', 'weight'), ('beta', 'bias'), ('moving_mean', 'running_mean'),
                          ('moving_variance', 'running_var')]:
      out[f'{prefix}base_model/batch_normalization{suffix}/{tf_leaf}'] = state[f'{bn}.{leaf}']
  return out


def simclr(tmp: pathlib.Path, *, version=2, zipped=False, submodel='base') -> Synth:
  """SimCLR TF1 checkpoint written by TensorFlow itself (SaveV2)."""
  base = tf_same_resnet_(resnet('resnet50', seed=12), convs=False, pool=True)
  ema = tf_same_resnet_(resnet('resnet50', seed=13), convs=False, pool=True)
  base_plain = resnet('resnet50', seed=12)  # same weights, torchvision names
  ema_plain = resnet('resnet50', seed=13)
  classifier = randomize_head_(nn.Linear(2048, 10), 81)
  # head_contrastive: nl_0, nl_1 = dense(no bias) + BN + relu; nl_2 = dense + BN(no beta).
  proj = nn.Sequential(nn.Linear(2048, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                       nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                       nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16))
  randomize_head_(proj, 82)
  with torch.no_grad():
    proj[7].bias.zero_()  # center=False: no beta in the file
  tensors = {**_simclr_tf_names(base_plain, ''), **_simclr_tf_names(ema_plain, 'ema_model/'),
             'global_step': np.int64(250228),
             'head_supervised/linear_layer/dense/kernel': classifier.weight.detach().numpy().T.copy(),
             'head_supervised/linear_layer/dense/bias': classifier.bias.detach().numpy()}
  if version == 2:
    for i, (lin, bn) in enumerate([(0, 1), (3, 4), (6, 7)]):
      p = f'head_contrastive/nl_{i}/'
      tensors[p + 'dense/kernel'] = proj[lin].weight.detach().numpy().T.copy()
      tensors[p + 'batch_normalization/gamma'] = proj[bn].weight.detach().numpy()
      if i < 2:
        tensors[p + 'batch_normalization/beta'] = proj[bn].bias.detach().numpy()
      tensors[p + 'batch_normalization/moving_mean'] = proj[bn].running_mean.numpy()
      tensors[p + 'batch_normalization/moving_variance'] = proj[bn].running_var.numpy()
  # Optimizer slots twin every trainable variable.
  for name in list(tensors):
    if name != 'global_step' and not name.endswith(('moving_mean', 'moving_variance')):
      tensors[name + '/Momentum'] = np.zeros_like(tensors[name])
  folder = tmp / 'ResNet50_1x'
  folder.mkdir(parents=True, exist_ok=True)
  prefix = folder / ('model.ckpt-225206' if version == 1 else 'model.ckpt-250228')
  _tf_save(prefix, tensors)
  (folder / 'checkpoint').write_text(f'model_checkpoint_path: "{prefix.name}"\n')
  path = prefix
  if zipped:
    import zipfile  # pylint: disable=import-outside-toplevel
    path = tmp / 'ResNet50_1x.zip'
    with zipfile.ZipFile(path, 'w') as archive:
      for file in folder.iterdir():
        archive.write(file, f'ResNet50_1x/{file.name}')
      archive.writestr('ResNet50_1x/hub/saved_model.pb', b'not a checkpoint')
  x = images()
  net = base if submodel == 'base' else ema
  rep = _forward(net, x)
  heads = {'classifier': _head(classifier, rep)} if submodel == 'base' else {}
  if version == 2 and submodel == 'base':
    heads['projector'] = _head(proj, rep)
  return Synth(path, x, rep, heads)


# ---------------------------------------------------------------- BYOL pickle

def _fake_modules():
  """Importable stand-ins for the classes BYOL's pickles reference by name."""
  byol = types.ModuleType('byol')
  experiment = types.ModuleType('byol.byol_experiment')
  utils = types.ModuleType('byol.utils')
  optimizers = types.ModuleType('byol.utils.optimizers')
  state_cls = collections.namedtuple(
      '_ByolExperimentState',
      ['online_params', 'target_params', 'online_state', 'target_state', 'opt_state'])
  state_cls.__module__ = 'byol.byol_experiment'
  experiment._ByolExperimentState = state_cls  # pylint: disable=protected-access
  lars = collections.namedtuple('LarsState', ['mu'])
  lars.__module__ = 'byol.utils.optimizers'
  optimizers.LarsState = lars
  haiku = types.ModuleType('haiku._src.data_structures')

  class FlatMapping(dict):  # 2020-era Haiku params container
    def __reduce__(self):
      return (FlatMapping, (dict(self),))
  FlatMapping.__module__ = 'haiku._src.data_structures'
  FlatMapping.__qualname__ = 'FlatMapping'
  haiku.FlatMapping = FlatMapping
  return {'byol': byol, 'byol.byol_experiment': experiment, 'byol.utils': utils,
          'byol.utils.optimizers': optimizers, 'haiku': types.ModuleType('haiku'),
          'haiku._src': types.ModuleType('haiku._src'), 'haiku._src.data_structures': haiku}


def _haiku_resnet(model, root='res_net50'):
  """torchvision ResNet-50 state -> Haiku params/state dicts of BYOL's ResNet."""
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, bn_state = {}, {}

  def conv(tv, hk):
    params[f'{root}/~/{hk}'] = {'w': state[f'{tv}.weight'].transpose(2, 3, 1, 0).copy()}

  def bnorm(tv, hk):
    c = state[f'{tv}.weight'].shape[0]
    params[f'{root}/~/{hk}'] = {'scale': state[f'{tv}.weight'].reshape(1, 1, 1, c),
                                'offset': state[f'{tv}.bias'].reshape(1, 1, 1, c)}
    for ema, leaf in (('mean_ema', 'running_mean'), ('var_ema', 'running_var')):
      value = state[f'{tv}.{leaf}'].reshape(1, 1, 1, c)
      bn_state[f'{root}/~/{hk}/~/{ema}'] = {'average': value, 'hidden': value.copy(),
                                            'counter': np.array(1000, np.int32)}

  conv('conv1', 'initial_conv')
  bnorm('bn1', 'initial_batchnorm')
  for g, blocks in enumerate([3, 4, 6, 3]):
    for b in range(blocks):
      base = f'block_group_{g}/~/block_{b}/~/'
      for k in range(3):
        conv(f'layer{g + 1}.{b}.conv{k + 1}', f'{base}conv_{k}')
        bnorm(f'layer{g + 1}.{b}.bn{k + 1}', f'{base}batchnorm_{k}')
      if b == 0:
        conv(f'layer{g + 1}.0.downsample.0', f'{base}shortcut_conv')
        bnorm(f'layer{g + 1}.0.downsample.1', f'{base}shortcut_batchnorm')
  return params, bn_state


def _haiku_mlp(seq, name, params, state):
  lin0, bn, lin1 = seq[0], seq[1], seq[3]
  params[f'{name}/~/linear'] = {'w': lin0.weight.detach().numpy().T.copy(),
                                'b': lin0.bias.detach().numpy()}
  params[f'{name}/~/batch_norm'] = {'scale': bn.weight.detach().numpy().reshape(1, -1),
                                    'offset': bn.bias.detach().numpy().reshape(1, -1)}
  for ema, value in (('mean_ema', bn.running_mean), ('var_ema', bn.running_var)):
    state[f'{name}/~/batch_norm/~/{ema}'] = {'average': value.numpy().reshape(1, -1),
                                             'hidden': value.numpy().reshape(1, -1),
                                             'counter': np.array(5, np.int32)}
  params[f'{name}/~/linear_1'] = {'w': lin1.weight.detach().numpy().T.copy()}


@contextlib.contextmanager
def modules_installed(modules: dict[str, types.ModuleType]):
  """``modules`` in sys.modules while a file naming their classes is pickled or loaded;
  whatever was there before is put back."""
  saved = {name: sys.modules.get(name) for name in modules}
  sys.modules.update(modules)
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def byol(tmp: pathlib.Path, *, submodel='online') -> Synth:
  online = tf_same_resnet_(resnet('resnet50', seed=14), convs=True, pool=True)
  target = tf_same_resnet_(resnet('resnet50', seed=15), convs=True, pool=True)
  nets = {'online': (resnet('resnet50', seed=14), online), 'target': (resnet('resnet50', seed=15), target)}
  heads_torch = {}
  experiment = {}
  modules = _fake_modules()
  for which, (plain, _) in nets.items():
    params, state = _haiku_resnet(plain)
    projector = randomize_head_(mlp([2048, 64, 16], bias_last=False), 91 if which == 'online' else 93)
    _haiku_mlp(projector, 'projector', params, state)
    heads = {'projector': projector}
    if which == 'online':
      predictor = randomize_head_(mlp([16, 64, 16], bias_last=False), 92)
      _haiku_mlp(predictor, 'predictor', params, state)
      classifier = randomize_head_(nn.Linear(2048, 10), 94)
      params['classifier'] = {'w': classifier.weight.detach().numpy().T.copy(),
                              'b': classifier.bias.detach().numpy()}
      heads.update(predictor=predictor, classifier=classifier)
    heads_torch[which] = heads
    flat = modules['haiku._src.data_structures'].FlatMapping
    experiment[f'{which}_params'] = flat(params)
    experiment[f'{which}_state'] = flat(state)
  lars = modules['byol.utils.optimizers'].LarsState(mu=experiment['online_params'])
  state_cls = modules['byol.byol_experiment']._ByolExperimentState  # pylint: disable=protected-access
  checkpoint = dict(experiment_state=state_cls(opt_state=lars, **experiment), step=312000,
                    rng=np.array([0, 42], np.uint32))
  path = tmp / 'pretrain_res50x1.pkl'
  with modules_installed(modules):
    with open(path, 'wb') as f:
      pickle.dump(checkpoint, f, protocol=2)
  x = images()
  # BYOL normalises inside its forward; the converted backbone takes normalised images,
  # so both sides get the same (already normalised) batch here.
  rep = _forward(nets[submodel][1], x)
  heads = heads_torch[submodel]
  out = {'projector': _head(heads['projector'], rep)}
  if submodel == 'online':
    out['predictor'] = _head(heads['predictor'], out['projector'])
    out['classifier'] = _head(heads['classifier'], rep)
  return Synth(path, x, rep, out, {'predictor': out['projector']})


FACTORIES: dict[str, Callable[..., Synth]] = {
    'swav': swav, 'moco': moco, 'mocov3': mocov3, 'dino': dino, 'simsiam': simsiam,
    'vicreg': vicreg_or_barlow, 'solo': solo, 'simclr': simclr, 'byol': byol,
}

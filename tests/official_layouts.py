"""Checkpoint files with the complete top-level structure the official code writes.

The factories of checkpoint_factories.py write each method's weights under the
keys the releases use, with a simplified wrapper. The factories here take the
same reference networks (so the same reference outputs) and rewrite the file
with every top-level entry the official training script saves: optimizer
states (empty, or real ones after a step, with the official param_groups),
learning-rate schedulers, AMP scaler states, argparse Namespaces, Lightning's
loops / callbacks / precision-plugin entries, and, where the official code
pickles them, references to functions or classes that ``torch.load(...,
weights_only=True)`` refuses.

Each factory's docstring names the official file and function it mirrors
(repository, commit of the snapshot read, line numbers at that commit).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import pickle
import sys
import types
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

import checkpoint_factories as factories

# torch.cuda.amp.GradScaler().state_dict() of an enabled scaler (torch/amp/grad_scaler.py
# state_dict): two floats and two ints. A disabled scaler (no CUDA) returns {}.
GRAD_SCALER_STATE = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                     'growth_interval': 2000, '_growth_tracker': 117}


def _load(path: pathlib.Path) -> Any:
  return torch.load(path, map_location='cpu', weights_only=False)


def _trainable(state: dict[str, torch.Tensor], exclude: Iterable[str] = ()) -> list[torch.Tensor]:
  """The tensors of a state_dict an optimizer would hold (parameters, not buffers)."""
  buffers = ('running_mean', 'running_var', 'num_batches_tracked')
  return [v for k, v in state.items()
          if v.is_floating_point() and not k.endswith(buffers) and not k.startswith(tuple(exclude))
          and not k.split('.')[-1] in ('queue', 'queue_ptr', 'center')]


class _MomentumOptimizer(torch.optim.Optimizer):
  """A LARS-like optimizer: ``defaults`` become the param-group keys, and the
  momentum buffer is kept under ``state[p][state_key]`` (``'mu'`` in the LARS of
  barlowtwins/vicreg/dino/moco-v3, ``'momentum_buffer'`` in solo-learn's LARS and
  torch's SGD)."""

  def __init__(self, params, state_key='mu', **defaults):
    self._state_key = state_key
    super().__init__(params, defaults)

  @torch.no_grad()
  def step(self, closure=None):
    for group in self.param_groups:
      for p in group['params']:
        if p.grad is not None:
          buf = self.state[p].setdefault(self._state_key, torch.zeros_like(p))
          buf.mul_(0.9).add_(p.grad)


def optimizer_state(kind: str, groups: list[dict], seed: int = 0, **defaults) -> dict:
  """``optimizer.state_dict()`` after one step on random gradients.

  Args:
    kind: 'sgd' | 'adamw' (torch's own) | 'momentum' (:class:`_MomentumOptimizer`).
    groups: param groups, each ``{'params': [tensors], **extra keys}``.
    seed: seed of the gradients.
    **defaults: the optimizer's constructor arguments (become param-group keys).
  """
  gen = torch.Generator().manual_seed(seed)
  param_groups = []
  for group in groups:
    params = [nn.Parameter(t.detach().clone().float()) for t in group['params']]
    for p in params:
      p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    param_groups.append({**group, 'params': params})
  cls = {'sgd': torch.optim.SGD, 'adamw': torch.optim.AdamW, 'momentum': _MomentumOptimizer}[kind]
  opt = cls(param_groups, **defaults)
  opt.step()
  return opt.state_dict()


@contextlib.contextmanager
def _module_global(module_name: str, name: str, obj):
  """Makes ``obj`` picklable as the global ``module_name.name`` (as a training
  script run as ``__main__`` or spawned as ``__mp_main__`` pickles its functions)."""
  module = sys.modules.get(module_name)
  created = module is None
  if created:
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module
  old = (obj.__module__, obj.__qualname__)
  obj.__module__, obj.__qualname__ = module_name, name
  had = hasattr(module, name)
  previous = getattr(module, name, None)
  setattr(module, name, obj)
  try:
    yield obj
  finally:
    obj.__module__, obj.__qualname__ = old
    if had:
      setattr(module, name, previous)
    else:
      delattr(module, name)
    if created:
      del sys.modules[module_name]


def exclude_bias_and_norm(p):  # barlowtwins main.py / vicreg main_vicreg.py
  return p.ndim == 1


class _LenientUnpickler(pickle.Unpickler):
  """Loads a file whose pickled globals are not importable here (a training
  script's function, a Lightning class) as placeholders: for inspecting tests."""

  def find_class(self, module, name):
    try:
      return super().find_class(module, name)
    except (ImportError, AttributeError):
      return type(name, (), {'__module__': module, '__init__': lambda self, *a, **k: None,
                             '__setstate__': lambda self, state: None})


_LENIENT_PICKLE = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load,
                                        __name__='lenient_pickle')


def load_top_level(path) -> set[str]:
  """The top-level keys of a torch file, whatever globals it references."""
  return {str(k) for k in torch.load(path, map_location='cpu', weights_only=False,
                                     pickle_module=_LENIENT_PICKLE)}


def rejected_by_weights_only(path) -> bool:
  """Whether ``torch.load(path, weights_only=True)`` refuses the file."""
  try:
    torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError:
    return True
  return False


# ------------------------------------------------------------------ SwAV

def swav_training(tmp: pathlib.Path, *, optimizer='sgd', amp=True) -> factories.Synth:
  """A SwAV *training* checkpoint (``checkpoint.pth.tar`` / ``ckp-<epoch>.pth``).

  Mirrors facebookresearch/swav ``main_swav.py`` ``main()`` (commit 04b8f43,
  "save checkpoints" at the end of the epoch loop): ``save_dict = {"epoch", "state_dict": model.state_dict()
  (DDP: module.*), "optimizer": optimizer.state_dict()}`` plus ``"amp":
  apex.amp.state_dict()`` when ``--use_fp16``. The optimizer is apex's
  ``LARC(SGD(momentum=0.9, weight_decay=wd))``, whose ``state_dict()`` is the
  wrapped SGD's. ``apex.amp.state_dict()`` (apex/amp/frontend.py
  ``state_dict``) is an OrderedDict ``{'loss_scaler0': {'loss_scale': float,
  'unskipped': int}}``. The released ``swav_*_pretrain.pth.tar`` files are the
  flat state_dict instead (see checkpoint_factories.swav). The queue is saved
  in a separate ``queue<rank>.pth``.
  """
  synth = factories.swav(tmp)
  state = _load(synth.path)
  opt = ({} if optimizer == 'empty' else optimizer_state(
      'sgd', [{'params': _trainable(state)}], lr=4.8, momentum=0.9, weight_decay=1e-6))
  obj = {'epoch': 800, 'state_dict': state, 'optimizer': opt}
  if amp:
    obj['amp'] = collections.OrderedDict(loss_scaler0={'loss_scale': 8192.0, 'unskipped': 412})
  path = tmp / 'checkpoint.pth.tar'
  torch.save(obj, path)
  synth.path.unlink()
  synth.path = path
  return synth


# ------------------------------------------------------------------ MoCo v1/v2

def moco_release(tmp: pathlib.Path, *, version=2, optimizer='sgd') -> factories.Synth:
  """MoCo v1/v2 ``moco_v{1,2}_*_pretrain.pth.tar``.

  Mirrors facebookresearch/moco ``main_moco.py`` ``main_worker()`` (commit
  010242b, ``save_checkpoint({...})`` at the end of the epoch loop):
  ``{"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict(),
  "optimizer": optimizer.state_dict()}`` with ``torch.optim.SGD(model.parameters(),
  lr, momentum=0.9, weight_decay=1e-4)``: one param group, ``momentum_buffer``
  for the query encoder's parameters (the key encoder has requires_grad=False
  but is in ``model.parameters()``: it has a group entry and no state).
  The released files "were cleaned up for transferring learning usage ...,
  with the solver states removed" (K. He in facebookresearch/moco#27), whether
  by deleting ``optimizer`` or emptying it is unverified: ``optimizer`` is
  'absent', 'empty' ({}) or 'sgd' (the training script's own state).
  """
  synth = factories.moco(tmp, version=version)
  obj = _load(synth.path)
  state = obj['state_dict']
  if optimizer in ('empty', 'absent'):
    obj['optimizer'] = {}
  else:
    obj['optimizer'] = optimizer_state(
        'sgd', [{'params': _trainable(state, ('module.encoder_k.',))}],
        lr=0.03, momentum=0.9, weight_decay=1e-4)
  obj['epoch'], obj['arch'] = 200, 'resnet50'
  keys = ('epoch', 'arch', 'state_dict') + (() if optimizer == 'absent' else ('optimizer',))
  torch.save({k: obj[k] for k in keys}, synth.path)
  return synth


# ------------------------------------------------------------------ MoCo v3

def mocov3_release(tmp: pathlib.Path, *, kind='resnet', optimizer='real') -> factories.Synth:
  """MoCo v3 ``r-50-*ep.pth.tar`` / ``vit-s-300ep.pth.tar``.

  Mirrors facebookresearch/moco-v3 ``main_moco.py`` ``main_worker()`` (commit
  c349e6e, ``save_checkpoint({...})`` at lines 310-316; optimizer lines 225-232): ``{'epoch', 'arch',
  'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
  'scaler': scaler.state_dict()}``; the optimizer is ``moco.optimizer.LARS``
  (``moco/optimizer.py``: defaults lr, weight_decay, momentum,
  trust_coefficient; state ``'mu'``) for ResNet-50 and AdamW for ViT; the
  scaler is ``torch.cuda.amp.GradScaler()``. The released ViT-S file lacks
  ``optimizer`` and ``scaler`` (facebookresearch/moco-v3#29: resuming from it
  fails on ``checkpoint['optimizer']``): ``optimizer='absent'``.
  """
  synth = factories.mocov3(tmp, kind=kind)
  obj = _load(synth.path)
  params = _trainable(obj['state_dict'], ('module.momentum_encoder.',))
  if optimizer in ('empty', 'absent'):
    obj['optimizer'] = {}
  elif kind == 'resnet':
    obj['optimizer'] = optimizer_state('momentum', [{'params': params}], lr=0.6, weight_decay=1e-6,
                                       momentum=0.9, trust_coefficient=0.001)
  else:
    obj['optimizer'] = optimizer_state('adamw', [{'params': params}], lr=1.5e-4, weight_decay=0.1)
  obj['scaler'] = dict(GRAD_SCALER_STATE)
  keys = ('epoch', 'arch', 'state_dict') + (() if optimizer == 'absent' else ('optimizer', 'scaler'))
  torch.save({k: obj[k] for k in keys}, synth.path)
  return synth


# ------------------------------------------------------------------ DINO

def dino_args(kind='vit') -> argparse.Namespace:
  """The ``args`` of facebookresearch/dino ``main_dino.py`` (commit 7c446df):
  every ``get_args_parser()`` option at its default (lines 38-128), after
  ``train_dino`` replaced deit by vit in ``args.arch`` and
  ``utils.init_distributed_mode`` set ``rank``, ``world_size``, ``gpu``."""
  return argparse.Namespace(
      arch='vit_small' if kind == 'vit' else 'resnet50', patch_size=16, out_dim=40,
      norm_last_layer=True, momentum_teacher=0.996, use_bn_in_head=False,
      warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
      use_fp16=True, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
      batch_size_per_gpu=64, epochs=100, freeze_last_layer=1, lr=0.0005, warmup_epochs=10,
      min_lr=1e-06, optimizer='adamw' if kind == 'vit' else 'lars', drop_path_rate=0.1,
      global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4),
      data_path='/path/to/imagenet/train/', output_dir='/checkpoint/dino/exp', saveckp_freq=20,
      seed=0, num_workers=10, dist_url='env://', local_rank=0, rank=0, world_size=16, gpu=0)


def dino_full_release(tmp: pathlib.Path, *, kind='vit', optimizer='real', fp16=True,
                      dino_loss=True, submodel='teacher') -> factories.Synth:
  """DINO ``dino_*_pretrain_full_checkpoint.pth``.

  Mirrors facebookresearch/dino ``main_dino.py`` ``train_dino()`` (commit
  7c446df, lines 278-290): ``save_dict = {'student': student.state_dict(),
  'teacher': teacher.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch':
  epoch + 1, 'args': args (argparse.Namespace), 'dino_loss':
  dino_loss.state_dict() ({'center': (1, out_dim)})}`` plus ``'fp16_scaler':
  fp16_scaler.state_dict()`` when ``--use_fp16`` (default True). The optimizer
  is built on ``utils.get_params_groups(student)`` (lines 632-643: two groups,
  the second with ``weight_decay: 0.``): AdamW for ViTs, ``utils.LARS`` (state
  ``'mu'``, defaults with ``weight_decay_filter``/``lars_adaptation_filter``
  None) for the ResNet-50. The full checkpoints first published had neither
  ``fp16_scaler`` nor ``dino_loss`` (facebookresearch/dino#40) and keys without
  the ``module.``/``backbone.`` prefixes (#65; re-saved by the maintainer in
  June 2021): ``dino_loss=False, fp16=False``.
  """
  synth = factories.dino(tmp, kind=kind, full=True, submodel=submodel)
  obj = _load(synth.path)
  student = obj['student']
  regularized = [v for k, v in student.items() if v.is_floating_point() and v.ndim > 1
                 and not k.endswith('.bias')]
  not_regularized = [v for k, v in student.items() if v.is_floating_point()
                     and (v.ndim <= 1 or k.endswith('.bias'))
                     and not k.endswith(('running_mean', 'running_var'))]
  groups = [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]
  if optimizer == 'empty':
    opt = {}
  elif kind == 'vit':
    opt = optimizer_state('adamw', groups)
  else:
    opt = optimizer_state('momentum', groups, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                          weight_decay_filter=None, lars_adaptation_filter=None)
  save = {'student': student, 'teacher': obj['teacher'], 'optimizer': opt, 'epoch': 100,
          'args': dino_args(kind)}
  if dino_loss:
    save['dino_loss'] = {'center': torch.randn(1, 40)}
  if fp16:
    save['fp16_scaler'] = dict(GRAD_SCALER_STATE)
  torch.save(save, synth.path)
  return synth


# ------------------------------------------------------------------ SimSiam

def simsiam_release(tmp: pathlib.Path, *, optimizer='real', fix_pred_lr=True) -> factories.Synth:
  """SimSiam ``checkpoint_0099.pth.tar``.

  Mirrors facebookresearch/simsiam ``main_simsiam.py`` ``main_worker()``
  (commit a7bc177, line 264): ``save_checkpoint({'epoch': epoch + 1, 'arch': args.arch,
  'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict()})``;
  ``torch.optim.SGD(optim_params, init_lr, momentum=0.9, weight_decay=1e-4)``
  where, with ``--fix-pred-lr`` (the README's command), ``optim_params`` is two
  groups ``{'params': encoder, 'fix_lr': False}``, ``{'params': predictor,
  'fix_lr': True}`` (lines 193-199).
  """
  synth = factories.simsiam(tmp)
  obj = _load(synth.path)
  state = obj['state_dict']
  if optimizer == 'empty':
    opt = {}
  else:
    encoder = _trainable({k: v for k, v in state.items() if k.startswith('module.encoder.')})
    predictor = _trainable({k: v for k, v in state.items() if k.startswith('module.predictor.')})
    groups = ([{'params': encoder, 'fix_lr': False}, {'params': predictor, 'fix_lr': True}]
              if fix_pred_lr else [{'params': encoder + predictor}])
    opt = optimizer_state('sgd', groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
  torch.save({'epoch': 100, 'arch': 'resnet50', 'state_dict': state, 'optimizer': opt}, synth.path)
  return synth


# ------------------------------------------------------------------ VICReg / Barlow Twins

def vicreg_or_barlow_release(tmp: pathlib.Path, *, method='vicreg', optimizer='real',
                             filters='function') -> factories.Synth:
  """VICReg ``resnet50_fullckpt.pth`` / Barlow Twins ``checkpoint.pth``.

  VICReg: facebookresearch/vicreg ``main_vicreg.py`` ``main()`` (commit
  4e12602, lines 109-114 and 157-162): ``state = dict(epoch=epoch + 1, model=model.state_dict(),
  optimizer=optimizer.state_dict())`` saved as ``model.pth``; ``LARS(
  model.parameters(), lr=0, weight_decay=args.wd,
  weight_decay_filter=exclude_bias_and_norm,
  lars_adaptation_filter=exclude_bias_and_norm)``: the two filters are the
  *function* ``exclude_bias_and_norm`` of the script, so every param group
  pickles a global reference to it, which ``torch.load(weights_only=True)``
  refuses: ``main_vicreg.exclude_bias_and_norm`` when launched by
  ``run_with_submitit.py`` (the README's 4-node, 1000-epoch ResNet-50 run),
  ``__main__.exclude_bias_and_norm`` under ``torch.distributed.launch``.

  Barlow Twins: facebookresearch/barlowtwins ``main.py`` ``main_worker()``:
  ``state = dict(epoch=epoch + 1, model=model.state_dict(),
  optimizer=optimizer.state_dict())``. Up to commit 046eec3 (2021-06; the
  code release f13c949 of 2021-03 included) the LARS gets
  ``weight_decay_filter=exclude_bias_and_norm`` (a function; the worker is
  started by ``torch.multiprocessing.spawn``, so it pickles as
  ``__mp_main__.exclude_bias_and_norm``); from 21149b4 ("filter as flag",
  2021-08) ``weight_decay_filter=True, lars_adaptation_filter=True`` (bools).
  Two param groups from 046eec3 on ([weights], [biases]); LARS state ``'mu'``.

  Args:
    filters: 'function' (the global reference) or 'flag' (Barlow Twins after 21149b4).
  """
  synth = factories.vicreg_or_barlow(tmp, method=method, full=True)
  obj = _load(synth.path)
  model = obj['model']
  params = _trainable(model)
  if optimizer == 'empty':
    opt = None
  elif method == 'vicreg':
    groups = [{'params': params}]
  else:
    groups = [{'params': [p for p in params if p.ndim != 1]},
              {'params': [p for p in params if p.ndim == 1]}]
  module = 'main_vicreg' if method == 'vicreg' else '__mp_main__'
  with _module_global(module, 'exclude_bias_and_norm', exclude_bias_and_norm) as fn:
    if optimizer != 'empty':
      filt = fn if filters == 'function' else True
      opt = optimizer_state('momentum', groups, lr=0, weight_decay=1e-6, momentum=0.9, eta=0.001,
                            weight_decay_filter=filt, lars_adaptation_filter=filt)
    torch.save({'epoch': 1000, 'model': model, 'optimizer': {} if opt is None else opt}, synth.path)
  return synth


# ------------------------------------------------------------------ BYOL

def _byol_optax_classes():
  """Stand-ins for the NamedTuples that optax.chain's state holds in BYOL."""
  def named(module, name, fields):
    cls = collections.namedtuple(name, fields)
    cls.__module__ = module
    return cls
  return {'AddWeightDecayState': named('byol.utils.optimizers', 'AddWeightDecayState', []),
          'ScaleByLarsState': named('byol.utils.optimizers', 'ScaleByLarsState', ['mu']),
          'ScaleState': named('optax._src.transform', 'ScaleState', [])}


def byol_release(tmp: pathlib.Path, *, opt_state='optax_chain', submodel='online') -> factories.Synth:
  """BYOL ``pretrain_res50x1.pkl``.

  Mirrors google-deepmind/deepmind-research ``byol/utils/checkpointing.py``
  ``Checkpointer.maybe_save_checkpoint`` (commit 500ffd8): ``dill.dump(dict(
  experiment_state=jax.tree_map(lambda x: jax.device_get(x[0]),
  experiment_state), step=step, rng=rng), protocol=2)``. ``experiment_state``
  is ``byol_experiment._ByolExperimentState(online_params, target_params,
  online_state, target_state, opt_state)``; in the published code
  (``byol/utils/optimizers.py``, commit 4822a45) ``LarsState = List`` and
  ``opt_state`` is the state of ``optax.chain(add_weight_decay,
  scale_by_lars, optax.scale)``: the tuple ``(AddWeightDecayState(),
  ScaleByLarsState(mu=<params tree>), ScaleState())``. ``device_get`` leaves
  numpy arrays; ``step`` is an int; ``rng`` is the jax PRNG key of
  ``main_loop.train_loop``, not device_get'd, but jax 0.2's
  ``DeviceArray.__reduce__`` forwards to its numpy value's
  (jax/interpreters/xla.py: ``__reduce__ = partialmethod(_forward_to_value,
  op.methodcaller("__reduce__"))``), so it pickles as a numpy uint32 (2,) array.

  Args:
    opt_state: 'optax_chain' (the published code) or 'lars_namedtuple' (the
      ``LarsState(mu=...)`` namedtuple of checkpoint_factories.byol).
  """
  synth = factories.byol(tmp, submodel=submodel)
  if opt_state == 'lars_namedtuple':
    return synth
  modules = factories._fake_modules()  # pylint: disable=protected-access
  optax_modules = {name: types.ModuleType(name) for name in ('optax', 'optax._src', 'optax._src.transform')}
  classes = _byol_optax_classes()
  for name, cls in classes.items():
    setattr(modules['byol.utils.optimizers'] if cls.__module__.startswith('byol') else
            optax_modules['optax._src.transform'], name, cls)
  with factories.modules_installed({**modules, **optax_modules}):
    with open(synth.path, 'rb') as f:
      checkpoint = pickle.load(f)
    state = checkpoint['experiment_state']
    chain = (classes['AddWeightDecayState'](), classes['ScaleByLarsState'](mu=state.online_params),
             classes['ScaleState']())
    experiment = modules['byol.byol_experiment']._ByolExperimentState(  # pylint: disable=protected-access
        online_params=state.online_params, target_params=state.target_params,
        online_state=state.online_state, target_state=state.target_state, opt_state=chain)
    data = pickle.dumps(dict(experiment_state=experiment, step=312000,
                             rng=np.array([2718, 31415], np.uint32)), protocol=2)
    # Written in 2020 with numpy 1.x: its arrays name numpy.core.multiarray
    # (numpy 2 writes numpy._core); a protocol-2 GLOBAL is 'c<module>\n<name>\n'.
    synth.path.write_bytes(data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n'))
  return synth


# ------------------------------------------------------------------ SimCLR (TF1)

def simclr_release(tmp: pathlib.Path, *, version=2, ema=True) -> factories.Synth:
  """A SimCLR TF1 checkpoint as the official code writes it.

  google-research/simclr (commit 383d414): ``model.py`` trains with
  ``TPUEstimator`` and ``optimizer.minimize(loss,
  global_step=tf.train.get_or_create_global_step())`` (line 159), so the
  checkpoint holds ``global_step``; ``model_util.get_optimizer`` builds
  ``tf.train.MomentumOptimizer`` or ``lars_optimizer.LARSOptimizer``, whose
  slot is ``tf.get_variable(name=param_name + "/Momentum")`` (lars_optimizer.py
  ``apply_gradients``): one ``<variable>/Momentum`` per *trainable* variable
  (kernels, gamma, beta, dense bias), none for ``moving_mean`` /
  ``moving_variance``. The public code has no EMA; the released v2 files
  have ``ema_model/base_model/...`` and ``ema_model/head_contrastive/...``
  copies according to Separius/SimCLRv2-Pytorch ``convert.py`` (its ``--ema``
  flag reads those prefixes), which are not trainable (no slots).

  Args:
    version: 1 (no ``head_contrastive``) or 2.
    ema: whether the ``ema_model/`` copies are present.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  synth = factories.simclr(tmp, version=version)
  reader = tf.train.load_checkpoint(str(synth.path))
  tensors = {name: np.asarray(reader.get_tensor(name))
             for name in reader.get_variable_to_shape_map()}
  tensors = {k: v for k, v in tensors.items()
             if not (k.startswith('ema_model/') and (k.endswith('/Momentum') or not ema))}
  for name in list(synth.path.parent.iterdir()):
    if name.name.startswith(synth.path.name):
      name.unlink()
  factories._tf_save(synth.path, tensors)  # pylint: disable=protected-access
  return synth


# ------------------------------------------------------------------ solo-learn (Lightning)

def _progress(n, keys=('ready', 'completed', 'started', 'processed')):
  return {'total': {k: n for k in keys}, 'current': {k: n for k in keys}}


def lightning_loops(version: str, steps: int = 1000, epochs: int = 400) -> dict:
  """``checkpoint['loops']`` of Lightning's ``dump_checkpoint``.

  2.x: copied from a checkpoint pytorch-lightning 2.6.6 wrote (``_get_loops_state_dict``:
  fit/validate/test/predict loops, each ``state_dict`` plus progress trackers).
  1.6: derived from pytorch-lightning 1.6.4 ``loops/base.py Loop.state_dict``
  (``prefix + 'state_dict'`` and every BaseProgress / child loop attribute;
  ``_results`` only under fault-tolerant training). 1.5 and older: no loops
  (1.4.7 and 1.5.10 write them only under fault-tolerant training).
  """
  batch = {**_progress(steps), 'is_last_batch': True}
  idle = {**_progress(0), 'is_last_batch': False}
  optim = {'optimizer': {'step': _progress(steps, ('ready', 'completed')),
                         'zero_grad': _progress(steps, ('ready', 'completed', 'started'))}}
  if version.startswith('2'):
    fit = {'state_dict': {}, 'epoch_loop.state_dict': {'_batches_that_stepped': steps},
           'epoch_loop.batch_progress': batch,
           'epoch_loop.scheduler_progress': _progress(steps, ('ready', 'completed')),
           'epoch_loop.automatic_optimization.state_dict': {},
           'epoch_loop.automatic_optimization.optim_progress': optim,
           'epoch_loop.manual_optimization.state_dict': {},
           'epoch_loop.manual_optimization.optim_step_progress': _progress(0, ('ready', 'completed')),
           'epoch_loop.val_loop.state_dict': {}, 'epoch_loop.val_loop.batch_progress': idle,
           'epoch_progress': _progress(epochs)}
    other = {'state_dict': {}, 'batch_progress': idle}
    return {'fit_loop': fit, 'validate_loop': other, 'test_loop': dict(other),
            'predict_loop': {'state_dict': {}, 'batch_progress': _progress(0)}}
  fit = {'state_dict': {}, 'epoch_loop.state_dict': {'_batches_that_stepped': steps},
         'epoch_loop.batch_progress': batch,
         'epoch_loop.scheduler_progress': _progress(steps, ('ready', 'completed')),
         'epoch_loop.batch_loop.state_dict': {},
         'epoch_loop.batch_loop.optimizer_loop.state_dict': {},
         'epoch_loop.batch_loop.optimizer_loop.optim_progress': {**optim, 'optimizer_position': 1},
         'epoch_loop.batch_loop.manual_loop.state_dict': {},
         'epoch_loop.batch_loop.manual_loop.optim_step_progress': _progress(0, ('ready', 'completed')),
         'epoch_loop.val_loop.state_dict': {},
         'epoch_loop.val_loop.dataloader_progress': _progress(0, ('ready', 'completed')),
         'epoch_loop.val_loop.epoch_loop.state_dict': {},
         'epoch_loop.val_loop.epoch_loop.batch_progress': idle,
         'epoch_progress': _progress(epochs)}
  other = {'state_dict': {}, 'dataloader_progress': _progress(0, ('ready', 'completed')),
           'epoch_loop.state_dict': {}, 'epoch_loop.batch_progress': idle}
  return {'fit_loop': fit, 'validate_loop': other, 'test_loop': dict(other),
          'predict_loop': {'state_dict': {}, 'dataloader_progress': _progress(0, ('ready', 'completed')),
                           'epoch_loop.state_dict': {},
                           'epoch_loop.batch_progress': _progress(0)}}


def _model_checkpoint_state(version: str, root='/runs/byol/abc123'):
  """ModelCheckpoint's callback state (``ModelCheckpoint.state_dict``), as a
  checkpoint written by pytorch-lightning 2.6.6 holds it (0-d tensors for
  scores, a dict keyed by file paths)."""
  best = f'{root}/epoch=399-step=1000.ckpt'
  state = {'monitor': 'val_acc1', 'best_model_score': torch.tensor(91.25),
           'best_model_path': best, 'current_score': torch.tensor(91.25), 'dirpath': root,
           'best_k_models': {best: torch.tensor(91.25)}, 'kth_best_model_path': best,
           'kth_value': torch.tensor(91.25), 'last_model_path': ''}
  return state


def solo_lightning(tmp: pathlib.Path, *, version='1.6.4', optimizer='real', precision=16,
                   user_callbacks=False, omegaconf_hparams=False, submodel='base') -> factories.Synth:
  """A solo-learn ``<name>-<wandb id>-ep=<epoch>.ckpt``.

  Written by ``trainer.save_checkpoint`` from solo-learn's own
  ``solo/utils/checkpointer.py`` ``Checkpointer.save``. solo-learn pinned
  pytorch-lightning 1.0.8 (2021-03), <=1.3.8, 1.4.7 (2021-09), 1.5.3/1.5.10
  (2022), 1.6.4 (2022-06..12), >=1.7,<1.9, 1.9.0/2.0.2 (2023-05), lightning
  2.1.2 (2023-12) (setup.py / requirements.txt history). Lightning's
  ``CheckpointConnector.dump_checkpoint`` (trainer/connectors/checkpoint_connector.py
  at those tags) writes:

  - all versions: ``epoch``, ``global_step``, ``pytorch-lightning_version``,
    ``state_dict``, ``callbacks``, ``optimizer_states`` (list), ``lr_schedulers`` (list);
  - ``loops``: from 1.6 (1.4.7 and 1.5.10 only under fault-tolerant training);
  - native AMP (solo-learn's scripts use ``precision: 16``):
    ``native_amp_scaling_state`` up to 1.5, ``NativeMixedPrecisionPlugin`` in
    1.6-1.8, ``MixedPrecisionPlugin`` in 1.9-2.0, ``MixedPrecision`` from 2.1
    (``checkpoint[prec_plugin.__class__.__qualname__] = scaler.state_dict()``);
  - ``hparams_name`` / ``hyper_parameters`` (+ ``hparams_type`` when the hparams
    are an omegaconf Container) only if the module called
    ``save_hyperparameters``: solo-learn never does (no such call in its
    history), so its files have none.

  ``callbacks`` holds the state of callbacks whose state is not empty: keyed by
  the callback *class* up to 1.4 (``callback_hook.py on_save_checkpoint``:
  ``callback_states[type(callback)] = state``, a pickled class reference), by
  ``callback.state_key`` (a string) from 1.5. solo-learn disables Lightning's
  ModelCheckpoint (``checkpoint_callback=False`` / ``enable_checkpointing=False``
  in main_pretrain.py) and its LearningRateMonitor / Checkpointer / AutoUMAP keep
  no state: ``callbacks == {}``. ``user_callbacks`` adds a ModelCheckpoint as a
  user's own Lightning run has.

  The optimizer is solo-learn's LARS (``solo/utils/lars.py``: param-group keys
  lr, momentum, dampening, weight_decay, nesterov, eta, eps, clip_lr,
  exclude_bias_n_norm; state ``momentum_buffer``) over the named groups of
  ``BaseMethod.learnable_params`` (backbone, projector, predictor, classifier
  with its own lr and weight_decay 0); the scheduler is
  ``LinearWarmupCosineAnnealingLR`` (interval step).
  """
  synth = factories.solo(tmp, submodel=submodel)
  obj = _load(synth.path)
  state = obj['state_dict']
  major_minor = tuple(int(x) for x in version.split('.')[:2])

  def named(prefix):
    return _trainable({k: v for k, v in state.items() if k.startswith(prefix)})
  if optimizer == 'empty':
    optimizer_states = []
  else:
    groups = [{'name': 'backbone', 'params': named('backbone.')},
              {'name': 'projector', 'params': named('projector.')},
              {'name': 'predictor', 'params': named('predictor.')},
              {'name': 'classifier', 'params': named('classifier.'), 'lr': 0.1, 'weight_decay': 0}]
    optimizer_states = [optimizer_state(
        'momentum', groups, state_key='momentum_buffer', lr=1.0, momentum=0.9, dampening=0,
        weight_decay=1e-5, nesterov=False, eta=0.02, eps=1e-8, clip_lr=True,
        exclude_bias_n_norm=True)]
  lr_schedulers = [] if optimizer == 'empty' else [{
      'warmup_epochs': 4000, 'max_epochs': 400000, 'warmup_start_lr': 0.003, 'eta_min': 0.0,
      'base_lrs': [1.0, 1.0, 1.0, 0.1], 'last_epoch': 1000, 'verbose': False, '_step_count': 1001,
      '_get_lr_called_within_step': False, '_last_lr': [0.25, 0.25, 0.25, 0.025]}]
  ckpt = {'epoch': 399, 'global_step': 1000, 'pytorch-lightning_version': version,
          'state_dict': state}
  if major_minor >= (1, 6):
    ckpt['loops'] = lightning_loops(version)
  callbacks: dict = {}
  if user_callbacks:
    if major_minor < (1, 5):  # keyed by the class itself
      callbacks[_ModelCheckpointClass] = _model_checkpoint_state(version)
    else:
      callbacks["ModelCheckpoint{'monitor': 'val_acc1', 'mode': 'max', 'every_n_train_steps': 0, "
                "'every_n_epochs': 1, 'train_time_interval': None}"] = _model_checkpoint_state(version)
  ckpt['callbacks'] = callbacks
  ckpt['optimizer_states'] = optimizer_states
  ckpt['lr_schedulers'] = lr_schedulers
  if precision == 16:
    key = ('native_amp_scaling_state' if major_minor < (1, 6) else
           'NativeMixedPrecisionPlugin' if major_minor < (1, 9) else
           'MixedPrecisionPlugin' if major_minor < (2, 1) else 'MixedPrecision')
    ckpt[key] = dict(GRAD_SCALER_STATE)
  if omegaconf_hparams:
    import omegaconf  # pylint: disable=import-outside-toplevel
    cfg = omegaconf.OmegaConf.create({
        'name': 'byol-cifar10', 'method': 'byol',
        'backbone': {'name': 'resnet18', 'kwargs': {}},
        'method_kwargs': {'proj_hidden_dim': 4096, 'proj_output_dim': 256, 'pred_hidden_dim': 4096},
        'momentum': {'base_tau': 0.99, 'final_tau': 1.0},
        'data': {'dataset': 'cifar10', 'train_path': './datasets', 'num_workers': 4},
        'optimizer': {'name': 'lars', 'batch_size': 256, 'lr': 1.0, 'classifier_lr': 0.1,
                      'weight_decay': 1e-5, 'kwargs': {'clip_lr': True, 'eta': 0.02,
                                                       'exclude_bias_n_norm': True}},
        'scheduler': {'name': 'warmup_cosine'}, 'max_epochs': 400, 'precision': '16-mixed',
        'devices': [0], 'strategy': 'ddp'})
    ckpt['hparams_name'] = 'cfg'
    ckpt['hyper_parameters'] = cfg
    ckpt['hparams_type'] = type(cfg)
  with _stub_modules('pytorch_lightning.callbacks.model_checkpoint',
                     ModelCheckpoint=_ModelCheckpointClass):
    torch.save(ckpt, synth.path)
  return synth


class _ModelCheckpointClass:
  """Stands for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``
  (pickled by reference only)."""


_ModelCheckpointClass.__module__ = 'pytorch_lightning.callbacks.model_checkpoint'
_ModelCheckpointClass.__qualname__ = _ModelCheckpointClass.__name__ = 'ModelCheckpoint'


@contextlib.contextmanager
def _stub_modules(dotted: str, **attrs):
  """Puts stub modules for ``dotted`` and its parents in sys.modules (the leaf
  holding ``attrs``) while a file that references them by name is pickled."""
  parts = dotted.split('.')
  names = ['.'.join(parts[:i + 1]) for i in range(len(parts))]
  modules = {name: types.ModuleType(name) for name in names}
  for key, value in attrs.items():
    setattr(modules[dotted], key, value)
  with factories.modules_installed(modules):
    yield


def solo_method_buffers(tmp: pathlib.Path, *, method='nnclr') -> factories.Synth:
  """A solo-learn checkpoint of a method whose module registers extra buffers.

  vturrisi/solo-learn (commit 9187ea3) ``solo/methods/nnclr.py`` (also
  nnbyol.py, nnsiam.py, all4one.py) ``register_buffer("queue", (queue_size,
  proj_output_dim))``, ``register_buffer("queue_y", -ones(queue_size, long))``,
  ``register_buffer("queue_ptr", zeros(1, long))`` (all4one also
  ``queue_index``); ``solo/methods/deepclusterv2.py`` registers
  ``local_memory_index`` (size_memory_per_process,) long and
  ``local_memory_embeddings`` (len(crops_for_assign), size_memory_per_process,
  proj_output_dim), and its ``prototypes`` is an ``nn.ModuleList`` of
  ``nn.Linear(proj_output_dim, k, bias=False)`` applied to the L2-normalised
  projection (``prototypes.{i}.weight``). Buffers are persistent, so they are in
  ``state_dict``.
  """
  synth = factories.solo(tmp)
  ckpt = _load(synth.path)
  state = ckpt['state_dict']
  for key in [k for k in state if k.startswith(('momentum_', 'queue'))]:
    del state[key]
  if method in ('nnclr', 'all4one'):
    state['queue'] = torch.randn(64, 32)
    state['queue_y'] = -torch.ones(64, dtype=torch.long)
    state['queue_ptr'] = torch.zeros(1, dtype=torch.long)
    if method == 'all4one':
      state['queue_index'] = -torch.ones(64, dtype=torch.long)
  elif method == 'deepclusterv2':
    for key in [k for k in state if k.startswith('predictor.')]:
      del state[key]
    del synth.heads['predictor']
    synth.head_inputs.pop('predictor', None)
    state['local_memory_index'] = torch.zeros(128, dtype=torch.long)
    state['local_memory_embeddings'] = torch.randn(2, 128, 32)
    z = torch.from_numpy(synth.heads['projector'])
    for i, k in enumerate((30, 40)):
      weight = torch.randn(k, 32, generator=torch.Generator().manual_seed(80 + i))
      state[f'prototypes.{i}.weight'] = weight
      synth.heads[f'prototypes_{i}'] = (torch.nn.functional.normalize(z, dim=1) @ weight.T).numpy()
      synth.head_inputs[f'prototypes_{i}'] = synth.heads['projector']
  torch.save(ckpt, synth.path)
  return synth

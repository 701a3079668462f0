"""Per-method rules: which keys of a checkpoint file are the backbone, which are heads,
and which are explicitly dropped.

A rule takes the flat ``{name: array}`` of a reader (through a :class:`KeyLedger`
that records what became of every key) and returns an :class:`Extraction`: the
backbone in torchvision (ResNet) or timm (ViT) names with PyTorch tensor
layouts, and the heads as torch ``Sequential`` state dicts. Every key must be
taken or dropped by an explicit rule; whatever is left is an error that lists
the keys by prefix and names the method the file most likely belongs to.

Sub-models (``submodel``): the default is the network the authors evaluate.

============  ======================  =========================================
method        sub-models              file layout
============  ======================  =========================================
simclr        base, ema               TF1: base_model/conv2d_N, batch_normalization_N
swav          base                    flat, 'module.' + projection_head, prototypes
moco          query, key              state_dict: module.encoder_q / encoder_k, queue
mocov3        base, momentum          state_dict: module.base_encoder / momentum_encoder
byol          online, target          pickle: experiment_state.{online,target}_{params,state}
dino          teacher, student        flat backbone, or full {teacher, student, args}
simsiam       base                    state_dict: module.encoder (projector in encoder.fc)
vicreg        base                    flat backbone, or full {model: module.backbone}
barlowtwins   base                    flat backbone, or full {model: module.backbone, bn}
solo-learn    base, momentum          Lightning: state_dict: backbone. (old: encoder.)
============  ======================  =========================================
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

SUBMODELS = {
    'simclr': ('base', 'ema'),
    'swav': ('base',),
    'moco': ('query', 'key'),
    'mocov3': ('base', 'momentum'),
    'byol': ('online', 'target'),
    'dino': ('teacher', 'student'),
    'simsiam': ('base',),
    'vicreg': ('base',),
    'barlowtwins': ('base',),
    'solo-learn': ('base', 'momentum'),
}
CONVERTIBLE_METHODS = tuple(SUBMODELS)

# Architecture options a method's releases share, applied when the user names
# a method and an architecture instead of a registry id.
METHOD_ARCH_DEFAULTS = {
    'simclr': {'resnet': {'pool_padding': 'tf_same'}},
    'byol': {'resnet': {'conv_padding': 'tf_same', 'pool_padding': 'tf_same'}},
    'mocov3': {'vit': {'num_heads': 12}},
    'dino': {'vit': {'pos_embed_interpolation': 'dino'}},
}


class ConversionError(ValueError):
  """A checkpoint does not fit the requested method or architecture."""


@dataclasses.dataclass
class Extraction:
  """What a rule found in a file.

  Attributes:
    backbone: torchvision/timm-named backbone state, PyTorch layouts.
    kind: ``'resnet'`` or ``'vit'``.
    heads: ``{name: (sequential_state, activation, normalize_input)}``.
    submodel: the sub-model taken.
    facts: small JSON-able facts for the metadata (e.g. solo-learn method).
  """
  backbone: dict[str, np.ndarray]
  kind: str
  heads: dict[str, tuple[dict[str, np.ndarray], str | None, bool]]
  submodel: str
  facts: dict[str, Any] = dataclasses.field(default_factory=dict)


class KeyLedger:
  """Tracks, for every key of a file, whether a rule used it or dropped it (and why).

  Args:
    flat: the reader's ``{name: array}`` (copied to ``self.flat``); ``self.fate``
      maps each key handled so far to ``'used'`` or ``'dropped: <reason>'``.
  """

  def __init__(self, flat: Mapping[str, np.ndarray]):
    self.flat = dict(flat)
    self.fate: dict[str, str] = {}
    # What the rule declared dropped, whether or not the file has arrays there:
    # a part of the file that holds no array (or an object that was not
    # rebuilt) is judged against these too (see reason_for).
    self._dropped_prefixes: dict[str, str] = {}
    self._dropped_keys: dict[str, str] = {}
    self._dropped_predicates: list[tuple[Callable[[str], bool], str]] = []

  def __contains__(self, key: str) -> bool:
    return key in self.flat

  def keys_with_prefix(self, prefix: str) -> list[str]:
    """Every key of the file starting with ``prefix`` (used or not)."""
    return [k for k in self.flat if k.startswith(prefix)]

  def has_prefix(self, prefix: str) -> bool:
    """Whether any key of the file starts with ``prefix``."""
    return any(k.startswith(prefix) for k in self.flat)

  def take(self, key: str) -> np.ndarray:
    """Marks ``key`` used and returns its array.

    Args:
      key: a key of the file.
    Raises:
      ConversionError: the file has no such key, or it was used already.
    """
    if key not in self.flat:
      raise ConversionError(f'the file has no entry {key!r}.')
    if key in self.fate:
      raise ConversionError(f'{key!r} would be used twice.')
    self.fate[key] = 'used'
    return self.flat[key]

  def take_prefix(self, prefix: str, *, exclude: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Takes every not-yet-used key under ``prefix`` (minus ``exclude`` sub-prefixes)."""
    exclude = tuple(prefix + e for e in exclude)
    return {key[len(prefix):]: self.take(key) for key in list(self.flat)
            if key.startswith(prefix) and not key.startswith(exclude) and key not in self.fate}

  def drop_prefix(self, prefix: str, reason: str) -> None:
    """Drops every key under ``prefix`` not handled yet, recording ``reason``.

    Args:
      prefix: the key prefix.
      reason: why they are dropped (summarised in the metadata).
    """
    self._dropped_prefixes.setdefault(prefix, reason)
    for key in self.keys_with_prefix(prefix):
      self.fate.setdefault(key, f'dropped: {reason}')

  def drop(self, key: str, reason: str) -> None:
    """Drops ``key`` (if the file has it and it is not handled yet), recording ``reason``.

    Args:
      key: a key of the file.
      reason: why it is dropped.
    """
    self._dropped_keys.setdefault(key, reason)
    if key in self.flat:
      self.fate.setdefault(key, f'dropped: {reason}')

  def drop_matching(self, predicate: Callable[[str], bool], reason: str) -> None:
    """Drops every key not handled yet for which ``predicate(key)`` is true.

    Args:
      predicate: ``key -> bool``.
      reason: why they are dropped.
    """
    self._dropped_predicates.append((predicate, reason))
    for key in self.flat:
      if predicate(key):
        self.fate.setdefault(key, f'dropped: {reason}')

  def reason_for(self, path: str) -> str | None:
    """Why the part of the file at ``path`` is dropped, or None if no rule drops it.

    Args:
      path: a key of the file or the path of a sub-tree (``optimizer``,
        ``hyper_parameters/model``), as the readers name them.
    Returns:
      The reason of the drop rule that covers ``path`` (an exact key, a
      prefix above it, or a predicate), else None.
    """
    fate = self.fate.get(path)
    if fate is not None and fate != 'used':
      return fate.removeprefix('dropped: ')
    if path in self._dropped_keys:
      return self._dropped_keys[path]
    for prefix, reason in self._dropped_prefixes.items():
      if (path + '/').startswith(prefix):
        return reason
    for predicate, reason in self._dropped_predicates:
      if predicate(path):
        return reason
    return None

  def remaining(self) -> list[str]:
    """The keys neither used nor dropped, sorted (must be empty after a rule)."""
    return sorted(k for k in self.flat if k not in self.fate)

  def dropped_summary(self) -> dict[str, int]:
    """``{reason: number of keys dropped for it}``."""
    counts = collections.Counter(v for v in self.fate.values() if v != 'used')
    return {reason.removeprefix('dropped: '): n for reason, n in sorted(counts.items())}


def group_by_prefix(keys: Iterable[str], depth: int = 2) -> dict[str, int]:
  """Counts keys by their first ``depth`` name components (``/`` and ``.`` split).

  Args:
    keys: the keys.
    depth: components kept (default 2); longer keys are counted under ``prefix.*``.
  Returns:
    ``{prefix: count}``, sorted by prefix.
  """
  counts: dict[str, int] = collections.Counter()
  for key in keys:
    parts = re.split(r'[/.]', key)
    counts['.'.join(parts[:depth]) + ('.*' if len(parts) > depth else '')] += 1
  return dict(sorted(counts.items()))


def _first_present(ledger: KeyLedger, candidates: Iterable[str], probe: str) -> str | None:
  for prefix in candidates:
    if prefix + probe in ledger:
      return prefix
  return None


def _probe(kind: str) -> str:
  return 'cls_token' if kind == 'vit' else 'conv1.weight'


def _locate(ledger: KeyLedger, candidates: Iterable[str], kind: str, what: str) -> str:
  candidates = list(candidates)
  prefix = _first_present(ledger, candidates, _probe(kind))
  if prefix is None:
    raise ConversionError(
        f'no {what} found: none of the expected key prefixes '
        f'{[c + _probe(kind) for c in candidates]} is in the file.')
  return prefix


def _take_torch_backbone(ledger: KeyLedger, prefix: str, kind: str,
                         heads: Iterable[str] = ()) -> dict[str, np.ndarray]:
  state = ledger.take_prefix(prefix, exclude=tuple(heads))
  for key in [k for k in state if k.endswith('num_batches_tracked')]:
    del state[key]  # int64 step counters, not weights (the ledger marked them used)
  return state


# Training bookkeeping at the top level of the published files, by the key the
# official code writes it under (torch.save dicts of MoCo, MoCo v3, SimSiam,
# DINO, SwAV, VICReg, Barlow Twins; Lightning's dump_checkpoint; BYOL's pickle).
# Parts of these that hold no array are metadata already (readers.flatten);
# what holds arrays (optimizer momentum buffers, a callback's best score) is
# dropped here by name.
BOOKKEEPING = {
    'optimizer': 'optimizer state', 'optimizer_states': 'optimizer state',
    'scaler': 'AMP grad-scaler state', 'fp16_scaler': 'AMP grad-scaler state',
    'amp': 'AMP grad-scaler state', 'native_amp_scaling_state': 'AMP grad-scaler state',
    'lr_schedulers': 'LR scheduler state', 'callbacks': 'Lightning callbacks',
    'loops': 'Lightning loop state', 'hyper_parameters': 'training arguments',
    'datamodule_hyper_parameters': 'training arguments', 'args': 'training arguments',
    'epoch': 'training bookkeeping', 'arch': 'training bookkeeping',
    'global_step': 'training bookkeeping', 'step': 'training bookkeeping',
    'rng': 'training bookkeeping', 'pytorch-lightning_version': 'training bookkeeping',
    'hparams_name': 'training bookkeeping', 'hparams_type': 'training bookkeeping',
}


def _drop_common(ledger: KeyLedger) -> None:
  """Training bookkeeping that no rule needs (:data:`BOOKKEEPING`)."""
  for key, reason in BOOKKEEPING.items():
    ledger.drop(key, reason)
    ledger.drop_prefix(key + '/', reason)


def _roots(ledger: KeyLedger, roots: Iterable[str]) -> list[str]:
  return [r for r in roots if r == '' or ledger.has_prefix(r)]


def _prefixes(roots: Iterable[str], names: Iterable[str]) -> list[str]:
  return [root + name for root in roots for name in names]


def _sequential_head(ledger: KeyLedger, prefix: str) -> dict[str, np.ndarray]:
  return ledger.take_prefix(prefix)


# --------------------------------------------------------------------- rules

def rule_swav(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """SwAV: the backbone, ``projection_head`` and ``prototypes`` (also
  DeepCluster-v2's multiple prototype heads).

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ignored (SwAV has one network, ``base``).
  Returns:
    The :class:`Extraction`.
  """
  del submodel
  roots = _roots(ledger, ['state_dict/', ''])
  prefix = _locate(ledger, _prefixes(roots, ['module.', '']), kind, 'SwAV backbone')
  heads = {}
  if ledger.has_prefix(prefix + 'projection_head.'):
    heads['projector'] = (_sequential_head(ledger, prefix + 'projection_head.'), 'relu', False)
  if prefix + 'prototypes.weight' in ledger:
    heads['prototypes'] = ({'weight': ledger.take(prefix + 'prototypes.weight')}, None, True)
  for key in ledger.keys_with_prefix(prefix + 'prototypes.prototypes'):  # DeepCluster-v2 multi-heads
    k = key[len(prefix + 'prototypes.prototypes'):].split('.')[0]
    heads[f'prototypes_{k}'] = ({'weight': ledger.take(key)}, None, True)
  backbone = _take_torch_backbone(ledger, prefix, kind, ('projection_head.', 'prototypes.'))
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, 'base')


def rule_moco(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """MoCo v1/v2: ``encoder_q`` or ``encoder_k`` with its ``fc`` projector; the other
  encoder and the queue are dropped.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ``'query'`` or ``'key'``.
  Returns:
    The :class:`Extraction`.
  """
  roots = _roots(ledger, ['state_dict/', ''])
  name, other = ('encoder_q.', 'encoder_k.') if submodel == 'query' else ('encoder_k.', 'encoder_q.')
  prefix = _locate(ledger, _prefixes(roots, ['module.' + name, name]), kind,
                   f'MoCo {submodel} encoder')
  heads = {}
  if ledger.has_prefix(prefix + 'fc.'):
    heads['projector'] = (_sequential_head(ledger, prefix + 'fc.'), 'relu', False)
  backbone = _take_torch_backbone(ledger, prefix, kind, ('fc.',))
  root = prefix[:-len(name)]
  ledger.drop_prefix(root + other, 'the other MoCo encoder (--submodel key/query selects it)')
  ledger.drop(root + 'queue', 'MoCo negative queue')
  ledger.drop(root + 'queue_ptr', 'MoCo negative queue')
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, submodel)


def rule_mocov3(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """MoCo v3: ``base_encoder`` or ``momentum_encoder`` with its projector (``fc`` /
  ``head``), and the predictor for ``base``; the other encoder is dropped.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ``'base'`` or ``'momentum'``.
  Returns:
    The :class:`Extraction`.
  """
  roots = _roots(ledger, ['state_dict/', ''])
  name, other = (('base_encoder.', 'momentum_encoder.') if submodel == 'base'
                 else ('momentum_encoder.', 'base_encoder.'))
  prefix = _locate(ledger, _prefixes(roots, ['module.' + name, name]), kind,
                   f'MoCo v3 {submodel} encoder')
  root = prefix[:-len(name)]
  head_name = 'head.' if kind == 'vit' else 'fc.'
  heads = {}
  if ledger.has_prefix(prefix + head_name):
    heads['projector'] = (_sequential_head(ledger, prefix + head_name), 'relu', False)
  if submodel == 'base' and ledger.has_prefix(root + 'predictor.'):
    heads['predictor'] = (_sequential_head(ledger, root + 'predictor.'), 'relu', False)
  ledger.drop_prefix(root + 'predictor.', 'predictor of the base encoder')
  backbone = _take_torch_backbone(ledger, prefix, kind, (head_name,))
  ledger.drop_prefix(root + other, 'the other MoCo v3 encoder (--submodel selects it)')
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, submodel)


def _dino_head(ledger: KeyLedger, prefix: str, heads: dict) -> None:
  if ledger.has_prefix(prefix + 'mlp.'):
    heads['projector'] = (ledger.take_prefix(prefix + 'mlp.'), 'gelu', False)
  last = {k: ledger.take(prefix + 'last_layer.' + k) for k in ('weight_g', 'weight_v', 'weight')
          if prefix + 'last_layer.' + k in ledger}
  if last:
    heads['prototypes'] = (last, None, True)


def rule_dino(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """DINO: a backbone-only file (the teacher), or a full checkpoint's teacher or
  student with its head (MLP projector and weight-normalised last layer).

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ``'teacher'`` or ``'student'`` (the latter needs a full checkpoint).
  Returns:
    The :class:`Extraction`.
  """
  if ledger.has_prefix('teacher/') or ledger.has_prefix('student/'):
    root, other = (('teacher/', 'student/') if submodel == 'teacher'
                   else ('student/', 'teacher/'))
    prefix = _locate(ledger, [root + 'backbone.', root + 'module.backbone.'], kind,
                     f'DINO {submodel} backbone')
    heads: dict = {}
    head_root = prefix[:-len('backbone.')] + 'head.'
    _dino_head(ledger, head_root, heads)
    backbone = _take_torch_backbone(ledger, prefix, kind)
    ledger.drop_prefix(other, f'the DINO {other[:-1]} (--submodel selects it)')
    ledger.drop_prefix('dino_loss/', 'DINO loss center')
    _drop_common(ledger)
    return Extraction(backbone, kind, heads, submodel)
  if submodel != 'teacher':
    raise ConversionError('a DINO backbone-only file holds the teacher only; '
                          '--submodel student needs the *_full_checkpoint.pth file.')
  prefix = _locate(ledger, ['', 'module.', 'backbone.'], kind, 'DINO backbone')
  backbone = _take_torch_backbone(ledger, prefix, kind)
  _drop_common(ledger)
  return Extraction(backbone, kind, {}, 'teacher')


def rule_simsiam(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """SimSiam: ``encoder`` (its ``fc`` is the projector) and ``predictor``.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ignored (``base`` only).
  Returns:
    The :class:`Extraction`.
  """
  del submodel
  roots = _roots(ledger, ['state_dict/', ''])
  prefix = _locate(ledger, _prefixes(roots, ['module.encoder.', 'encoder.']), kind,
                   'SimSiam encoder')
  root = prefix[:-len('encoder.')]
  heads = {}
  if ledger.has_prefix(prefix + 'fc.'):
    heads['projector'] = (_sequential_head(ledger, prefix + 'fc.'), 'relu', False)
  if ledger.has_prefix(root + 'predictor.'):
    heads['predictor'] = (_sequential_head(ledger, root + 'predictor.'), 'relu', False)
  backbone = _take_torch_backbone(ledger, prefix, kind, ('fc.',))
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, 'base')


def _rule_facebook_full(ledger: KeyLedger, kind: str, method: str, with_bn: bool) -> Extraction:
  """VICReg / Barlow Twins: flat backbone file, or {'model': module.backbone/projector[/bn]}."""
  roots = _roots(ledger, ['model/', 'state_dict/', ''])
  prefix = _locate(ledger, _prefixes(roots, ['module.backbone.', 'backbone.', 'module.', '']),
                   kind, f'{method} backbone')
  root = prefix[:-len('backbone.')] if prefix.endswith('backbone.') else prefix
  heads = {}
  if ledger.has_prefix(root + 'projector.'):
    projector = _sequential_head(ledger, root + 'projector.')
    if with_bn and not ledger.has_prefix(root + 'bn.'):
      # main.py always builds self.bn = BatchNorm1d(sizes[-1], affine=False).
      raise ConversionError(f'a Barlow Twins full checkpoint normalises its projector output '
                            f'with {root}bn.*; this file has a projector but no bn (a VICReg '
                            'full checkpoint has this layout).')
    if with_bn:
      # Barlow Twins normalises the projector output with an affine-free
      # BatchNorm before the cross-correlation: stored as the projector's last norm.
      last = max(int(k.split('.')[0]) for k in projector)
      projector.update({f'{last + 1}.{k}': v for k, v in
                        ledger.take_prefix(root + 'bn.').items()})
    heads['projector'] = (projector, 'relu', False)
  exclude = ('projector.', 'bn.') if prefix == root else ()
  backbone = _take_torch_backbone(ledger, prefix, kind, exclude)
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, 'base')


def rule_vicreg(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """VICReg: a flat backbone file, or a full checkpoint with its projector.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ignored (``base`` only).
  Returns:
    The :class:`Extraction`.
  """
  del submodel
  return _rule_facebook_full(ledger, kind, 'VICReg', with_bn=False)


def rule_barlowtwins(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """Barlow Twins: a flat backbone file, or a full checkpoint with its projector
  (the affine-free ``bn`` stored as its last norm).

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ignored (``base`` only).
  Returns:
    The :class:`Extraction`.
  """
  del submodel
  return _rule_facebook_full(ledger, kind, 'Barlow Twins', with_bn=True)


# Persistent buffers of solo-learn's methods (register_buffer in solo/methods/*.py):
# MoCo v2+/NNCLR/NNBYOL/NNSiam/All4One queues, DeepClusterV2's memory bank,
# DINO's loss centre.
_SOLO_BUFFERS = ('queue', 'queue_ptr', 'queue_y', 'queue_index', 'local_memory_index',
                 'local_memory_embeddings', 'dino_loss_func')


def rule_solo(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """solo-learn (Lightning): the ``backbone`` (or old ``encoder``) or its momentum
  copy, with classifier, projector, predictor, prototypes or DINO head; method
  buffers and the other sub-model are dropped.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ``'base'`` or ``'momentum'``.
  Returns:
    The :class:`Extraction`.
  """
  root = 'state_dict/' if ledger.has_prefix('state_dict/') else ''
  base_names = ['backbone.', 'encoder.']  # encoder.: checkpoints before Sep 2021
  names = base_names if submodel == 'base' else ['momentum_backbone.', 'momentum_encoder.']
  prefix = _locate(ledger, [root + n for n in names], kind, f'solo-learn {submodel} backbone')
  head_prefix = root if submodel == 'base' else root + 'momentum_'
  heads = {}
  for name, activation in [('classifier', None), ('projector', 'relu'), ('predictor', 'relu')]:
    if submodel == 'momentum' and name == 'predictor':
      continue
    if ledger.has_prefix(head_prefix + name + '.'):
      heads[name] = (ledger.take_prefix(head_prefix + name + '.'), activation, False)
  if submodel == 'base' and ledger.has_prefix(root + 'prototypes.'):
    prototypes = ledger.take_prefix(root + 'prototypes.')
    if all(re.match(r'^\d+\.weight$', k) for k in prototypes):
      # DeepClusterV2: an nn.ModuleList of Linear(bias=False), one per prototype set.
      for key, weight in sorted(prototypes.items(), key=lambda kv: int(kv[0].split('.')[0])):
        heads[f'prototypes_{key.split(".")[0]}'] = ({'weight': weight}, None, True)
    else:  # SwAV: one (weight-normalised) Linear
      heads['prototypes'] = (prototypes, None, True)
  if ledger.has_prefix(head_prefix + 'head.'):  # DINO head
    _dino_head(ledger, head_prefix + 'head.', heads)
  backbone = _take_torch_backbone(ledger, prefix, kind)
  ledger.drop_matching(lambda k: k.startswith(root + 'momentum_') or k.startswith(
      tuple(root + n for n in ('backbone.', 'encoder.', 'classifier.', 'projector.',
                               'predictor.', 'prototypes.', 'head.'))),
                       'the other solo-learn sub-model (--submodel selects it)')
  ledger.drop_matching(lambda k: k.startswith(root) and k[len(root):].split('.')[0] in
                       _SOLO_BUFFERS, 'method buffers')
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, submodel)


# ----------------------------------------------------------- Haiku (BYOL)

_HAIKU_BLOCK = re.compile(r'^block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)$')
_HAIKU_SHORTCUT = re.compile(r'^block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$')


def _haiku_module_to_torch(path: str) -> tuple[str, str] | None:
  """Haiku ResNet module path (after the root) -> (torchvision module name, kind)."""
  if path in ('initial_conv', 'initial_conv_1'):
    return 'conv1', 'conv'
  if path in ('initial_batchnorm', 'initial_batchnorm_1'):
    return 'bn1', 'bn'
  match = _HAIKU_BLOCK.match(path)
  if match:
    group, block, what, index = match.groups()
    name = 'conv' if what == 'conv' else 'bn'
    return f'layer{int(group) + 1}.{block}.{name}{int(index) + 1}', 'conv' if what == 'conv' else 'bn'
  match = _HAIKU_SHORTCUT.match(path)
  if match:
    group, block, what = match.groups()
    return (f'layer{int(group) + 1}.{block}.downsample.{0 if what == "conv" else 1}',
            'conv' if what == 'conv' else 'bn')
  return None


def _haiku_mlp_to_torch(params: Mapping[str, Mapping[str, np.ndarray]],
                        state: Mapping[str, Mapping[str, np.ndarray]], name: str
                        ) -> dict[str, np.ndarray]:
  """BYOL's MLP (linear -> batch_norm -> relu -> linear_1) as a torch Sequential dict."""
  out = {'0.weight': params[f'{name}/~/linear']['w'].T}
  if 'b' in params[f'{name}/~/linear']:
    out['0.bias'] = params[f'{name}/~/linear']['b']
  bn = params[f'{name}/~/batch_norm']
  out['1.weight'] = bn['scale'].reshape(-1)
  out['1.bias'] = bn['offset'].reshape(-1)
  out['1.running_mean'] = state[f'{name}/~/batch_norm/~/mean_ema']['average'].reshape(-1)
  out['1.running_var'] = state[f'{name}/~/batch_norm/~/var_ema']['average'].reshape(-1)
  out['3.weight'] = params[f'{name}/~/linear_1']['w'].T
  if 'b' in params[f'{name}/~/linear_1']:
    out['3.bias'] = params[f'{name}/~/linear_1']['b']
  return out


def rule_byol(ledger: KeyLedger, kind: str, submodel: str) -> Extraction:
  """BYOL (Haiku pickle): the online or target ResNet mapped to torchvision names
  (BatchNorm statistics from the debiased EMA), its projector/predictor and
  classifier; the other network and the optimizer state are dropped.

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: ``'resnet'`` or ``'vit'``.
    submodel: ``'online'`` or ``'target'``.
  Returns:
    The :class:`Extraction`.
  """
  if kind != 'resnet':
    raise ConversionError('BYOL released ResNets only.')
  base = 'experiment_state/'
  if not ledger.has_prefix(base + f'{submodel}_params/'):
    raise ConversionError(f'no {base}{submodel}_params/ in the file: not a BYOL checkpoint.')
  other = 'target' if submodel == 'online' else 'online'

  def modules(collection: str) -> dict[str, dict[str, np.ndarray]]:
    grouped: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    prefix = f'{base}{submodel}_{collection}/'
    for key in ledger.keys_with_prefix(prefix):
      module, _, leaf = key[len(prefix):].rpartition('/')
      grouped[module][leaf] = ledger.take(key)
    return dict(grouped)

  params, state = modules('params'), modules('state')
  backbone: dict[str, np.ndarray] = {}
  unknown = []
  for path, leaves in params.items():
    root, _, rest = path.partition('/~/')
    mapped = _haiku_module_to_torch(rest) if rest else None
    if mapped is None:
      if root not in ('projector', 'predictor', 'classifier'):
        unknown.append(path)
      continue
    name, what = mapped
    if what == 'conv':
      backbone[f'{name}.weight'] = np.asarray(leaves.pop('w')).transpose(3, 2, 0, 1)
    else:
      backbone[f'{name}.weight'] = np.asarray(leaves.pop('scale')).reshape(-1)
      backbone[f'{name}.bias'] = np.asarray(leaves.pop('offset')).reshape(-1)
    if leaves:
      unknown.append(f'{path} ({sorted(leaves)})')
  for path, leaves in state.items():
    module, _, ema = path.rpartition('/~/')
    root, _, rest = module.partition('/~/')
    mapped = _haiku_module_to_torch(rest) if rest else None
    if mapped is None or ema not in ('mean_ema', 'var_ema'):
      if root not in ('projector', 'predictor'):
        unknown.append(path)
      continue
    stat = 'running_mean' if ema == 'mean_ema' else 'running_var'
    # 'average' is the zero-debiased EMA BYOL evaluates with; 'hidden' and
    # 'counter' are its internals.
    backbone[f'{mapped[0]}.{stat}'] = np.asarray(leaves['average']).reshape(-1)
  if unknown:
    raise ConversionError(f'unrecognised Haiku modules in the BYOL file: {unknown[:8]}')

  heads = {}
  for name in ('projector', 'predictor'):
    if f'{name}/~/linear' in params:
      heads[name] = (_haiku_mlp_to_torch(params, state, name), 'relu', False)
  if 'classifier' in params:
    heads['classifier'] = ({'weight': params['classifier']['w'].T,
                            'bias': params['classifier']['b']}, None, False)
  ledger.drop_prefix(f'{base}{other}_params/', f'the BYOL {other} network (--submodel selects it)')
  ledger.drop_prefix(f'{base}{other}_state/', f'the BYOL {other} network (--submodel selects it)')
  ledger.drop_prefix(f'{base}opt_state/', 'optimizer state')
  _drop_common(ledger)
  return Extraction(backbone, kind, heads, submodel)


# --------------------------------------------------------------- TF1 (SimCLR)

def _tf_index(name: str, base: str) -> int | None:
  """'conv2d' -> 0, 'conv2d_12' -> 12 (numeric, not lexicographic), other -> None."""
  if name == base:
    return 0
  if name.startswith(base + '_') and name[len(base) + 1:].isdigit():
    return int(name[len(base) + 1:])
  return None


def resnet_creation_order(stage_sizes, block: str) -> list[str]:
  """torchvision conv names in the order TF/SimCLR creates them (projection shortcut first).

  Args:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    block: ``'basic'`` or ``'bottleneck'``.
  """
  names = ['conv1']
  convs = ['conv1', 'conv2'] + (['conv3'] if block == 'bottleneck' else [])
  for stage, count in enumerate(stage_sizes):
    for index in range(count):
      prefix = f'layer{stage + 1}.{index}'
      has_projection = index == 0 and (stage > 0 or block == 'bottleneck')
      if has_projection:
        names.append(f'{prefix}.downsample.0')
      names += [f'{prefix}.{c}' for c in convs]
  return names


def _conv_to_bn(conv: str) -> str:
  if conv == 'conv1':
    return 'bn1'
  if conv.endswith('downsample.0'):
    return conv[:-1] + '1'
  return conv[:-5] + 'bn' + conv[-1]


def sk_resnet_creation_order(stage_sizes) -> tuple[list[str], list[str]]:
  """(convolutions, batch norms) of a SimCLR v2 selective-kernel ResNet in TF creation order.

  Derived from google-research/simclr ``resnet.py`` (TF1, the code that wrote
  the ``_sk1`` checkpoints; ``tf2/resnet.py`` builds the same layers in the
  same order) with ``FLAGS.sk_ratio > 0``. TF1 numbers ``conv2d_N`` and
  ``batch_normalization_N`` separately, each in the order its layers are
  created, i.e. called:

  * ``resnet_v1_generator.model``: the ResNet-D stem, three
    ``conv2d_fixed_padding`` each followed by ``batch_norm_relu`` (the third
    BN comes after ``tf.identity(inputs, 'initial_conv')``): ``stem.conv1..3``
    and ``stem.bn1..3``.
  * ``bottleneck_block``, per block: with ``use_projection`` (the first block
    of each ``block_group``, layer1 included) the shortcut comes *first*:
    average pool, 1x1 ``conv2d_fixed_padding``, ``batch_norm_relu(relu=False)``
    (``downsample.0``/``downsample.1``); then the 1x1 conv + BN (``conv1``,
    ``bn1``); then ``sk_conv2d``: the two-stream 3x3 conv + BN (``conv2``,
    ``bn2``), the 1x1 ``tf.layers.conv2d`` to ``mid_dim`` + BN (``sk_conv1``,
    ``sk_bn1``), the 1x1 ``tf.layers.conv2d`` to ``2 * filters`` with *no* BN
    (``sk_conv2``); last the 1x1 conv + BN (``conv3``, ``bn3``).

  So a block has 5 convolutions and 4 batch norms (plus one of each for a
  projection), and the two numberings drift apart by one per block.

  Args:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
  Returns:
    ``(convs, bns)``: the torch-style names of :func:`qscore_jax.convert.layout.resnet_from_torch`
    for ``conv2d``, ``conv2d_1``, ... and ``batch_normalization``, ``batch_normalization_1``, ...
  """
  convs = ['stem.conv1', 'stem.conv2', 'stem.conv3']
  bns = ['stem.bn1', 'stem.bn2', 'stem.bn3']
  for stage, count in enumerate(stage_sizes):
    for index in range(count):
      prefix = f'layer{stage + 1}.{index}'
      if index == 0:
        convs.append(f'{prefix}.downsample.0')
        bns.append(f'{prefix}.downsample.1')
      convs += [f'{prefix}.{c}' for c in ('conv1', 'conv2', 'sk_conv1', 'sk_conv2', 'conv3')]
      bns += [f'{prefix}.{b}' for b in ('bn1', 'bn2', 'sk_bn1', 'bn3')]
  return convs, bns


def simclr_creation_order(stage_sizes, block: str, sk: bool = False
                          ) -> tuple[list[str], list[str]]:
  """(convolutions, batch norms) in TF creation order, plain or selective-kernel.

  Args:
    stage_sizes: blocks per stage.
    block: ``'basic'`` or ``'bottleneck'``.
    sk: a selective-kernel (``_sk1``) net (bottleneck only).
  """
  if sk:
    if block != 'bottleneck':
      raise ConversionError('SimCLR selective-kernel ResNets have bottleneck blocks only.')
    return sk_resnet_creation_order(stage_sizes)
  convs = resnet_creation_order(stage_sizes, block)
  return convs, [_conv_to_bn(c) for c in convs]


# Bottleneck ResNets by their number of convolutions: plain, stem + 3 per block + 4
# shortcuts; selective-kernel (sk), 3 stem convs + 5 per block + 4 shortcuts.
_SIMCLR_DEPTHS = {53: ((3, 4, 6, 3), 'bottleneck', False),
                  104: ((3, 4, 23, 3), 'bottleneck', False),
                  155: ((3, 8, 36, 3), 'bottleneck', False),
                  203: ((3, 24, 36, 3), 'bottleneck', False),
                  87: ((3, 4, 6, 3), 'bottleneck', True),
                  172: ((3, 4, 23, 3), 'bottleneck', True),
                  257: ((3, 8, 36, 3), 'bottleneck', True),
                  337: ((3, 24, 36, 3), 'bottleneck', True)}


def rule_simclr(ledger: KeyLedger, kind: str, submodel: str, *, stage_sizes=None,
                block: str | None = None) -> Extraction:
  """SimCLR TF1 variables; ``stage_sizes``/``block`` from the architecture, else
  from the number of convolutions (the names carry no structure).

  Selective-kernel (``_sk1``) files are recognised by their ResNet-D stem: the
  first convolution is 3x3 (a 7x7 in the plain nets), and the file then has
  3 stem convolutions + 5 per block + 4 shortcuts (see
  :func:`sk_resnet_creation_order`).

  Args:
    ledger: the file's keys (:class:`KeyLedger`); every key is taken or dropped.
    kind: must be ``'resnet'``.
    submodel: ``'base'`` or ``'ema'`` (the EMA weights under ``ema_model/``).
    stage_sizes: blocks per stage of the target architecture, or None.
    block: ``'bottleneck'`` (or ``'basic'``), or None.
  Returns:
    The :class:`Extraction` (backbone, ``head_contrastive`` projector,
    ``head_supervised`` classifier).
  """
  if kind != 'resnet':
    raise ConversionError('SimCLR released ResNets only.')
  root = 'ema_model/' if submodel == 'ema' else ''
  if not ledger.has_prefix(root + 'base_model/'):
    raise ConversionError(f'no {root}base_model/ variables: not a SimCLR TF1 checkpoint'
                          + (' with EMA weights' if submodel == 'ema' else '') + '.')
  ledger.drop_matching(lambda k: k.endswith('/Momentum'), 'momentum optimizer slots')
  ledger.drop_matching(lambda k: (k.startswith('ema_model/') if submodel == 'base'
                                  else not k.startswith('ema_model/') and k != 'global_step'),
                       'the other SimCLR weights (--submodel base/ema selects them)')
  ledger.drop('global_step', 'training step')
  convs, bns = {}, {}
  for key in ledger.keys_with_prefix(root + 'base_model/'):
    if key in ledger.fate:
      continue
    _, layer, leaf = key[len(root):].split('/', 2)
    conv_index, bn_index = _tf_index(layer, 'conv2d'), _tf_index(layer, 'batch_normalization')
    if conv_index is not None and leaf == 'kernel':
      convs[conv_index] = ledger.take(key)
    elif bn_index is not None and leaf in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
      bns.setdefault(bn_index, {})[leaf] = ledger.take(key)
  if sorted(convs) != list(range(len(convs))) or sorted(bns) != list(range(len(bns))):
    raise ConversionError('the SimCLR convolutions or batch norms are not numbered 0..n-1.')
  if not convs or np.ndim(convs[0]) != 4:
    raise ConversionError('the SimCLR file has no 4-d conv2d/kernel (the stem convolution).')
  # The ResNet-D stem of the selective-kernel nets starts with a 3x3 (HWIO) conv.
  sk = tuple(np.shape(convs[0])[:2]) == (3, 3)
  if stage_sizes is None:
    found = _SIMCLR_DEPTHS.get(len(convs))
    if found is None or found[2] != sk:
      raise ConversionError(
          f'the file has {len(convs)} convolutions and a {np.shape(convs[0])[0]}x'
          f'{np.shape(convs[0])[1]} stem convolution, which is no '
          f'{"selective-kernel " if sk else ""}ResNet-50/101/152/200; give --arch to check.')
    stage_sizes, block, _ = found
  conv_order, bn_order = simclr_creation_order(stage_sizes, block, sk)
  if len(convs) != len(conv_order) or len(bns) != len(bn_order):
    raise ConversionError(
        f'the file has {len(convs)} convolutions and {len(bns)} batch norms, the chosen '
        f'{"selective-kernel " if sk else ""}architecture has {len(conv_order)} and '
        f'{len(bn_order)}: wrong depth (--arch)?')
  backbone = {}
  tf_names = {'gamma': 'weight', 'beta': 'bias', 'moving_mean': 'running_mean',
              'moving_variance': 'running_var'}
  for index, conv in enumerate(conv_order):
    backbone[f'{conv}.weight'] = np.asarray(convs[index]).transpose(3, 2, 0, 1)
  for index, bn in enumerate(bn_order):
    for leaf, value in bns[index].items():
      backbone[f'{bn}.{tf_names[leaf]}'] = np.asarray(value)
  heads = {}
  contrastive = f'{root}head_contrastive/'
  if ledger.has_prefix(contrastive):
    projector = {}
    layers = sorted({int(k[len(contrastive):].split('/')[0][3:]) for k in
                     ledger.keys_with_prefix(contrastive) if k not in ledger.fate})
    for position, i in enumerate(layers):
      nl = f'{contrastive}nl_{i}/'
      projector[f'{3 * position}.weight'] = ledger.take(nl + 'dense/kernel').T
      if nl + 'dense/bias' in ledger:
        projector[f'{3 * position}.bias'] = ledger.take(nl + 'dense/bias')
      for leaf, name in tf_names.items():
        if f'{nl}batch_normalization/{leaf}' in ledger:
          projector[f'{3 * position + 1}.{name}'] = ledger.take(f'{nl}batch_normalization/{leaf}')
    heads['projector'] = (projector, 'relu', False)
  supervised = f'{root}head_supervised/linear_layer/dense/'
  if supervised + 'kernel' in ledger:
    heads['classifier'] = ({'weight': ledger.take(supervised + 'kernel').T,
                            'bias': ledger.take(supervised + 'bias')}, None, False)
  return Extraction(backbone, kind, heads, submodel)


RULES: dict[str, Callable[..., Extraction]] = {
    'swav': rule_swav, 'moco': rule_moco, 'mocov3': rule_mocov3, 'byol': rule_byol,
    'dino': rule_dino, 'simsiam': rule_simsiam, 'vicreg': rule_vicreg,
    'barlowtwins': rule_barlowtwins, 'solo-learn': rule_solo, 'simclr': rule_simclr,
}


# ------------------------------------------------------------ method guess

_SIGNATURES = [
    ('simclr', 'a SimCLR TF1 checkpoint', lambda k: k.startswith(('base_model/', 'ema_model/base_model/'))),
    ('byol', 'a BYOL pickle', lambda k: k.startswith('experiment_state/')),
    ('moco', 'a MoCo v1/v2 checkpoint', lambda k: re.match(r'^(state_dict/)?(module\.)?encoder_[qk]\.', k)),
    ('mocov3', 'a MoCo v3 checkpoint', lambda k: re.match(r'^(state_dict/)?(module\.)?(base|momentum)_encoder\.', k)),
    ('simsiam', 'a SimSiam checkpoint', lambda k: re.match(r'^(state_dict/)?(module\.)?(encoder|predictor)\.', k)),
    ('dino', 'a DINO full checkpoint', lambda k: k.startswith(('teacher/', 'student/'))),
    ('swav', 'a SwAV checkpoint', lambda k: re.match(r'^(module\.)?(projection_head|prototypes)\.', k)),
    ('barlowtwins', 'a Barlow Twins full checkpoint', lambda k: k.startswith('model/module.bn.')),
    ('vicreg', 'a VICReg or Barlow Twins full checkpoint', lambda k: k.startswith('model/module.backbone.')),
    ('solo-learn', 'a solo-learn Lightning checkpoint',
     lambda k: re.match(r'^state_dict/(momentum_)?(backbone|encoder|classifier|projector|predictor|'
                        r'prototypes|head)\.', k)),
]


def guess_method(keys: Iterable[str]) -> list[tuple[str, str]]:
  """Methods whose published layout explains the most keys: ``[(method, description)]``.

  Args:
    keys: the keys of a read file.
  Returns:
    Best guess first; empty when nothing matches.
  """
  keys = list(keys)
  scores = []
  for method, description, matches in _SIGNATURES:
    hits = sum(1 for k in keys if matches(k))
    if hits:
      scores.append((hits, method, description))
  if not scores:
    if any(k in ('conv1.weight', 'module.conv1.weight') for k in keys):
      scores.append((1, 'dino', 'a bare torchvision ResNet backbone (DINO, VICReg and Barlow '
                     'Twins publish these; SwAV with a module. prefix)'))
    if 'cls_token' in keys:
      scores.append((1, 'dino', 'a bare ViT backbone (DINO publishes these)'))
  return [(m, d) for _, m, d in sorted(scores, reverse=True)]

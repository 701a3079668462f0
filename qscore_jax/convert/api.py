"""Converting an official checkpoint into a qscore_jax model, strictly.

:func:`convert_checkpoint` is the one call behind ``qscore convert``: read the
file (downloading it first when only a registry id is given), apply the
method's rules, check that every parameter of the Flax model is filled exactly
once with the right shape and that every key of the file was used or dropped
by an explicit rule, then save an orbax checkpoint with metadata.
:func:`convert_state` does the same on an already-read ``{name: array}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qscore_jax import outputs
from qscore_jax.convert import download as download_lib
from qscore_jax.convert import layout, readers, rules
from qscore_jax.convert.rules import ConversionError
from qscore_jax.models import registry
from qscore_jax.models.heads import HeadSpec, MLPHead
from qscore_jax.models.resnet import ResNet, STAGE_SIZES
from qscore_jax.models.variables import abstract_variables
from qscore_jax.models.weights import save_model, tree_mismatches


@dataclasses.dataclass
class ConvertedModel:
  """A converted checkpoint, ready to apply.

  ``model.apply(variables, images)`` gives representations; each head is
  ``(MLPHead, variables)``; ``directory`` is where it was saved (``None``
  when not saved).

  Attributes:
    model: the backbone module.
    variables: its ``{'params', 'batch_stats'}``.
    heads: ``{name: (MLPHead, variables)}`` of the heads found in the file.
    metadata: the saved model's metadata (as in ``metadata.json``).
    directory: where it was saved, or None.
  """
  model: nn.Module
  variables: dict[str, Any]
  heads: dict[str, tuple[MLPHead, dict[str, Any]]]
  metadata: dict[str, Any]
  directory: pathlib.Path | None = None


# ----------------------------------------------------------- architectures

def _kind(arch: str) -> str:
  return 'vit' if arch.startswith('vit') else 'resnet'


_LAYER_KEY = re.compile(r'^layer(\d)\.(\d+)\.')


def infer_resnet(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Architecture of a torchvision-named ResNet state: arch name and options.

  Args:
    state: ``{torchvision name: array}`` (PyTorch layouts) of the backbone.
  Returns:
    ``{'arch': name, 'options': {...}}`` (width multiplier, CIFAR stem, width
    per group, selective-kernel ratio, as the shapes reveal them).
  """
  sk = 'stem.conv3.weight' in state  # SimCLR v2 selective-kernel: ResNet-D stem
  stem_key = 'stem.conv3.weight' if sk else 'conv1.weight'
  if stem_key not in state:
    raise ConversionError('the backbone has no conv1.weight: it is not a ResNet.')
  blocks = {}
  for key in state:
    match = _LAYER_KEY.match(key)
    if match:
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index + 1)
  stage_sizes = tuple(blocks.get(s, 0) for s in (1, 2, 3, 4))
  block = 'bottleneck' if 'layer1.0.conv3.weight' in state else 'basic'
  stem_channels, _, kernel, _ = state[stem_key].shape
  width = stem_channels / 64
  width = int(width) if width.is_integer() else width
  options: dict[str, Any] = {}
  if width != 1:
    options['width_multiplier'] = width
  if kernel == 3 and not sk:
    options['stem'] = 'cifar'
  if sk:
    options['sk_ratio'] = _infer_sk_ratio(state)
  depth = next((d for d, sizes in STAGE_SIZES.items() if tuple(sizes) == stage_sizes
                and (block == 'basic') == (d < 50)), None)
  if depth is None:
    raise ConversionError(f'the backbone has {block} blocks {stage_sizes} per stage, which is '
                          'no ResNet-18/34/50/101/152/200.')
  arch = f'resnet{depth}'
  if block == 'bottleneck' and 'layer1.0.conv1.weight' in state:
    inner = round(state['layer1.0.conv1.weight'].shape[0] / width)
    if inner != 64:
      if depth == 50 and inner == 128:
        arch = 'wide_resnet50_2'
      else:
        options['width_per_group'] = inner
  return {'arch': arch, 'options': options}


def _infer_sk_ratio(state: Mapping[str, np.ndarray]) -> float:
  """The selective-kernel ratio r of a block's mixing width max(int(inner * r), 32).

  The widest mixing branch above the 32-channel floor gives r = mid / inner
  (exact for SimCLR's r = 1/16 and power-of-two or x3 widths); when every
  branch sits on the floor (the x1 nets) the shapes cannot tell, and SimCLR's
  only value, 0.0625, is taken. The shape check after conversion verifies
  every branch against the model built with it.
  """
  ratios = []
  for key, value in state.items():
    if not key.endswith('.sk_conv1.weight'):
      continue
    conv1 = state.get(key.removesuffix('sk_conv1.weight') + 'conv1.weight')
    if conv1 is not None and value.shape[0] > 32:  # a missing conv1: the shape check says so
      ratios.append((conv1.shape[0], value.shape[0] / conv1.shape[0]))
  return max(ratios)[1] if ratios else 0.0625


def infer_vit(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Architecture of a timm-named ViT state: arch name and options (not the head count).

  Args:
    state: ``{timm name: array}`` of the backbone.
  Returns:
    ``{'arch': name, 'options': {...}}`` (patch size, image size, depth, width,
    MLP ratio, as the shapes reveal them).
  """
  try:
    dim = state['cls_token'].shape[-1]
    patch = state['patch_embed.proj.weight'].shape[-1]
    positions = state['pos_embed'].shape[1] - 1
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    hidden = state['blocks.0.mlp.fc1.weight'].shape[0]
  except (KeyError, ValueError) as error:
    raise ConversionError(f'the backbone is not a timm-layout ViT ({error}).') from None
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ConversionError(f'pos_embed has {positions} patch positions, not a square grid.')
  arch = {384: 'vit_small', 768: 'vit_base'}.get(dim, 'vit_small')
  options: dict[str, Any] = {'patch_size': patch}
  if grid * patch != 224:
    options['image_size'] = grid * patch
  if depth != 12:
    options['depth'] = depth
  if dim not in (384, 768):
    options['embed_dim'] = dim
    options['num_heads'] = max(1, dim // 64)  # timm's convention (ViT-Ti: 192 -> 3)
  if hidden != 4 * dim:
    options['mlp_ratio'] = hidden / dim
  return {'arch': arch, 'options': options}


def _architecture_facts(model: nn.Module) -> dict[str, Any]:
  """The attributes of a built model that the weights determine."""
  if isinstance(model, ResNet):
    return {'stage_sizes': tuple(model.stage_sizes), 'block': model.block,
            'width_multiplier': model.width_multiplier,
            'width_per_group': model.width_per_group, 'stem': model.stem,
            'sk_ratio': model.sk_ratio}
  return {'patch_size': model.patch_size, 'embed_dim': model.embed_dim, 'depth': model.depth,
          'image_size': model.image_size, 'mlp_ratio': float(model.mlp_ratio)}


def _describe(arch: str, options: Mapping[str, Any]) -> str:
  text = ', '.join(f'{k}={v}' for k, v in options.items())
  return f'{arch}({text})' if text else arch


# ----------------------------------------------------------------- errors

def _unmatched_error(method: str, keys: list[str], flat_keys: list[str]) -> ConversionError:
  groups = rules.group_by_prefix(keys, depth=3)
  shown = '; '.join(f'{prefix} ({n})' for prefix, n in list(groups.items())[:12])
  guesses = [(m, d) for m, d in rules.guess_method(flat_keys) if m != method]
  hint = (f' The file looks like {guesses[0][1]}: try --method {guesses[0][0]}.'
          if guesses else '')
  return ConversionError(
      f'{len(keys)} entries of the file are neither used nor dropped by the {method} rules, '
      f'so it is not a {method} checkpoint of the expected layout. Unmatched, by prefix: '
      f'{shown}.{hint}')


# -------------------------------------------------------------- conversion

def _refuse_neutralised_in_kept_parts(flat: Mapping[str, np.ndarray],
                                      ledger: rules.KeyLedger) -> list[dict[str, str]]:
  """Objects of the file that were not rebuilt (readers' ``neutralised``) must sit in
  parts the rules drop; then each is warned about and returned for the metadata.

  Raises:
    ReaderError: one sits in a part the conversion keeps (weights, or anything
      no rule drops); the message names the global and where it is.
  """
  neutralised = getattr(flat, 'neutralised', {})
  kept = {path: name for path, name in neutralised.items() if ledger.reason_for(path) is None}
  if kept:
    raise readers.ReaderError(readers._refusal(  # pylint: disable=protected-access
        getattr(flat, 'source', 'the file'), kept,
        ', in a part of the file that is not dropped as bookkeeping'))
  records = [{'path': path, 'global': name, 'dropped_as': ledger.reason_for(path)}
             for path, name in neutralised.items()]
  if records:
    listed = '; '.join(f'{r["global"]} at {r["path"]!r} ({r["dropped_as"]})' for r in records[:6])
    warnings.warn(
        f'{len(records)} object(s) of the file were not rebuilt, because that would call code '
        f'named in the file: {listed}. They sit only in parts the conversion drops, so the '
        'weights are unaffected; they are listed under provenance.neutralised in '
        'metadata.json.', NeutralisedObjectWarning, stacklevel=3)
  return records


class NeutralisedObjectWarning(UserWarning):
  """A checkpoint named code that was not run, in a part the conversion drops."""


def convert_state(flat: Mapping[str, np.ndarray], *, method: str, arch: str | None = None,
                  arch_options: Mapping[str, Any] | None = None,
                  submodel: str | None = None) -> dict[str, Any]:
  """Converts a read checkpoint (``{name: array}``) into Flax variables.

  Args:
    flat: what a reader of :mod:`qscore_jax.convert.readers` returned.
    method: one of :data:`rules.CONVERTIBLE_METHODS`.
    arch, arch_options: the target architecture; inferred from the file when
      ``arch`` is omitted (options the weights cannot reveal, such as padding
      or the ViT head count, then come from the method's defaults and
      ``arch_options``). When given, it is cross-checked against the file.
    submodel: which network of the file (see :data:`rules.SUBMODELS`).

  Returns:
    ``{'model', 'variables', 'heads': {name: (HeadSpec, variables)}, 'arch',
    'arch_options', 'submodel', 'dropped'}``.
  """
  if method not in rules.RULES:
    raise ConversionError(f'unknown method {method!r}; convertible: '
                          f'{", ".join(rules.CONVERTIBLE_METHODS)}.')
  choices = rules.SUBMODELS[method]
  submodel = submodel or choices[0]
  if submodel not in choices:
    raise ConversionError(f'{method} checkpoints hold the sub-models {choices}, not {submodel!r}.')
  kind = _kind(arch) if arch else ('vit' if any(k.endswith('cls_token') for k in flat)
                                   else 'resnet')
  given = dict(arch_options or {})
  hints = {}
  if method == 'simclr' and arch:
    probe = registry.build_model(arch, **given)
    hints = {'stage_sizes': tuple(probe.stage_sizes), 'block': probe.block}

  ledger = rules.KeyLedger(flat)
  try:
    extraction = rules.RULES[method](ledger, kind, submodel, **hints)
  except ConversionError as error:
    _refuse_neutralised_in_kept_parts(flat, ledger)
    guesses = [(m, d) for m, d in rules.guess_method(flat) if m != method]
    hint = f' The file looks like {guesses[0][1]}: try --method {guesses[0][0]}.' if guesses else ''
    raise ConversionError(f'Cannot read the file as a {method} checkpoint: {error}{hint}') from None
  neutralised = _refuse_neutralised_in_kept_parts(flat, ledger)
  remaining = ledger.remaining()
  if remaining:
    raise _unmatched_error(method, remaining, list(flat))

  inferred = (infer_vit if kind == 'vit' else infer_resnet)(extraction.backbone)
  defaults = rules.METHOD_ARCH_DEFAULTS.get(method, {}).get(kind, {})
  if arch is None:
    arch = inferred['arch']
    options = {**defaults, **inferred['options'], **given}
  else:
    options = {**defaults, **given}
    # The file decides what the weights reveal; a different request is an error.
    requested = _architecture_facts(registry.build_model(arch, **options))
    found = _architecture_facts(registry.build_model(
        inferred['arch'], **{**inferred['options'],
                             **({'num_heads': 1} if kind == 'vit' else {})}))
    if kind == 'resnet' and 'stem' not in given and found['stem'] != requested['stem']:
      options['stem'] = found['stem']  # solo-learn CIFAR files: the stem is in the weights
      requested['stem'] = found['stem']
    differences = {k: (found[k], requested[k]) for k in found if found[k] != requested[k]}
    if differences:
      detail = ', '.join(f'{k}: file {f}, requested {r}' for k, (f, r) in differences.items())
      raise ConversionError(
          f'The file holds a {_describe(inferred["arch"], inferred["options"])} backbone, but '
          f'{_describe(arch, given)} was requested ({detail}). Pass --arch '
          f'{inferred["arch"]} (with the options above), or omit --arch to take it from the file.')
  model = registry.build_model(arch, **options)

  try:
    if kind == 'vit':
      variables = layout.vit_from_torch(extraction.backbone, num_heads=model.num_heads)
    else:
      variables = layout.resnet_from_torch(extraction.backbone)
  except layout.LayoutError as error:
    raise ConversionError(f'The {method} backbone does not have the {kind} layout: {error}') from None
  problems = tree_mismatches(abstract_variables(model), variables)
  if problems:
    raise ConversionError('\n'.join(
        [f'The converted weights do not fill {_describe(arch, options)} exactly:']
        + ['  ' + p for p in problems]))

  heads = {}
  for name, (state, activation, normalize_input) in extraction.heads.items():
    try:
      head_spec, head_vars = layout.mlp_head_from_torch(
          state, activation=activation, normalize_input=normalize_input)
    except layout.LayoutError as error:
      raise ConversionError(f'The {name} head of the file cannot be read: {error}') from None
    in_features = head_vars['params']['dense_0']['kernel'].shape[0]
    expected = jax.eval_shape(lambda s=head_spec, d=in_features: s.build().init(
        jax.random.key(0), jnp.zeros((2, d), jnp.float32)))
    problems = tree_mismatches(expected, head_vars)
    if problems:
      raise ConversionError('\n'.join([f'The {name} head is inconsistent:']
                                      + ['  ' + p for p in problems]))
    heads[name] = (head_spec, head_vars)
  return {'model': model, 'variables': variables, 'heads': heads, 'arch': arch,
          'arch_options': options, 'submodel': extraction.submodel,
          'dropped': ledger.dropped_summary(), 'facts': extraction.facts,
          'file_metadata': dict(getattr(flat, 'metadata', {})), 'neutralised': neutralised}


# ------------------------------------------------------- what a file is

# The backbone kinds each method published (a guess from the layout only
# considers these; --method converts any kind the rule reads).
RELEASED_KINDS = {
    'simclr': ('resnet',), 'swav': ('resnet',), 'moco': ('resnet',),
    'mocov3': ('resnet', 'vit'), 'byol': ('resnet',), 'dino': ('resnet', 'vit'),
    'simsiam': ('resnet',), 'vicreg': ('resnet',), 'barlowtwins': ('resnet',),
    'solo-learn': ('resnet', 'vit'),
}


def _is_local_checkpoint(reference: str) -> bool:
  """Whether ``reference`` names a file or TF1 checkpoint on disk rather than a registry id."""
  try:
    registry.get_model_spec(reference)
    return False
  except KeyError:
    pass
  path = pathlib.Path(reference).expanduser()
  return path.exists() or readers.is_tf1_checkpoint(path)


def methods_matching(flat: Mapping[str, np.ndarray], *, arch: str | None = None,
                     arch_options: Mapping[str, Any] | None = None,
                     submodel: str | None = None) -> list[str]:
  """The methods whose published layout converts ``flat`` completely.

  A method matches when its rule uses or drops every array of the file and the
  backbone it extracts fills the architecture exactly (the whole of
  :func:`convert_state`); only the backbone kinds the method released count.
  A bare torchvision ResNet backbone matches every method that publishes one.

  Args:
    flat: a read checkpoint (:func:`qscore_jax.convert.read_checkpoint`).
    arch, arch_options, submodel: as for :func:`convert_state`.
  Returns:
    The matching methods, in :data:`rules.CONVERTIBLE_METHODS` order.
  """
  kind = _kind(arch) if arch else ('vit' if any(k.endswith('cls_token') for k in flat)
                                   else 'resnet')
  candidates = []
  for method in rules.CONVERTIBLE_METHODS:
    if kind not in RELEASED_KINDS[method]:
      continue
    if submodel is not None and submodel not in rules.SUBMODELS[method]:
      continue
    ledger = rules.KeyLedger(flat)
    try:  # the rule alone first: cheap, and it rules out most methods
      rules.RULES[method](ledger, kind, submodel or rules.SUBMODELS[method][0])
    except (ConversionError, KeyError, ValueError, IndexError, TypeError):
      continue
    if not ledger.remaining():
      candidates.append(method)
  matching = []
  for method in candidates:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', NeutralisedObjectWarning)
        convert_state(flat, method=method, arch=arch, arch_options=arch_options,
                      submodel=submodel)
    except (ConversionError, readers.ReaderError):
      continue
    matching.append(method)
  return matching


def _method_from_layout(flat, source, **kwargs) -> str:
  """The one method whose layout the file has; else an error listing the candidates."""
  matching = methods_matching(flat, **kwargs)
  if len(matching) == 1:
    return matching[0]
  if matching:
    kind = 'vit' if any(k.endswith('cls_token') for k in flat) else 'resnet'
    ids = []  # one release of the same kind per method, as an example
    for candidate in matching:
      ids += [s.id for s in registry.list_models(candidate, include_unsupported=False)
              if _kind(s.arch) == kind][:1]
    raise ConversionError(
        f'{source} could be a checkpoint of any of {", ".join(matching)}: its layout (e.g. a '
        'bare backbone without heads or training state) does not tell them apart. Give '
        f'--method (one of {", ".join(matching)}), or the registry id of the release it is '
        f'(e.g. {", ".join(ids)}; `qscore models` lists them), which also sets its '
        'preprocessing.')
  guesses = rules.guess_method(flat)
  hint = (f' Its keys look most like {guesses[0][1]}; `--method {guesses[0][0]}` reports '
          'what does not fit.' if guesses else '')
  raise ConversionError(
      f'{source} has the layout of none of the published checkpoints qscore_jax converts '
      f'({", ".join(rules.CONVERTIBLE_METHODS)}).{hint}')


def release_preprocessing(method: str, arch_options: Mapping[str, Any]
                          ) -> registry.Preprocessing | None:
  """The evaluation preprocessing of ``method``'s releases, for a file converted without
  a registry id: the preset all its registry entries share (solo-learn: CIFAR
  statistics for the CIFAR stem, else ImageNet's). None when they differ.

  Args:
    method: a convertible method.
    arch_options: the converted architecture's options (``stem``).
  """
  if method == 'solo-learn':
    return registry.get_preprocessing(
        'cifar' if arch_options.get('stem') == 'cifar' else 'imagenet')
  presets = {spec.preprocessing.name for spec in registry.list_models()
             if spec.method == method and spec.preprocessing is not None}
  return registry.get_preprocessing(presets.pop()) if len(presets) == 1 else None


# ---------------------------------------------------------------- sources

def _registry_files(spec: registry.ModelSpec) -> list[tuple[str, str | None, str | None]]:
  """(url, sha256, md5 prefix) of every file of a registry entry."""
  if spec.files:
    base = spec.url.rstrip('/') + '/'
    digests = dict(spec.sha256) if isinstance(spec.sha256, Mapping) else {}
    return [(base + name, digests.get(name), None) for name in spec.files]
  sha = spec.sha256 if isinstance(spec.sha256, str) else None
  return [(spec.url, sha, spec.md5_prefix)]


def fetch_registry_files(spec: registry.ModelSpec, *, progress: bool = True
                         ) -> tuple[pathlib.Path, list[dict[str, Any]]]:
  """Downloads (or finds in the cache) the official file(s) of ``spec``.

  Returns the path to read (the file, or the TF1 checkpoint prefix) and, per
  file, ``{'url', 'path', 'sha256'}``.

  Args:
    spec: the registry entry.
    progress: show a download progress bar (default True).
  """
  folder = download_lib.cache_dir() / spec.id
  sources = []
  for url, sha, md5_prefix in _registry_files(spec):
    path = download_lib.download(url, folder / url.rsplit('/', 1)[-1], sha256=sha,
                                 md5_prefix=md5_prefix, progress=progress)
    sources.append({'url': url, 'path': str(path), 'sha256': sha})
  if spec.files:
    index = next(pathlib.Path(s['path']) for s in sources if s['path'].endswith('.index'))
    return index.with_suffix(''), sources
  return pathlib.Path(sources[0]['path']), sources


def _files_of(path: pathlib.Path) -> list[pathlib.Path]:
  """The files that make up a checkpoint given as file, TF1 prefix or directory."""
  if readers.is_tf1_checkpoint(path):
    prefix = readers._tf1_prefix(path)  # pylint: disable=protected-access
    return sorted(p for p in prefix.parent.glob(prefix.name + '.*')
                  if p.name.endswith('.index') or '.data-' in p.name)
  return [path]


def default_output_dir(model_id: str | None, method: str, source: pathlib.Path,
                       submodel: str, default_submodel: str) -> pathlib.Path:
  """``checkpoints/<model-id>`` (plus ``-<submodel>`` when not the default)."""
  name = model_id or f'{method}-{source.name.split(".")[0]}'
  if submodel != default_submodel:
    name += f'-{submodel}'
  return pathlib.Path('checkpoints') / name


def convert_checkpoint(model_id: str | None = None, *, file: str | os.PathLike | None = None,
                       method: str | None = None, arch: str | None = None,
                       arch_options: Mapping[str, Any] | None = None,
                       submodel: str | None = None,
                       out_dir: str | os.PathLike | None = None, save: bool = True,
                       overwrite: bool = False, progress: bool = True) -> ConvertedModel:
  """Converts an official checkpoint and (by default) saves it under ``checkpoints/``.

  Args:
    model_id: a registry id (``qscore models``); gives method, architecture,
      preprocessing and the official URL. Without ``file``, the file is
      downloaded (cached, sha256-verified where the registry knows it). The
      path of an existing local checkpoint is taken as ``file``.
    file: a local checkpoint: PyTorch file, TF1 prefix/.index/zip, BYOL pickle.
    method: one of the convertible methods; without it (and without
      ``model_id``) the method is the one whose published layout the file has
      (:func:`methods_matching`), and a file several methods could have written
      (a bare backbone) is an error that lists them.
    arch, arch_options: override or, without ``model_id``, choose the
      architecture; inferred from the file when omitted.
    submodel: which network of the file (e.g. DINO ``student``); default the
      one the authors evaluate.
    out_dir: where to save; default ``checkpoints/<model-id>``.
    save: write the orbax checkpoint and metadata.
    overwrite: replace an existing converted model (only a model qscore_jax wrote, once
      the new one is complete).
    progress: show download progress.

  Returns:
    The :class:`ConvertedModel`.

  Raises:
    qscore_jax.outputs.OutputError: the output directory holds a model and not
      ``overwrite``, or anything that is not a model qscore_jax wrote (nothing is deleted;
      a given ``out_dir`` is checked before any download or conversion).
  """
  if model_id is not None and file is None and _is_local_checkpoint(model_id):
    file, model_id = model_id, None  # `qscore convert path/to/file.pth.tar`: a path is a path
  try:
    spec = registry.get_model_spec(model_id) if model_id else None
  except KeyError as error:
    raise ConversionError(f'{model_id!r} is neither an existing checkpoint file nor a '
                          f'registry id: {error.args[0]}') from None
  if spec is not None and not spec.supported:
    raise ConversionError(f'{spec.id} cannot be converted yet: {spec.reason}')
  if spec is None and file is None:
    raise ConversionError('give a registry id (qscore models lists them), a --file, or both.')
  if save and out_dir is not None:  # before a download or a conversion; save_model rechecks
    outputs.check_output(out_dir, 'model', overwrite=overwrite, existing='refuse',
                         contents_ok=False)
  method = method or (spec.method if spec else None)
  if file is not None:
    source = pathlib.Path(file).expanduser()
    if not source.exists() and not readers.is_tf1_checkpoint(source):
      raise ConversionError(f'{source} does not exist.')
    sources = [{'url': spec.url if spec else None, 'path': str(p), 'sha256': None}
               for p in _files_of(source)]
  else:
    source, sources = fetch_registry_files(spec, progress=progress)
  if spec is not None and method != spec.method and method != 'solo-learn':
    raise ConversionError(f'{spec.id} is a {spec.method} checkpoint, not {method}.')

  for entry in sources:  # the digest of every file read, verified or not
    entry['sha256'] = download_lib.sha256_of(entry['path'])
  flat = readers.read_checkpoint(source)
  method_inferred = method is None
  if method is None:
    method = _method_from_layout(flat, source, arch=arch, arch_options=arch_options,
                                 submodel=submodel)
  arch = arch or (spec.arch if spec else None)
  options = {**(dict(spec.arch_options) if spec else {}), **dict(arch_options or {})}
  result = convert_state(flat, method=method, arch=arch, arch_options=options,
                         submodel=submodel)
  default_submodel = rules.SUBMODELS[method][0]
  preprocessing = spec.preprocessing if spec else release_preprocessing(
      method, result['arch_options'])
  provenance = {
      'source_url': spec.url if spec else None,
      'source_files': [{'name': pathlib.Path(s['path']).name, 'sha256': s['sha256'],
                        'url': s['url']} for s in sources],
      'source_sha256': sources[0]['sha256'] if len(sources) == 1 else None,
      'submodel': result['submodel'],
      'method_from': ('the registry entry' if spec else
                      'the file\'s layout' if method_inferred else 'the --method given'),
      'preprocessing_from': ('the registry entry' if spec else
                             f'the {method} releases' if preprocessing else 'none known'),
      'dropped': result['dropped'],
      'file_metadata': result['file_metadata'],
      'neutralised': result['neutralised'],
      **result['facts'],
  }
  metadata = {'model_id': spec.id if spec else None, 'method': method, 'arch': result['arch'],
              'arch_options': result['arch_options'],
              'preprocessing': preprocessing.to_json() if preprocessing else None,
              'heads': {n: s.to_json() for n, (s, _) in result['heads'].items()},
              'provenance': provenance}
  directory = None
  if save:
    target = pathlib.Path(out_dir) if out_dir else default_output_dir(
        spec.id if spec else None, method, pathlib.Path(sources[0]['path']),
        result['submodel'], default_submodel)
    directory = save_model(target, result['variables'], spec, arch=result['arch'],
                           arch_options=result['arch_options'], method=method,
                           preprocessing=preprocessing, heads=result['heads'],
                           provenance=provenance, overwrite=overwrite)
    metadata = json.loads((directory / 'metadata.json').read_text())
  heads = {name: (head_spec.build(), head_vars)
           for name, (head_spec, head_vars) in result['heads'].items()}
  return ConvertedModel(result['model'], result['variables'], heads, metadata, directory)


__all__ = ['ConversionError', 'ConvertedModel', 'HeadSpec', 'NeutralisedObjectWarning',
           'RELEASED_KINDS', 'convert_checkpoint', 'methods_matching', 'release_preprocessing',
           'convert_state', 'fetch_registry_files', 'infer_resnet', 'infer_vit']

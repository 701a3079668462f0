"""Architectures by name, and the registry of published SSL checkpoints.

``ARCHITECTURES`` maps a name (``'resnet50'``, ``'vit_small'``, ...) to a
constructor; :func:`build_model` applies options on top. The registry of
published checkpoints lives in ``checkpoints/registry.toml`` (installed as the
package data ``qscore_jax.checkpoints``): one entry per official file, with the
architecture options its weights cannot reveal, the preprocessing its authors
used, and where it comes from. :func:`get_model_spec` reads one entry.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import tomllib
from typing import Any, Callable, Mapping

import flax.linen as nn

from qscore_jax._text import did_you_mean
from qscore_jax.data.preprocessing import Preprocessing  # also registry.Preprocessing
from qscore_jax.models.resnet import ResNet, STAGE_SIZES
from qscore_jax.models.vit import VisionTransformer


def _resnet(depth: int, **defaults) -> Callable[..., nn.Module]:
  block = 'basic' if depth < 50 else 'bottleneck'
  return functools.partial(ResNet, stage_sizes=STAGE_SIZES[depth], block=block,
                           **defaults)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    'resnet18': _resnet(18),
    'resnet34': _resnet(34),
    'resnet50': _resnet(50),
    'resnet101': _resnet(101),
    'resnet152': _resnet(152),
    'resnet200': _resnet(200),
    'wide_resnet50_2': _resnet(50, width_per_group=128),
    'vit_small': functools.partial(VisionTransformer, embed_dim=384, depth=12,
                                   num_heads=6),
    'vit_base': functools.partial(VisionTransformer, embed_dim=768, depth=12,
                                  num_heads=12),
}


def build_model(arch: str, **options: Any) -> nn.Module:
  """Builds the Flax backbone ``arch`` with ``options`` overriding its defaults.

  >>> model = build_model('resnet50', width_multiplier=2)
  >>> model.num_features
  4096

  Args:
    arch: a name of :data:`ARCHITECTURES`.
    **options: module attributes (e.g. ``width_multiplier``, ``num_heads``,
      ``dtype``) overriding the architecture's defaults.
  Raises:
    ValueError: unknown architecture (with close names).
    TypeError: an invalid option (listing the valid ones).
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f'Unknown architecture {arch!r}.{did_you_mean(arch, ARCHITECTURES)} '
                     f'Known: {", ".join(ARCHITECTURES)}.')
  try:
    return ARCHITECTURES[arch](**options)
  except TypeError as error:
    fields = [f.name for f in dataclasses.fields(ARCHITECTURES[arch].func)
              if f.name not in ('parent', 'name')]
    raise TypeError(f'Invalid option for architecture {arch!r}: {error}. '
                    f'Valid options: {", ".join(fields)}.') from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One published checkpoint: what to build, how to feed it, where it comes from.

  Attributes:
    id: the registry id (e.g. ``'dino-vits16'``).
    method: one of :data:`METHODS`.
    arch: a name of :data:`ARCHITECTURES`.
    arch_options: constructor options the weights cannot reveal (padding,
      width multiplier, head count, ...).
    preprocessing: the authors' evaluation :class:`Preprocessing`.
    url: the official download address.
    container: how the file is laid out: ``torch_flat``, ``torch_state_dict``,
      ``torch_full``, ``tf1`` or ``byol_pickle``.
    files: for multi-file sources (SimCLR v2 TF1), the file names under ``url``.
    sha256: digest of the official file (or ``{file: digest}``), when known.
    md5_prefix: the md5 prefix a README publishes (MoCo), checked after download.
    licence: the weights' licence.
    supported: False when the architecture is not implemented.
    reason: why it is not supported.
    notes: anything a user must know.
  """
  id: str
  method: str
  arch: str
  arch_options: Mapping[str, Any]
  preprocessing: Preprocessing
  url: str
  container: str
  files: tuple[str, ...] = ()
  sha256: str | Mapping[str, str] | None = None
  md5_prefix: str | None = None
  licence: str = ''
  supported: bool = True
  reason: str = ''
  notes: str = ''

  def build(self, **overrides: Any) -> nn.Module:
    """The Flax backbone for this checkpoint (``overrides`` e.g. ``dtype``)."""
    if not self.supported:
      raise NotImplementedError(f'{self.id} is not supported yet: {self.reason}')
    return build_model(self.arch, **{**self.arch_options, **overrides})


METHODS = ('simclr', 'swav', 'moco', 'mocov3', 'byol', 'dino', 'simsiam',
           'vicreg', 'barlowtwins')
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)} - {'id'}


def _registry_text() -> str:
  return (importlib.resources.files('qscore_jax.checkpoints')
          .joinpath('registry.toml').read_text(encoding='utf-8'))


@functools.cache
def _load_registry() -> tuple[dict[str, ModelSpec], dict[str, Preprocessing]]:
  data = tomllib.loads(_registry_text())
  licences = data.get('licences', {})
  presets = {name: Preprocessing(name=name, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
             for name, table in data['preprocessing'].items()}
  specs = {}
  for model_id, table in data['models'].items():
    unknown = set(table) - _MODEL_KEYS
    if unknown:
      raise ValueError(f'registry.toml: model {model_id!r} has unknown keys {sorted(unknown)}.')
    if table['method'] not in METHODS:
      raise ValueError(f'registry.toml: model {model_id!r} has unknown method '
                       f'{table["method"]!r}; known: {METHODS}.')
    if table['arch'] not in ARCHITECTURES:
      raise ValueError(f'registry.toml: model {model_id!r} has unknown arch {table["arch"]!r}.')
    specs[model_id] = ModelSpec(
        id=model_id, **{**table, 'arch_options': dict(table.get('arch_options', {})),
                        'files': tuple(table.get('files', ())),
                        'licence': table.get('licence') or licences.get(table['method'], ''),
                        'preprocessing': presets[table['preprocessing']]})
  return specs, presets


def list_models(method: str | None = None, *, include_unsupported: bool = True
                ) -> list[ModelSpec]:
  """All registered checkpoints, optionally of one method.

  Args:
    method: only this method (one of :data:`METHODS`); None for all.
    include_unsupported: also the entries whose architecture is not
      implemented (default True).
  Raises:
    ValueError: unknown method.
  """
  specs = _load_registry()[0].values()
  if method is not None and method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; known: {", ".join(METHODS)}.')
  return [s for s in specs if (method is None or s.method == method)
          and (include_unsupported or s.supported)]


def get_model_spec(model_id: str) -> ModelSpec:
  """The registry entry ``model_id`` (e.g. ``'dino-vits16'``)."""
  specs = _load_registry()[0]
  if model_id not in specs:
    raise KeyError(f'No registered model {model_id!r}.{did_you_mean(model_id, specs)} '
                   'Run `qscore models` to list them.')
  return specs[model_id]


def get_preprocessing(name: str) -> Preprocessing:
  """A named preprocessing preset of the registry (e.g. ``'imagenet'``).

  Args:
    name: the preset's name (a ``[preprocessing.<name>]`` table of ``registry.toml``).
  Raises:
    KeyError: unknown preset.
  """
  presets = _load_registry()[1]
  if name not in presets:
    raise KeyError(f'No preprocessing preset {name!r}; known: {", ".join(presets)}.')
  return presets[name]

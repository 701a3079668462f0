r"""Fine-tuning (or pre-training) with an SSL method and the Q-Score regularizer.

One config for every method; the argument after the colon overrides fields:

    qscore finetune --config finetune:method=simclr,dataset=synthetic_shapes \
        --init random --workdir /tmp/simclr

    qscore finetune --config finetune:method=byol,dataset=imagenet100,batch_size=1024 \
        --init byol-r50 --workdir runs/byol_qreg              # regularizer on by default

Fields are documented inline below. ``None`` means "the method's official
value" (heads, optimizer, learning rate = base_lr x batch / 256, warm-up).
Unknown fields are errors, and so are values out of range (:func:`check_config`,
run after every override and when a run starts). Expected figures for the shipped experiment configs
are in their own docstrings (``qscore_jax/configs/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib

import ml_collections

from qscore_jax import regularizer, validation
from qscore_jax.models import precision


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config, with ``arg`` (``key=value,key.sub=value,...``) applied."""
  c = ml_collections.ConfigDict()
  c.method = 'simclr'  # simclr | byol | simsiam | vicreg | barlowtwins | mocov2 | mocov3 | swav | dino
  c.dataset = 'synthetic_shapes'       # any name of `qscore datasets`
  c.split = 'train'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.image_size = ml_collections.config_dict.placeholder(int)  # default: the model's / dataset's
  c.arch = ml_collections.config_dict.placeholder(str)  # default: the init's, or resnet18
  c.arch_options = ml_collections.ConfigDict()  # e.g. width_multiplier, stem (random init)
  # Computation dtype: auto (bfloat16 on TPU/GPU, float32 on CPU) | float32 | bfloat16.
  # Parameters, optimizer state, BatchNorm statistics, losses and regularizer stay float32.
  c.dtype = 'auto'
  c.batch_size = 256                   # global batch, divisible by the number of devices
  c.num_epochs = 50.0                  # the paper's fine-tuning schedule
  c.num_steps = -1                     # > 0 overrides num_epochs
  c.seed = 0
  # Lower bound of the global views' crop area (None: the method's, 0.08 for most).
  c.min_crop_scale = ml_collections.config_dict.placeholder(float)

  c.heads = ml_collections.ConfigDict()
  c.heads.projector_hidden = ml_collections.config_dict.placeholder(int)
  c.heads.projector_out = ml_collections.config_dict.placeholder(int)
  c.heads.predictor_hidden = ml_collections.config_dict.placeholder(int)
  c.heads.prototypes = ml_collections.config_dict.placeholder(int)  # swav 3000, dino 65536

  c.loss = ml_collections.ConfigDict()  # method options; unset = official values
  placeholder = ml_collections.config_dict.placeholder
  c.loss.temperature = placeholder(float)  # simclr, mocov2, mocov3, swav
  c.loss.sim_coeff = placeholder(float)  # vicreg
  c.loss.std_coeff = placeholder(float)
  c.loss.cov_coeff = placeholder(float)
  c.loss.lambd = placeholder(float)  # barlowtwins
  c.loss.queue_size = placeholder(int)  # mocov2 (65536)
  c.loss.queue_length = placeholder(int)  # swav (0: no queue; official 3840 per 256 images)
  c.loss.epsilon = placeholder(float)  # swav Sinkhorn
  c.loss.sinkhorn_iterations = placeholder(int)
  c.loss.freeze_prototypes_steps = placeholder(int)  # swav (313)
  c.loss.student_temperature = placeholder(float)  # dino
  c.loss.teacher_temperature = placeholder(float)
  c.loss.warmup_teacher_temperature = placeholder(float)
  c.loss.warmup_teacher_steps = placeholder(int)
  c.loss.center_momentum = placeholder(float)
  c.loss.freeze_last_layer_steps = placeholder(int)
  c.ema_base = placeholder(float)  # target momentum (byol, mocov2, mocov3, dino)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = ml_collections.config_dict.placeholder(str)  # lars | sgd | adamw
  c.optimizer.learning_rate = 1e-5     # absolute (the paper's fine-tuning lr); None: recipe
  c.optimizer.base_learning_rate = ml_collections.config_dict.placeholder(float)
  c.optimizer.weight_decay = ml_collections.config_dict.placeholder(float)
  c.optimizer.momentum = 0.9
  c.optimizer.warmup_epochs = 0.0      # fine-tuning starts from a trained model
  c.optimizer.schedule = 'cosine'      # cosine | constant

  c.regularizer = ml_collections.ConfigDict()
  c.regularizer.kind = 'qscore'        # qscore | l1 | none
  c.regularizer.lambda1 = 1e-4
  c.regularizer.lambda2 = 1e-4
  c.regularizer.normalization = 'sum'  # sum | mean
  c.regularizer.stop_gradient = True
  c.regularizer.views = 'all'          # all | first
  c.regularizer.discriminative = 'fixed'  # fixed (from the initial model) | batch
  c.regularizer.refresh_every = 0      # steps between recomputations of a fixed D (0: never)
  c.regularizer.reference_examples = 10000  # examples embedded to compute the fixed D
  c.regularizer.eps = 4.0
  c.regularizer.band = (50.0, 95.0)

  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.best_metric = 'loss'               # a logged metric (lower is better) for best/
  c.log_every_steps = 10
  c.export_model = True                # write <workdir>/model (for qscore embed/compare)
  c.progress = True
  c.lock()
  if arg:
    apply_overrides(c, arg.split(','))
  return c


def for_method(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config with ``method=<method>`` and then ``arg`` applied (the per-method configs)."""
  return get_config(','.join(part for part in (f'method={method}', arg) if part))


def with_defaults(arg: str, defaults: dict, what: str, methods) -> ml_collections.ConfigDict:
  """The config of ``arg`` (which must name the method) with ``defaults`` for the fields
  ``arg`` does not set (the dataset-level configs ``imagenet100``, ``imagenet1k``).

  Args:
    arg: ``method=<name>,key=value,...``; must contain ``method=``.
    defaults: ``{top-level field: value}`` applied unless ``arg`` sets the field.
    what: the config's name, for the error message.
    methods: the method names listed in the error message.
  Raises:
    ValueError: ``arg`` does not name the method.
  """
  if not arg or 'method=' not in arg:
    raise ValueError(f'{what} needs the method: --config {what}:method=<one of '
                     f'{", ".join(methods)}>.')
  config = get_config(arg)
  given = {item.split('=', 1)[0] for item in arg.split(',')}
  for key, value in defaults.items():
    if key not in given:
      config[key] = value
  return config


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  if ':' in text and text.replace(':', '').replace('.', '').replace('-', '').isdigit():
    return tuple(_parse_value(part) for part in text.split(':'))
  return text


def apply_overrides(config: ml_collections.ConfigDict, items) -> ml_collections.ConfigDict:
  """Applies ``key=value`` strings (dotted keys; ``a:b`` for tuples) to a locked config.

  Values are read as int, float, bool, ``none`` or ``a:b`` tuples, except that a
  string field keeps the text as it is; ``arch_options.<name>`` may add new keys.

  Args:
    config: the locked ``ConfigDict``, changed in place (and returned).
    items: the ``key=value`` strings; empty items are skipped.
  Raises:
    ValueError: for an unknown field (with the closest names), a malformed item, or
      a value out of its range (:func:`check_config`).
  """
  for item in items:
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config override {item!r} is not KEY=VALUE.')
    node, parts = config, key.split('.')
    for depth, part in enumerate(parts):
      known = list(node.keys())
      if part not in known:
        if depth == 1 and parts[0] == 'arch_options':  # free-form architecture options
          break
        path = '.'.join(parts[:depth])
        close = difflib.get_close_matches(part, known, n=3)
        hint = f' Did you mean {", ".join(close)}?' if close else ''
        raise ValueError(f'unknown config field {key!r}{" in " + path if path else ""}.{hint} '
                         f'Known fields here: {", ".join(sorted(known))}.')
      if depth < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]] if parts[-1] in node else None
    if isinstance(current, tuple):  # a:b:c; words stay words
      parsed = tuple(part if current and isinstance(current[0], str) else _parse_value(part)
                     for part in value.split(':') if part)
    else:
      parsed = value if isinstance(current, str) else _parse_value(value)  # 'none' stays a word
    with config.unlocked() if parts[0] == 'arch_options' else contextlib.nullcontext():
      try:
        _set(config, parts, parsed)
      except TypeError as error:
        raise ValueError(f'config field {key!r} cannot take {value!r}: {error}') from None
  return check_config(config)


# The range of each numeric field of the finetune, experiment and study configs (dotted path ->
# keyword arguments of validation.check_number). None is allowed only where the field's
# default is None ("the method's official value"); num_steps, seeds, band and the
# regularizer's own fields are checked below.
_POSITIVE_INT = {'minimum': 1, 'integer': True}
_COUNT = {'minimum': 0, 'integer': True}
_RANGES = {
    'batch_size': _POSITIVE_INT, 'num_epochs': {'above': 0}, 'seed': _COUNT,
    'checkpoint_every_steps': _POSITIVE_INT, 'keep_checkpoints': _POSITIVE_INT,
    'log_every_steps': _POSITIVE_INT, 'width_multiplier': {'above': 0},
    'pretrain_steps': _POSITIVE_INT, 'finetune_steps': _POSITIVE_INT,
    'learning_rate': {'above': 0}, 'finetune_lr_fraction': {'above': 0},
    'regularizer.reference_examples': _POSITIVE_INT,
    'checkpoints': _POSITIVE_INT, 'supervised_steps': _POSITIVE_INT, 'eps': {'above': 0},
    'knn_k': _POSITIVE_INT, 'consistency_k': _POSITIVE_INT,
    'bootstrap_resamples': _COUNT,
    'optimizer.momentum': {'minimum': 0, 'below': 1},
    'optimizer.warmup_epochs': {'minimum': 0},
}
_OPTIONAL_RANGES = {
    'image_size': _POSITIVE_INT, 'min_crop_scale': {'above': 0, 'maximum': 1},
    'heads.projector_hidden': _POSITIVE_INT, 'heads.projector_out': _POSITIVE_INT,
    'heads.predictor_hidden': _POSITIVE_INT, 'heads.prototypes': _POSITIVE_INT,
    'loss.temperature': {'above': 0}, 'loss.student_temperature': {'above': 0},
    'loss.teacher_temperature': {'above': 0},
    'loss.warmup_teacher_temperature': {'above': 0},
    'loss.sim_coeff': {'minimum': 0}, 'loss.std_coeff': {'minimum': 0},
    'loss.cov_coeff': {'minimum': 0}, 'loss.lambd': {'minimum': 0},
    'loss.queue_size': _COUNT, 'loss.queue_length': _COUNT, 'loss.epsilon': {'above': 0},
    'loss.sinkhorn_iterations': _POSITIVE_INT, 'loss.freeze_prototypes_steps': _COUNT,
    'loss.warmup_teacher_steps': _COUNT, 'loss.freeze_last_layer_steps': _COUNT,
    'loss.center_momentum': {'minimum': 0, 'maximum': 1},
    'ema_base': {'minimum': 0, 'maximum': 1},
    'optimizer.learning_rate': {'above': 0}, 'optimizer.base_learning_rate': {'above': 0},
    'optimizer.weight_decay': {'minimum': 0},
}


def _lookup(config, path: str):
  """``(True, value)`` of a dotted field, or ``(False, None)`` when the config lacks it."""
  node = config
  for part in path.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False, None
    node = node[part]
  return True, node


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the range of every numeric field a finetune or experiment config has.

  The one place these ranges live: :func:`apply_overrides` (``--set``, ``--config
  name:k=v``) and the drivers (``finetune.loop.run``, ``experiment.run_experiment``)
  call it. The regularizer's fields are checked by
  :class:`~qscore_jax.regularizer.RegularizerConfig` itself.

  Args:
    config: a finetune or experiment ``ConfigDict`` (fields it lacks are skipped).
  Returns:
    ``config`` (unchanged).
  Raises:
    InputError: (a ValueError) naming the field, its value and the allowed range.
  """
  for ranges, optional in ((_RANGES, False), (_OPTIONAL_RANGES, True)):
    for path, limits in ranges.items():
      present, value = _lookup(config, path)
      if present and not (optional and value is None):
        validation.check_number(value, f'config field {path!r}', **limits)
  present, steps = _lookup(config, 'num_steps')
  if present and steps != -1:
    validation.check_number(steps, "config field 'num_steps'", minimum=1, integer=True,
                            hint='Give -1 to train for num_epochs instead.')
  present, seeds = _lookup(config, 'seeds')
  if present:
    if not seeds:
      raise validation.InputError("config field 'seeds' is empty: give at least one seed, "
                                  'e.g. seeds=0:1:2.')
    for seed in seeds:
      validation.check_number(seed, "config field 'seeds' entry", minimum=0, integer=True)
  present, dtype = _lookup(config, 'dtype')
  if present and dtype not in precision.CHOICES:
    raise validation.InputError(f"config field 'dtype' is {dtype!r}; give one of "
                                f"{', '.join(precision.CHOICES)}.")
  present, removed = _lookup(config, 'compression_removed')
  if present:
    for fraction in removed:
      validation.check_number(fraction, "config field 'compression_removed' entry",
                              minimum=0, below=1)
  present, options = _lookup(config, 'regularizer')
  if present:
    fields = {f.name for f in dataclasses.fields(regularizer.RegularizerConfig)}
    given = {k: (tuple(v) if k == 'band' else v) for k, v in dict(options).items()
             if k in fields}
    regularizer.RegularizerConfig(**given)
  return config


def _set(config, parts, value):
  node = config
  for part in parts[:-1]:
    node = node[part]
  if isinstance(node[parts[-1]] if parts[-1] in node else None, float) and isinstance(value, int):
    value = float(value)
  node[parts[-1]] = value

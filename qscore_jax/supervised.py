"""Supervised training of a backbone from scratch: a reference encoder for the analysis.

A ResNet (or ViT) with a linear classifier, trained with cross-entropy, SGD with
momentum and a cosine schedule on light augmentations (random resized crop and
flip: :func:`qscore_jax.data.ssl_batches` with one view), in a jitted
data-parallel step whose BatchNorm statistics are global over the mesh. It
gives the project an encoder to analyse before the SSL fine-tuning core exists,
and a supervised baseline beside SSL encoders afterwards. The result is saved
like any converted model (``save_model``), classifier included as a head.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qscore_jax import outputs, parallel, validation
from qscore_jax.data import augment, dataset_info, native_preprocessing, ssl_batches
from qscore_jax.models import build_model, init_variables, save_model
from qscore_jax.models.heads import HeadLayer, HeadSpec


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
  """Options of :func:`train_supervised`.

  Attributes:
    arch: backbone architecture (default ``'resnet18'``).
    arch_options: ``(name, value)`` pairs passed to ``build_model``.
    dataset: training dataset; its ``train`` split is used
      (default ``'synthetic_shapes'``).
    steps: training steps (default 1000).
    batch_size: global batch (default 128).
    learning_rate: peak learning rate of the warmup + cosine schedule (default 0.1).
    momentum: Nesterov SGD momentum (default 0.9).
    weight_decay: L2 weight decay added to the gradient of the kernels (arrays
      with more than one dimension) (default 5e-4).
    warmup_steps: linear warmup steps, at most ``steps // 10`` (default 50).
    crop_scale: area range of the random resized crop (default 0.5 to 1).
    seed: seed of the initialisation and the data order.
    data_dir: tfds data directory (default: the usual one).
  """
  arch: str = 'resnet18'
  arch_options: tuple[tuple[str, Any], ...] = ()
  dataset: str = 'synthetic_shapes'
  steps: int = 1000
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_steps: int = 50
  crop_scale: tuple[float, float] = (0.5, 1.0)
  seed: int = 0
  data_dir: str | None = None

  def __post_init__(self):
    validation.check_number(self.steps, 'steps', minimum=1, integer=True)
    validation.check_number(self.batch_size, 'batch_size', minimum=1, integer=True)
    validation.check_number(self.learning_rate, 'learning_rate', above=0)
    validation.check_number(self.momentum, 'momentum', minimum=0, below=1)
    validation.check_number(self.weight_decay, 'weight_decay', minimum=0)
    validation.check_number(self.warmup_steps, 'warmup_steps', minimum=0, integer=True)
    if len(self.crop_scale) != 2 or not all(
        isinstance(x, (int, float)) and 0 < x <= 1 for x in self.crop_scale) or \
        self.crop_scale[0] > self.crop_scale[1]:
      raise validation.InputError(f'crop_scale must be two area fractions with '
                                  f'0 < lo <= hi <= 1, got {self.crop_scale}.')
    validation.check_number(self.seed, 'seed', minimum=0, integer=True)


def train_supervised(config: SupervisedConfig, out_dir: str | pathlib.Path, *,
                     log_every: int = 50, overwrite: bool = False) -> pathlib.Path:
  """Trains ``config.arch`` on ``config.dataset`` and saves it; returns the directory.

  Args:
    config: the options (:class:`SupervisedConfig`).
    out_dir: the saved model's directory (``save_model``; the classifier is
      saved as the head ``classifier``).
    log_every: print and record loss and batch accuracy every this many steps
      (default 50).
    overwrite: replace an existing model in ``out_dir`` (default False; only a model
      qscore_jax wrote is replaced, once the new one is complete).
  Raises:
    qscore_jax.outputs.OutputError: before training, when ``out_dir`` holds a model and not
      ``overwrite``, or anything that is not a model qscore_jax wrote.
  """
  outputs.check_output(out_dir, 'model', overwrite=overwrite, existing='refuse',
                       contents_ok=False)  # before training; save_model checks again
  info = dataset_info(config.dataset, config.data_dir)
  preprocessing = native_preprocessing(info)
  size = preprocessing.image_size
  recipe = augment.Recipe('supervised', (augment.ViewSpec(
      size, scale=config.crop_scale, jitter=0.0, grayscale=0.0),))
  batches = ssl_batches(config.dataset, 'train', recipe=recipe, batch_size=config.batch_size,
                        seed=config.seed, preprocessing=preprocessing, data_dir=config.data_dir)
  options = dict(config.arch_options)
  model = build_model(config.arch, **options)
  classifier_spec = HeadSpec((HeadLayer(info.num_classes),))
  classifier = classifier_spec.build()
  key = jax.random.key(config.seed)
  variables = init_variables(model, key, (1, size, size, 3))
  head = classifier.init(jax.random.fold_in(key, 1), jnp.zeros((1, model.num_features)))
  params = {'backbone': variables['params'], 'classifier': head['params']}
  batch_stats = variables.get('batch_stats', {})

  warmup = min(config.warmup_steps, config.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                max(config.steps, warmup + 1))
  optimizer = optax.chain(
      optax.add_decayed_weights(config.weight_decay,
                                mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  opt_state = optimizer.init(params)

  def loss_fn(params, batch_stats, images, labels):
    features, updates = model.apply({'params': params['backbone'], 'batch_stats': batch_stats},
                                    images, train=True, mutable=['batch_stats'])
    logits = classifier.apply({'params': params['classifier']}, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates.get('batch_stats', {}), jnp.mean(jnp.argmax(logits, -1) == labels))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, batch_stats, opt_state, images, labels):
    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, accuracy

  mesh = parallel.data_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  params, batch_stats, opt_state = jax.device_put((params, batch_stats, opt_state), replicated)
  start = time.perf_counter()
  history = []
  for step, batch in enumerate(batches):
    if step == config.steps:
      break
    arrays = parallel.global_batch({'images': batch['views'][0], 'labels': batch['label']}, mesh)
    params, batch_stats, opt_state, loss, accuracy = train_step(
        params, batch_stats, opt_state, arrays['images'], arrays['labels'])
    if step % log_every == 0 or step == config.steps - 1:
      history.append({'step': step, 'loss': float(loss), 'accuracy': float(accuracy),
                      'seconds': round(time.perf_counter() - start, 1)})
      if jax.process_index() == 0:
        print(f"step {step:5d}  loss {float(loss):.4f}  batch accuracy {float(accuracy):.3f}  "
              f"{time.perf_counter() - start:.0f} s", flush=True)
  params = jax.device_get(params)
  return save_model(
      out_dir, {'params': params['backbone'], 'batch_stats': jax.device_get(batch_stats)},
      arch=config.arch, arch_options=options, method='supervised', preprocessing=preprocessing,
      heads={'classifier': (classifier_spec, {'params': params['classifier']})},
      provenance={'trained_by': 'qscore_jax.supervised.train_supervised',
                  'config': {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in dataclasses.asdict(config).items()},
                  'history': history},
      overwrite=overwrite)


__all__ = ['SupervisedConfig', 'train_supervised']

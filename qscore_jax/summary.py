"""Embed a generated batch with a model and summarise its representations.

The quickest end-to-end check of an install or of a converted checkpoint:
build (or load) a backbone, run the jitted forward pass on a batch of
generated images, and report throughput and the representation statistics the
Q-Score method is built on (per-sample mean/std, highly active features).
``qscore inspect`` prints :func:`format_report` of :func:`inspect_model`.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qscore_jax import stats
from qscore_jax.models import registry, weights
from qscore_jax.models import embed, init_variables


def resolve_model(ref: str) -> tuple[nn.Module, Any, dict[str, Any]]:
  """Model, variables and a description for ``ref``.

  Args:
    ref: a directory written by ``save_model`` or the id of a shipped model
      (stored weights), a registry id or an architecture name (randomly
      initialised weights: ``variables`` is ``None``).
  Returns:
    ``(module, variables, description)``; ``description`` holds name, method,
    arch, arch_options, preprocessing and weights (the directory, or None).
  Raises:
    FileNotFoundError: ``ref`` is a path ending in a registry id that holds no
      saved model (``qscore convert <id>`` first), or a directory that is not one.
    ValueError: ``ref`` is nothing known (with close names).
  """
  path = (weights.shipped_model_dir(ref) if ref in weights.SHIPPED_MODELS
          else pathlib.Path(ref).expanduser())
  if (path / weights.METADATA_FILE).is_file():
    model, variables, metadata = weights.load_model(path)
    pre = metadata.get('preprocessing')
    return model, variables, {
        'name': metadata.get('model_id') or str(path), 'method': metadata.get('method'),
        'arch': metadata['arch'], 'arch_options': metadata['arch_options'],
        'preprocessing': registry.Preprocessing.from_json(pre) if pre else None,
        'weights': str(path.resolve())}
  if str(ref) != path.name or path.is_dir():  # a path, not a bare id: never random weights
    unconverted = weights.unconverted_model_error(ref)
    if unconverted is not None:
      raise unconverted
  try:
    spec = registry.get_model_spec(ref)
  except KeyError:
    spec = None
  if spec is not None:
    return spec.build(), None, {
        'name': spec.id, 'method': spec.method, 'arch': spec.arch,
        'arch_options': dict(spec.arch_options), 'preprocessing': spec.preprocessing,
        'weights': None}
  if ref in registry.ARCHITECTURES:
    return registry.build_model(ref), None, {
        'name': ref, 'method': None, 'arch': ref, 'arch_options': {},
        'preprocessing': registry.get_preprocessing('imagenet'), 'weights': None}
  if path.exists():
    raise FileNotFoundError(f'{path} is not a saved model ({weights.METADATA_FILE} missing).')
  raise ValueError(
      f'{ref!r} is neither a saved model directory, a registry id nor an '
      f'architecture.{registry.did_you_mean(ref, [s.id for s in registry.list_models()] + list(registry.ARCHITECTURES))} '
      'Run `qscore models` for the registry ids.')


def generated_images(batch_size: int, height: int, width: int,
                     seed: int = 0) -> np.ndarray:
  """Smooth random RGB images in [0, 1], (batch_size, height, width, 3), float32.

  Each image is a random mixture of coloured blobs over a gradient: enough
  structure that a convolutional net responds like to a photograph, not like
  to white noise.

  Args:
    batch_size: number of images.
    height: image height in pixels.
    width: image width in pixels.
    seed: NumPy seed; the same seed gives the same images.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width),
                       indexing='ij')
  images = np.empty((batch_size, height, width, 3), np.float32)
  for i in range(batch_size):
    gradient = rng.uniform(0, 1, 3) * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)[..., None]
    image = 0.3 + 0.3 * gradient
    for _ in range(rng.integers(2, 6)):
      cy, cx = rng.uniform(0, 1, 2)
      radius = rng.uniform(0.05, 0.3)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
      image = image + blob[..., None] * rng.uniform(-0.6, 0.6, 3)
    images[i] = np.clip(image, 0, 1)
  return images


def representation_summary(h: np.ndarray, eps: float = stats.DEFAULT_EPS) -> dict[str, Any]:
  """Summary statistics of representations ``h`` (N, d).

  Args:
    h: representations (N, d).
    eps: the highly-active threshold in per-sample stds (default 4).
  Returns:
    A JSON-serialisable dict: N, d, global mean/std/min/max, fractions of zero
    and finite entries, average per-sample mean and std, ``eps``, |L_i|
    statistics and the number of features ever highly active.
  """
  h = np.asarray(h)
  # A diverged model is still inspected: the per-sample statistics are over its finite
  # rows (fraction_finite says how many entries are not).
  rows = h[np.isfinite(h).all(axis=1)]
  mu, sigma = (np.asarray(a) for a in stats.sample_moments(rows))
  active = np.asarray(stats.highly_active(rows, eps))
  if not len(rows):  # nothing finite: no per-sample statistics
    mu = sigma = np.full(1, np.nan)
  per_sample = active.sum(axis=1) if len(rows) else np.zeros(1, int)
  return {
      'num_samples': int(h.shape[0]), 'dim': int(h.shape[1]),
      'mean': float(h.mean()), 'std': float(h.std()),
      'min': float(h.min()), 'max': float(h.max()),
      'fraction_zero': float(np.mean(h == 0)),
      'fraction_finite': float(np.mean(np.isfinite(h))),
      'sample_mean_avg': float(mu.mean()), 'sample_std_avg': float(sigma.mean()),
      'eps': eps,
      'highly_active_per_sample': {'mean': float(per_sample.mean()),
                                   'min': int(per_sample.min()),
                                   'max': int(per_sample.max())},
      'features_ever_highly_active': int(active.any(axis=0).sum()),
  }


def inspect_model(ref: str, *, batch_size: int = 8, image_size: int | None = None,
                  seed: int = 0, repeats: int = 3) -> dict[str, Any]:
  """Embeds a generated batch with model ``ref`` and reports what happened.

  Args:
    ref: saved-model directory, shipped model id (``demo-simclr-r18w025``),
      registry id (e.g. ``'dino-vits16'``) or architecture name (e.g.
      ``'resnet50'``); see :func:`resolve_model`.
    batch_size: images in the generated batch.
    image_size: square input side; defaults to the model's preprocessing size.
    seed: seeds the images and, for random weights, the initialisation.
    repeats: timed forward passes after the compiling one.
  Returns:
    A JSON-serialisable dict: model description, timings, representation
    statistics (see :func:`representation_summary`).
  """
  if batch_size < 1 or repeats < 1:
    raise ValueError('batch_size and repeats must be at least 1.')
  model, variables, info = resolve_model(ref)
  pre = info['preprocessing']
  size = image_size or (pre.image_size if pre else 224)
  images01 = generated_images(batch_size, size, size, seed)
  images = pre.normalize(images01) if pre else images01
  random_weights = variables is None
  if random_weights:
    variables = init_variables(model, jax.random.key(seed), (1, size, size, 3))

  start = time.perf_counter()
  h = embed(model, variables, images).block_until_ready()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    embed(model, variables, images).block_until_ready()
    times.append(time.perf_counter() - start)
  step = float(np.median(times))
  return {
      'model': info['name'], 'method': info['method'], 'arch': info['arch'],
      'arch_options': info['arch_options'],
      'preprocessing': pre.to_json() if pre else None,
      'weights': info['weights'] or 'random initialisation',
      'batch_shape': list(images.shape),
      'device': str(jax.devices()[0].platform), 'num_devices': jax.device_count(),
      'compile_and_first_run_s': first, 'step_s': step,
      'images_per_s': batch_size / step,
      'representation': representation_summary(np.asarray(h)),
  }


def format_report(report: dict[str, Any]) -> str:
  """Human-readable text of an :func:`inspect_model` report.

  Args:
    report: the dict returned by :func:`inspect_model`.
  Returns:
    Multi-line text (no trailing newline).
  """
  rep = report['representation']
  options = ', '.join(f'{k}={v}' for k, v in report['arch_options'].items())
  pre = report['preprocessing']
  lines = [
      f"model        {report['model']}  ({report['method'] or 'no method'}; "
      f"{report['arch']}{' ' + options if options else ''})",
      f"weights      {report['weights']}",
      f"input        generated batch {tuple(report['batch_shape'])}, "
      + (f"preprocessing {pre['name']}" if pre else 'no preprocessing'),
      f"device       {report['device']} x{report['num_devices']}",
      f"speed        {report['images_per_s']:.1f} images/s "
      f"({report['step_s'] * 1e3:.0f} ms per batch; compile + first run "
      f"{report['compile_and_first_run_s']:.1f} s)",
      f"representation  N={rep['num_samples']}, d={rep['dim']}; "
      f"mean {rep['mean']:.4g}, std {rep['std']:.4g}, range [{rep['min']:.4g}, {rep['max']:.4g}]",
      f"  zeros          {100 * rep['fraction_zero']:.1f}% of entries",
  ]
  if rep['fraction_finite'] < 1:
    lines.append(f"  NON-FINITE     {100 * (1 - rep['fraction_finite']):.2f}% of entries are NaN/inf")
  active = rep['highly_active_per_sample']
  lines += [
      f"  per sample     mean mu_i {rep['sample_mean_avg']:.4g}, mean sigma_i {rep['sample_std_avg']:.4g}",
      f"  highly active  |L_i| (h_ij > mu_i + {rep['eps']:g} sigma_i): mean {active['mean']:.1f}, "
      f"min {active['min']}, max {active['max']}; "
      f"{rep['features_ever_highly_active']} of {rep['dim']} features active for some sample",
  ]
  if report['weights'] == 'random initialisation':
    lines.append('note         random weights: pass a directory saved by '
                 'qscore_jax.models.save_model to inspect trained weights.')
  return '\n'.join(lines)

"""Input-pipeline throughput against embedding throughput (the input must not be the bottleneck).

Measures, on this machine, images per second of:

  * the evaluation pipeline (JPEG decode, resize 256, center crop 224, normalise) over an
    ImageNet-like folder of JPEGs (500x375, quality 90, generated here);
  * SSL training pipelines over the same folder: BYOL's two 224 views and DINO's
    2 x 224 + 8 x 96 multi-crop (each counted per *image*);
  * the same pipelines on the built-in synthetic_shapes (64 px), and how fast that
    dataset is generated;
  * end to end: the evaluation pipeline feeding the jitted ResNet-18 / ResNet-50 forward
    pass, and the whole embedding driver (pipeline + model + resumable store,
    ``qscore_jax.embed.embed_dataset``), against the forward pass alone on batches already
    in memory (same process, interleaved rounds, medians; a fresh process per architecture).

Run (about 10 minutes on 2 cores):

    python benchmarks/input_pipeline.py --out benchmarks/results/input_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)


def _rate(iterable, images_per_item, passes=2, warmup=1):
  """Images per second over ``passes`` full iterations after ``warmup`` ones."""
  for _ in range(warmup):
    for _ in iterable:
      pass
  count, start = 0, time.perf_counter()
  for _ in range(passes):
    for item in iterable:
      count += images_per_item(item)
  return count / (time.perf_counter() - start)


def _jpeg_folder(root: pathlib.Path, count: int) -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from qscore_jax.summary import generated_images  # pylint: disable=import-outside-toplevel
  for i in range(count):
    folder = root / f'class{i % 4}'
    folder.mkdir(parents=True, exist_ok=True)
    image = (generated_images(1, 375, 500, seed=i)[0] * 255).astype(np.uint8)
    noise = np.random.default_rng(i).integers(0, 40, image.shape, dtype=np.uint8)
    Image.fromarray(image // 2 + noise).save(folder / f'{i:04d}.jpg', quality=90)
  return f'folder:{root}'


def end_to_end(arch: str, folder: str, batch_size: int, rounds: int = 3) -> dict:
  """Forward pass alone (batches in memory), fed by the pipeline, and the whole store driver."""
  import jax  # pylint: disable=import-outside-toplevel
  import qscore_jax  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import eval_batches  # pylint: disable=import-outside-toplevel
  from qscore_jax.embed import embed_dataset, make_embed_step  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import build_model, get_model_spec  # pylint: disable=import-outside-toplevel
  model = build_model(arch)
  variables = jax.tree.map(
      lambda s: np.full(s.shape, 0.01, np.float32) if s.ndim > 1 else np.ones(s.shape, np.float32),
      qscore_jax.abstract_variables(model))
  pre = get_model_spec('swav-r50-800ep').preprocessing
  batches = eval_batches(folder, 'train', batch_size=batch_size, process_count=1,
                         local_device_count=1, preprocessing=pre)
  step = make_embed_step(model)  # the driver's own (cached) step
  cached = [batch['image'] for batch in batches]
  count = batches.num_examples
  step(variables, cached[0]).block_until_ready()
  alone, fed, driver = [], [], []
  for round_ in range(rounds):
    start = time.perf_counter()
    for images in cached:
      step(variables, images).block_until_ready()
    alone.append(count / (time.perf_counter() - start))
    start = time.perf_counter()
    for batch in batches:
      step(variables, batch['image']).block_until_ready()
    fed.append(count / (time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      embed_dataset(model, variables, folder, 'train', pathlib.Path(tmp) / f'store{round_}',
                    batch_size=batch_size, preprocessing=pre, progress=False)
      driver.append(count / (time.perf_counter() - start))
  return {f'embed_{arch}_alone': float(np.median(alone)),
          f'embed_{arch}_fed_by_pipeline': float(np.median(fed)),
          f'embed_{arch}_store_driver': float(np.median(driver))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--images', type=int, default=256, help='JPEGs in the generated folder')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--end-to-end', nargs=2, metavar=('ARCH', 'FOLDER'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.end_to_end:
    print(json.dumps(end_to_end(*args.end_to_end, args.batch_size)))
    return

  import jax  # pylint: disable=import-outside-toplevel
  import qscore_jax  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import eval_batches, ssl_batches, synthetic  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import get_model_spec  # pylint: disable=import-outside-toplevel

  results = {'cpu_cores': os.cpu_count(), 'batch_size': args.batch_size,
             'images': args.images, 'versions': {'jax': jax.__version__,
                                                  'qscore_jax': qscore_jax.__version__}}
  pre = get_model_spec('swav-r50-800ep').preprocessing
  per_batch = lambda batch: int(batch['mask'].sum()) if 'mask' in batch else len(batch['id'])  # pylint: disable=unnecessary-lambda-assignment

  with tempfile.TemporaryDirectory() as tmp:
    folder = _jpeg_folder(pathlib.Path(tmp) / 'jpegs', args.images)
    data_dir = str(pathlib.Path(tmp) / 'tfds')
    common = dict(batch_size=args.batch_size, process_count=1, local_device_count=1)

    evaluation = eval_batches(folder, 'train', preprocessing=pre, **common)
    results['eval_jpeg_224'] = _rate(evaluation, per_batch)
    byol = ssl_batches(folder, recipe='byol', image_size=224, preprocessing=pre, epochs=1,
                       **common)
    results['ssl_byol_2x224'] = _rate(byol, per_batch)
    dino = ssl_batches(folder, recipe='dino', image_size=224, preprocessing=pre, epochs=1,
                       **common)
    results['ssl_dino_2x224_8x96'] = _rate(dino, per_batch, passes=1)

    params = synthetic.ShapesParams()
    start = time.perf_counter()
    for i in range(1000):
      synthetic.generate(params, 0, 'train', i)
    results['synthetic_generation'] = 1000 / (time.perf_counter() - start)
    shapes = eval_batches('synthetic_shapes', 'test', data_dir=data_dir, **common)
    results['eval_synthetic_64'] = _rate(shapes, per_batch)
    shapes_ssl = ssl_batches('synthetic_shapes', recipe='simclr', data_dir=data_dir, epochs=1,
                             **common)
    results['ssl_synthetic_simclr_2x64'] = _rate(shapes_ssl, per_batch, passes=1)

    # End to end, each architecture in a fresh process (no state left by the runs above).
    for arch in ('resnet18', 'resnet50'):
      out = subprocess.run([sys.executable, __file__, '--end-to-end', arch, folder,
                            '--batch-size', str(args.batch_size)],
                           capture_output=True, text=True, check=True).stdout
      results.update(json.loads(out.strip().splitlines()[-1]))

  rows = [('eval pipeline, JPEG 500x375 -> 224', 'eval_jpeg_224'),
          ('SSL BYOL, 2 views 224', 'ssl_byol_2x224'),
          ('SSL DINO, 2 x 224 + 8 x 96', 'ssl_dino_2x224_8x96'),
          ('synthetic_shapes generation (numpy)', 'synthetic_generation'),
          ('eval pipeline, synthetic_shapes 64', 'eval_synthetic_64'),
          ('SSL SimCLR, synthetic_shapes 2 x 64', 'ssl_synthetic_simclr_2x64'),
          ('ResNet-18 224 forward alone (in-memory batches)', 'embed_resnet18_alone'),
          ('ResNet-18 224 forward fed by the eval pipeline', 'embed_resnet18_fed_by_pipeline'),
          ('ResNet-50 224 forward alone (in-memory batches)', 'embed_resnet50_alone'),
          ('ResNet-50 224 forward fed by the eval pipeline', 'embed_resnet50_fed_by_pipeline'),
          ('ResNet-18 224, whole driver (pipeline + model + store)', 'embed_resnet18_store_driver'),
          ('ResNet-50 224, whole driver (pipeline + model + store)', 'embed_resnet50_store_driver')]
  print('| what | images/s |\n|---|---|')
  for label, key in rows:
    print(f'| {label} | {results[key]:.1f} |')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(results | {'cpu': _common.cpu_name(), 'cpu_flags': _common.cpu_flag_summary()},
                f, indent=2)


if __name__ == '__main__':
  main()

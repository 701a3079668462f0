r"""On whatever JAX backend is present: ResNet-50 embedding and SimCLR training, float32 and bfloat16.

    bash benchmarks/accelerator.sh           # = python benchmarks/accelerator.py --out ...

One process, one device (the first); every figure is a median of ``--rounds`` timed calls
after a compiling one:

* **GEMM peak**: the fastest square matrix product (2048 on a CPU, 8192 elsewhere) in
  float32 and in bfloat16: what the "MFU" columns divide by (the device's measured peak in
  that dtype, not a datasheet figure; the datasheet's is printed beside it when known);
* **embedding**: ``qscore_jax.models.embed`` of ResNet-50 at 224 px (the converters'
  architecture, random weights) in float32 and bfloat16, at batch 128 and 256 (8 and 16
  on a CPU): images/s, and MFU = the FLOPs XLA counts for the compiled step / time / peak;
* **training**: the project's SimCLR + Q-Score-regularizer train step
  (``qscore_jax.finetune.core``: two views, projector, NT-Xent, regularizer, LARS) on
  ResNet-50, float32 and bfloat16, batch 128 (8 on a CPU): images/s and MFU;
* **input pipeline**: the evaluation pipeline (JPEG decode, resize 256, crop 224,
  normalise) over generated 500x375 JPEGs: images/s, and per host core;
* **torchvision** (on a GPU only): ResNet-50 inference, ``channels_last``, float32 and
  ``autocast`` bfloat16, and ``torch.compile`` if it compiles within ``--compile-timeout``.

On a CPU it runs in a few minutes with the small batches; on one GPU in under 8.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)

# Dense peak TFLOP/s from the vendors' datasheets (no sparsity), for the printout only.
DATASHEET_TFLOPS = {'H100': {'bfloat16': 989, 'float32': 67},
                    'H200': {'bfloat16': 989, 'float32': 67},
                    'A100': {'bfloat16': 312, 'float32': 19.5},
                    'TPU v4': {'bfloat16': 275}, 'TPU v5 lite': {'bfloat16': 197},
                    'TPU v5p': {'bfloat16': 459}}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _median_seconds(fn, rounds: int) -> float:
  return _common.median_seconds(fn, rounds, warmup=1)  # the first call compiles


def _row(dtype: str, batch: int, seconds: float, flops: float | None,
         peak: dict[str, float]) -> dict:
  """Images/s, achieved TFLOP/s and MFU (against the measured peak in that dtype)."""
  tflops = flops / seconds / 1e12 if flops else None
  return {'dtype': dtype, 'batch': batch, 'images_per_s': batch / seconds, 'tflops': tflops,
          'mfu': tflops / peak[dtype] if tflops else None}


def _flops(jitted, *args) -> float | None:
  """The FLOPs XLA counts for one call of a jitted function (None where it does not say)."""
  try:
    analysis = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def gemm_peak(size: int, rounds: int) -> dict[str, float]:
  """Measured TFLOP/s of a size^3 matrix product per dtype."""
  out = {}
  key = jax.random.key(0)
  for name, dtype in DTYPES.items():
    a = jax.random.normal(key, (size, size), dtype)
    # The faster of a result in the dtype and float32 accumulation: XLA:CPU reaches AMX
    # only with the latter (4x), which the models' bfloat16 dots use, so a peak without it
    # would put their MFU above 100%.
    best = min(_median_seconds(lambda m=matmul: m(a, a).block_until_ready(), rounds)
               for matmul in (jax.jit(jnp.dot), jax.jit(
                   lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))))
    out[name] = 2 * size ** 3 / best / 1e12
  return out


def embedding(batches, rounds: int, peak: dict[str, float]) -> list[dict]:
  from qscore_jax.models import build_model, init_variables  # pylint: disable=import-outside-toplevel
  from qscore_jax.models.variables import embed  # pylint: disable=import-outside-toplevel
  rows = []
  variables = None
  for dtype_name, dtype in DTYPES.items():
    model = build_model('resnet50', dtype=dtype)
    if variables is None:
      variables = jax.device_put(init_variables(model, jax.random.key(0), (1, 224, 224, 3)))
    step = jax.jit(lambda v, x, m=model: embed(m, v, x))
    for batch in batches:
      images = jax.random.normal(jax.random.key(1), (batch, 224, 224, 3), jnp.float32)
      seconds = _median_seconds(lambda: step(variables, images).block_until_ready(), rounds)
      flops = _flops(step, variables, images)
      rows.append(_row(dtype_name, batch, seconds, flops, peak))
      print(f'embed resnet50 {dtype_name} batch {batch}: {batch / seconds:.1f} img/s',
            flush=True)
  return rows


def training(batch: int, rounds: int, peak: dict[str, float]) -> list[dict]:
  from qscore_jax import regularizer  # pylint: disable=import-outside-toplevel
  from qscore_jax.finetune import core, get_method  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import build_model, init_variables  # pylint: disable=import-outside-toplevel
  rows = []
  method = get_method('simclr')
  for dtype_name, dtype in DTYPES.items():
    model = build_model('resnet50', dtype=dtype)
    variables = init_variables(model, jax.random.key(0), (1, 224, 224, 3))
    heads = method.build_heads(model.num_features, {})
    tx, schedule = core.make_optimizer('lars', 0.1, weight_decay=1e-6, momentum=0.9,
                                       total_steps=1000, warmup_steps=0)
    trainer = core.Trainer(model, heads, method, (('temperature', 0.1),), tx, schedule,
                           regularizer.RegularizerConfig(lambda1=1e-4, lambda2=1e-4), 1000)
    state = core.create_state(trainer, variables,
                              core.init_heads(trainer, jax.random.key(1), model.num_features),
                              np.ones(model.num_features, bool))
    state = jax.device_put(state)
    key = jax.random.key(2)
    views = (jax.random.normal(key, (batch // 2, 224, 224, 3)),
             jax.random.normal(jax.random.fold_in(key, 1), (batch // 2, 224, 224, 3)))
    # Not donated here: the same state is stepped again in every timed call.
    step = jax.jit(lambda s, v: core.train_step(trainer, s, v))
    flops = _flops(step, state, views)
    seconds = _median_seconds(lambda: jax.block_until_ready(step(state, views)), rounds)
    rows.append(_row(dtype_name, batch, seconds, flops, peak))
    print(f'train simclr+reg resnet50 {dtype_name} batch {batch}: {batch / seconds:.1f} img/s',
          flush=True)
  return rows


def input_pipeline(images: int, batch: int) -> dict:
  from input_pipeline import _jpeg_folder, _rate  # pylint: disable=import-outside-toplevel
  from qscore_jax.data import eval_batches  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import registry  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as work:
    folder = _jpeg_folder(pathlib.Path(work), images)
    batches = eval_batches(folder, 'train', batch_size=batch, process_count=1,
                           local_device_count=1,
                           preprocessing=registry.get_preprocessing('imagenet'))
    rate = _rate(batches, lambda b: int(b['mask'].sum()), passes=2, warmup=1)
  cores = os.cpu_count() or 1
  return {'images_per_s': rate, 'host_cores': cores, 'images_per_s_per_core': rate / cores}


def torchvision_gpu(batch: int, rounds: int, compile_timeout: float) -> dict | None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  torch.backends.cudnn.benchmark = True
  model = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
  x = torch.randn(batch, 3, 224, 224, device='cuda').contiguous(memory_format=torch.channels_last)

  def timed(fn):
    with torch.no_grad():
      return batch / _common.median_seconds(lambda: (fn(), torch.cuda.synchronize()), rounds,
                                            warmup=1)

  def bf16():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      model(x)
  out = {'device': torch.cuda.get_device_name(), 'batch': batch,
         'channels_last_float32': timed(lambda: model(x)), 'autocast_bfloat16': timed(bf16)}
  try:
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
      compiled(x)
    torch.cuda.synchronize()
    if time.perf_counter() - start < compile_timeout:
      def compiled_bf16():
        with torch.autocast('cuda', dtype=torch.bfloat16):
          compiled(x)
      out['compile_autocast_bfloat16'] = timed(compiled_bf16)
  except Exception as error:  # pylint: disable=broad-except  # inductor may be missing
    out['compile_error'] = f'{type(error).__name__}: {error}'[:300]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=None, help='timed calls (default 5; 2 on CPU)')
  parser.add_argument('--compile-timeout', type=float, default=180)
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  device = jax.devices()[0]
  cpu = device.platform == 'cpu'
  rounds = args.rounds or (2 if cpu else 5)
  started = time.perf_counter()
  peak = gemm_peak(2048 if cpu else 8192, rounds)
  print(f'GEMM peak: {peak}', flush=True)
  result = {
      'backend': device.platform, 'device': getattr(device, 'device_kind', str(device)),
      'cpu': _common.cpu_name(), 'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d'),
      'gemm_tflops': peak,
      'datasheet_tflops': next((v for k, v in DATASHEET_TFLOPS.items()
                                if k in getattr(device, 'device_kind', '')), None),
      'embedding': embedding((8, 16) if cpu else (128, 256), rounds, peak),
      'training': training(8 if cpu else 128, rounds, peak),
      'input_pipeline': input_pipeline(64 if cpu else 512, 16 if cpu else 128),
      'torchvision': None if cpu else torchvision_gpu(256, rounds, args.compile_timeout)}
  result['seconds'] = time.perf_counter() - started
  print(json.dumps(result, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
  sys.exit(main())

"""Embedding throughput: qscore_jax Flax ResNets against torchvision, same run.

For each model (ResNet-50, ResNet-18) and batch size (32, 64) at 224x224 fp32,
one worker process per XLA configuration times, in interleaved rounds:

  * the jitted qscore_jax forward pass (``qscore_jax.embed``),
  * torchvision eager in the default (NCHW) memory format,
  * torchvision eager with ``channels_last``,
  * a 2048^3 fp32 GEMM in JAX, PyTorch and NumPy (the machine's peak).

Interleaving makes the ratios robust on a shared machine; absolute numbers
drift from run to run. XLA configurations (flags are read once per process):

  * ``qscore_jax``: what ``import qscore_jax`` sets up (convolutions on XLA's
    own kernels, dots on YNNPACK; see ``qscore_jax/_xla_cpu.py``),
  * ``jaxlib-default``: jaxlib 0.10's defaults (``QSCORE_JAX_KEEP_XLA_FLAGS=1``),
    which hand convolutions to YNNPACK,
  * ``no-ynnpack`` (not run by default): no YNNPACK at all, dots included.

Run (about 15 minutes on 2 cores; needs torch and torchvision: ``pip install -e ".[test]"`` in
this clone, ``pip install "qscore-jax[test]"`` for an installed package):

    python benchmarks/embedding_throughput.py --out benchmarks/results/embedding_throughput.json
    python benchmarks/embedding_throughput.py --archs resnet50 --batches 32 \
        --configs qscore_jax no-ynnpack jaxlib-default --out benchmarks/results/xla_configs.json

It prints the Markdown table that ``benchmarks/README.md`` holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)

CONFIGS = {
    'qscore_jax': {},
    'jaxlib-default': {'QSCORE_JAX_KEEP_XLA_FLAGS': '1'},
    # Neither convolutions nor dots on YNNPACK: everything on XLA's Eigen kernels.
    'no-ynnpack': {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='},
}


def worker(arch: str, batch: int, rounds: int) -> dict:
  """Runs in a fresh process; returns medians of interleaved rounds."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  import qscore_jax  # pylint: disable=import-outside-toplevel
  from qscore_jax.convert.layout import resnet_from_torch  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import build_model, embed  # pylint: disable=import-outside-toplevel

  torch.set_grad_enabled(False)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)

  # Both frameworks run the same (torchvision-initialised) weights.
  reference = getattr(torchvision.models, arch)().eval()
  reference.fc = torch.nn.Identity()
  model = build_model(arch)
  variables = jax.device_put(resnet_from_torch(
      {k: v.numpy() for k, v in reference.state_dict().items()}))
  images_jax = jnp.asarray(images)
  start = time.perf_counter()
  embed(model, variables, images_jax).block_until_ready()
  compile_s = time.perf_counter() - start

  macs = []
  hooks = [m.register_forward_hook(lambda mod, _i, out: macs.append(
      out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]))
           for m in reference.modules() if isinstance(m, torch.nn.Conv2d)]
  images_nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  reference(images_nchw[:1])
  for hook in hooks:
    hook.remove()
  gflops_per_image = 2 * sum(macs) / 1e9
  reference_cl = copy.deepcopy(reference).to(memory_format=torch.channels_last)
  images_cl = images_nchw.contiguous(memory_format=torch.channels_last)
  reference(images_nchw)
  reference_cl(images_cl)

  n = 2048
  a_jax = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32))
  matmul = jax.jit(jnp.dot)
  matmul(a_jax, a_jax).block_until_ready()
  a_np = np.asarray(a_jax)
  a_torch = torch.from_numpy(a_np.copy())

  samples = {k: [] for k in ('jax', 'torch', 'torch_cl', 'gemm_jax', 'gemm_torch', 'gemm_numpy')}
  for _ in range(rounds):
    samples['jax'].append(_common.median_seconds(
        lambda: embed(model, variables, images_jax).block_until_ready(), 1))
    samples['torch'].append(_common.median_seconds(lambda: reference(images_nchw), 1))
    samples['torch_cl'].append(_common.median_seconds(lambda: reference_cl(images_cl), 1))
    samples['gemm_jax'].append(_common.median_seconds(lambda: matmul(a_jax, a_jax).block_until_ready(), 3))
    samples['gemm_torch'].append(_common.median_seconds(lambda: torch.mm(a_torch, a_torch), 3))
    samples['gemm_numpy'].append(_common.median_seconds(lambda: a_np @ a_np, 3))
  med = {k: statistics.median(v) for k, v in samples.items()}
  gemm = {k: 2 * n**3 / med[f'gemm_{k}'] / 1e9 for k in ('jax', 'torch', 'numpy')}
  return {
      'arch': arch, 'batch': batch, 'rounds': rounds, 'compile_s': compile_s,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'gflops_per_image': gflops_per_image,
      'images_per_s': {k: batch / med[k] for k in ('jax', 'torch', 'torch_cl')},
      'gemm_gflops': gemm,
      'torch_threads': torch.get_num_threads(),
      'versions': {'jax': jax.__version__, 'torch': torch.__version__,
                   'qscore_jax': qscore_jax.__version__},
  }


def table(results: list[dict]) -> str:
  rows = ['| model | batch | XLA config | Flax img/s | torch img/s | torch channels_last img/s '
          '| Flax / torch | Flax / channels_last | Flax % of GEMM peak |',
          '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ips = r['images_per_s']
    peak = max(r['gemm_gflops'].values())
    rows.append(
        f"| {r['arch']} | {r['batch']} | {r['config']} | {ips['jax']:.2f} | {ips['torch']:.2f} "
        f"| {ips['torch_cl']:.2f} | {ips['jax'] / ips['torch']:.2f}x "
        f"| {ips['jax'] / ips['torch_cl']:.2f}x "
        f"| {100 * ips['jax'] * r['gflops_per_image'] / peak:.0f}% |")
  return '\n'.join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--archs', nargs='+', default=['resnet50', 'resnet18'])
  parser.add_argument('--batches', nargs='+', type=int, default=[32, 64])
  parser.add_argument('--configs', nargs='+', default=['qscore_jax', 'jaxlib-default'],
                      choices=list(CONFIGS))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', help='write all results as JSON here')
  parser.add_argument('--worker', nargs=3, metavar=('ARCH', 'BATCH', 'ROUNDS'),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
    return

  results = []
  for arch in args.archs:
    for batch in args.batches:
      for config in args.configs:
        env = {k: v for k, v in os.environ.items()
               if k not in ('XLA_FLAGS', 'QSCORE_JAX_KEEP_XLA_FLAGS')}
        env.update(CONFIGS[config])
        out = subprocess.run(
            [sys.executable, __file__, '--worker', arch, str(batch), str(args.rounds)],
            env=env, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1]) | {'config': config}
        results.append(result)
        print(f"{arch} batch {batch} {config}: {result['images_per_s']}", file=sys.stderr)
  peak = max(max(r['gemm_gflops'].values()) for r in results)
  print(f"CPU: {_common.cpu_name()}, {os.cpu_count()} cores; fp32 GEMM peak measured "
        f"{peak:.0f} GFLOP/s (best of JAX, torch, NumPy; per-row peaks in the JSON); "
        f"jax {results[0]['versions']['jax']}, torch {results[0]['versions']['torch']}, "
        f"torch threads {results[0]['torch_threads']}.\n")
  print(table(results))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump({'cpu': _common.cpu_name(), 'cpu_flags': _common.cpu_flag_summary(), 'cores': os.cpu_count(), 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()

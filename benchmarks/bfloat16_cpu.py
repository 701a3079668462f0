r"""bfloat16 on this CPU: qscore_jax's ResNets against PyTorch's, side by side in one process.

    python benchmarks/bfloat16_cpu.py --out benchmarks/results/bfloat16_cpu.json

For each architecture (ResNet-50, ResNet-18, ViT-S/16 with ``--archs vit_small``; 224 px,
batch 32; the ResNets run the same torchvision weights in both frameworks, the ViT timm's own
random weights) it times, in interleaved rounds (medians):

* Flax float32, Flax bfloat16 as the library runs it on this CPU (on a CPU with AMX-BF16 or
  AVX512-BF16: the convolutions' dots in bfloat16, ``qscore_jax.models.cpu_conv``), and
  Flax bfloat16 with that path turned off (``QSCORE_JAX_CPU_BF16_DOTS=0``: bfloat16
  activations, which XLA:CPU converts to float32 around every convolution);
* torchvision eager ``channels_last`` in float32 and under ``torch.autocast`` bfloat16 (oneDNN),
  and ``torch.compile`` + autocast (skipped with ``--no-compile``);
* the 4096^2 bfloat16 matrix product: JAX with a bfloat16 result, JAX accumulating in float32
  (``preferred_element_type``), PyTorch.

Each bfloat16 row also reports the largest relative error of its representations against
Flax float32 (max |h_bf16 - h_fp32| / max |h_fp32|). The table names the CPU and its
bfloat16 flags. About 10 minutes on 2 cores (``torch.compile`` takes 1-2 of them).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)
import qscore_jax
from qscore_jax.convert.layout import resnet_from_torch
from qscore_jax.models import build_model, init_variables, precision


def _compiled(arch: str, dtype, dots: bool, variables, images):
  """The forward pass compiled with the matrix-unit path on or off (read when traced)."""
  model = build_model(arch, dtype=dtype)
  previous = os.environ.get(precision.DOTS_ENV)
  os.environ[precision.DOTS_ENV] = '1' if dots else '0'
  try:
    return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables,
                                                                      images).compile()
  finally:
    if previous is None:
      os.environ.pop(precision.DOTS_ENV)
    else:
      os.environ[precision.DOTS_ENV] = previous


def measure(arch: str, batch: int, rounds: int, compile_torch: bool) -> dict:
  torch.set_grad_enabled(False)
  torch.manual_seed(0)
  images = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
  if arch.startswith('vit'):
    # timm's ViT of the same shape; each framework its own random weights (timing only).
    import timm  # pylint: disable=import-outside-toplevel
    reference = timm.create_model(f'{arch}_patch16_224', num_classes=0).eval()
    variables = jax.device_put(init_variables(build_model(arch), jax.random.key(0),
                                              (1, 224, 224, 3)))
  else:
    reference = getattr(torchvision.models, arch)().eval()
    reference.fc = torch.nn.Identity()
    variables = jax.device_put(resnet_from_torch(
        {k: v.numpy() for k, v in reference.state_dict().items()}))
  x = jnp.asarray(images)
  flax = {'flax_fp32': _compiled(arch, jnp.float32, False, variables, x),
          'flax_bf16': _compiled(arch, jnp.bfloat16, True, variables, x),
          'flax_bf16_no_dots': _compiled(arch, jnp.bfloat16, False, variables, x)}
  outputs = {name: np.asarray(fn(variables, x), np.float64) for name, fn in flax.items()}

  cl = copy.deepcopy(reference).to(memory_format=torch.channels_last)
  images_cl = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)

  def autocast(module):
    def run():
      with torch.autocast('cpu', dtype=torch.bfloat16):
        return module(images_cl)
    return run

  calls = {name: (lambda fn=fn: fn(variables, x).block_until_ready())
           for name, fn in flax.items()}
  calls['torch_cl_fp32'] = lambda: cl(images_cl)
  calls['torch_cl_bf16'] = autocast(cl)
  compile_s = None
  if compile_torch:
    compiled = torch.compile(cl)
    start = time.perf_counter()
    autocast(compiled)()
    compile_s = time.perf_counter() - start
    calls['torch_compile_bf16'] = autocast(compiled)
  torch_out = {name: calls[name]().float().numpy().astype(np.float64)
               for name in calls if name.startswith('torch')}
  samples = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      samples[name].append(_common.median_seconds(call, 1))
  ips = {name: batch / statistics.median(times) for name, times in samples.items()}
  high = outputs['flax_fp32']

  def error(low):
    return float(np.abs(low - high).max() / np.abs(high).max())

  return {'arch': arch, 'batch': batch, 'rounds': rounds, 'images_per_s': ips,
          'max_relative_error': {**{n: error(o) for n, o in outputs.items() if n != 'flax_fp32'},
                                 **{n: error(o) for n, o in torch_out.items()}},
          'torch_compile_s': compile_s}


def gemm(rounds: int) -> dict[str, float]:
  """GFLOP/s of a 4096^2 bfloat16 matrix product three ways."""
  n = 4096
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  bf16_out = jax.jit(jnp.dot)
  f32_acc = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))
  t = torch.from_numpy(np.asarray(a.astype(jnp.float32))).to(torch.bfloat16)
  seconds = {
      'jax_bf16_out': _common.median_seconds(lambda: bf16_out(a, a).block_until_ready(),
                                             rounds, warmup=1),
      'jax_f32_accumulation': _common.median_seconds(
          lambda: f32_acc(a, a).block_until_ready(), rounds, warmup=1),
      'torch': _common.median_seconds(lambda: torch.mm(t, t), rounds, warmup=1)}
  return {name: 2 * n ** 3 / s / 1e9 for name, s in seconds.items()}


COLUMNS = (('flax_fp32', 'Flax fp32'), ('flax_bf16', 'Flax bf16'),
           ('flax_bf16_no_dots', 'Flax bf16, dots off'), ('torch_cl_fp32', 'torch cl fp32'),
           ('torch_cl_bf16', 'torch cl autocast bf16'),
           ('torch_compile_bf16', 'torch.compile + autocast bf16'))


def table(rows: list[dict]) -> str:
  names = [(key, label) for key, label in COLUMNS if key in rows[0]['images_per_s']]
  out = ['| model | batch | ' + ' | '.join(f'{label} img/s' for _, label in names)
         + ' | Flax bf16 / torch autocast | Flax bf16 / torch.compile | max rel. error of h, '
         'Flax bf16 (dots off) |',
         '|---|---|' + '---|' * (len(names) + 3)]
  for row in rows:
    ips, err = row['images_per_s'], row['max_relative_error']
    compiled = (f"{ips['flax_bf16'] / ips['torch_compile_bf16']:.2f}x"
                if 'torch_compile_bf16' in ips else '-')
    out.append(f"| {row['arch']} | {row['batch']} | "
               + ' | '.join(f'{ips[key]:.1f}' for key, _ in names)
               + f" | **{ips['flax_bf16'] / ips['torch_cl_bf16']:.2f}x** | {compiled} "
               f"| {err['flax_bf16']:.4f} ({err['flax_bf16_no_dots']:.4f}) |")
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--archs', nargs='+', default=['resnet50', 'resnet18'])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--no-compile', action='store_true', help='skip torch.compile')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  rows = [measure(arch, args.batch, args.rounds, not args.no_compile) for arch in args.archs]
  peaks = gemm(args.rounds)
  units = precision.cpu_bf16_units()
  header = (f"CPU: {_common.cpu_name()}, {os.cpu_count()} cores, bfloat16 units: "
            f"{', '.join(units) or 'none'}; jax {jax.__version__}, torch {torch.__version__}, "
            f"qscore_jax {qscore_jax.__version__}; 4096^2 bf16 GEMM GFLOP/s: JAX bf16 out "
            f"{peaks['jax_bf16_out']:.0f}, JAX float32 accumulation "
            f"{peaks['jax_f32_accumulation']:.0f}, torch {peaks['torch']:.0f}.")
  print(header + '\n')
  print(table(rows))
  if args.out:
    _common.write_json(args.out, {
        'cpu': _common.cpu_name(), 'cores': os.cpu_count(), 'bf16_units': units,
        'flags': sorted(precision.cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16',
                                                'amx_tile'}),
        'gemm_gflops': peaks, 'results': rows})


if __name__ == '__main__':
  main()

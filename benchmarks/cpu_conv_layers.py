r"""ResNet-50's convolutions one by one: XLA's float32 and bfloat16 kernels against the dots of
``qscore_jax.models.cpu_conv``, and where the time of a 3x3-as-dots goes.

    python benchmarks/cpu_conv_layers.py --out benchmarks/results/cpu_conv_layers.json

Batch 32, each of ResNet-50's stride-1 shapes (the bottleneck's 1x1 reductions and
expansions and its 3x3 at 56, 28, 14 and 7 pixels). GFLOP/s of: XLA's float32 convolution,
XLA's bfloat16 convolution (its operands converted to float32 and back), and the dot
formulation (1x1: one dot; 3x3: the width-wise im2col and three dots of
``cpu_conv.conv_3x3_same``, which the library uses only up to ``MAX_DOT_3X3_SIZE``). For the
3x3 rows it also times building the im2col alone and the three dots alone on a prebuilt one:
what decides the threshold. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from jax import lax

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)
from qscore_jax.models import cpu_conv, precision

NHWC = ('NHWC', 'HWIO', 'NHWC')
SHAPES = [  # (kernel, map size, in channels, out channels)
    (1, 56, 256, 64), (1, 56, 64, 256), (1, 28, 512, 128), (1, 14, 1024, 256),
    (1, 7, 2048, 512), (3, 56, 64, 64), (3, 28, 128, 128), (3, 14, 256, 256), (3, 7, 512, 512)]


def _columns(x):
  """The width-wise im2col of conv_3x3_same, alone."""
  n, h, width, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([padded[:, :, j:j + width] for j in range(3)], -1).reshape(-1, 3 * c)


def _three_dots(columns, w, width):
  rows = columns.shape[0] - 2 * width
  kernel_rows = w.reshape(3, -1, w.shape[-1])
  return sum(lax.dot_general(lax.slice_in_dim(columns, i * width, i * width + rows),
                             kernel_rows[i], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32) for i in range(3))


def measure(batch: int, rounds: int) -> list[dict]:
  rows = []
  for kernel, size, cin, cout in SHAPES:
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) * 0.05
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    pad = ((kernel // 2,) * 2,) * 2
    flops = 2 * batch * size * size * cin * cout * kernel * kernel
    xla = jax.jit(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=NHWC))
    dots = jax.jit(cpu_conv.conv_3x3_same if kernel == 3
                   else lambda a, b: cpu_conv.conv_1x1(a, b, (1, 1)))

    def timed(fn, *args):
      return _common.median_seconds(lambda: fn(*args).block_until_ready(), rounds, warmup=1)

    row = {'kernel': kernel, 'size': size, 'in': cin, 'out': cout,
           'gflops': {'xla_fp32': flops / timed(xla, x, w) / 1e9,
                      'xla_bf16': flops / timed(xla, x16, w16) / 1e9,
                      'dots_bf16': flops / timed(dots, x16, w16) / 1e9}}
    if kernel == 3:
      build = jax.jit(_columns)
      columns = build(x16)
      row['im2col_ms'] = 1e3 * timed(build, x16)
      row['three_dots_ms'] = 1e3 * timed(jax.jit(lambda c, b: _three_dots(c, b, size)),
                                         columns, w16)
      row['xla_fp32_ms'] = 1e3 * flops / row['gflops']['xla_fp32'] / 1e9
      row['used_by_library'] = size <= cpu_conv.MAX_DOT_3X3_SIZE
    else:
      row['used_by_library'] = True
    rows.append(row)
    print(row, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  out = ['| conv | map | channels in -> out | XLA fp32 GFLOP/s | XLA bf16 GFLOP/s | bf16 dots '
         'GFLOP/s | dots / fp32 | 3x3: im2col ms + 3 dots ms (fp32 conv ms) | dots used |',
         '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    g = r['gflops']
    split = (f"{r['im2col_ms']:.1f} + {r['three_dots_ms']:.1f} ({r['xla_fp32_ms']:.1f})"
             if r['kernel'] == 3 else '-')
    out.append(f"| {r['kernel']}x{r['kernel']} | {r['size']} | {r['in']} -> {r['out']} "
               f"| {g['xla_fp32']:.0f} | {g['xla_bf16']:.0f} | {g['dots_bf16']:.0f} "
               f"| {g['dots_bf16'] / g['xla_fp32']:.2f}x | {split} "
               f"| {'yes' if r['used_by_library'] else 'no'} |")
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  rows = measure(args.batch, args.rounds)
  print(f"\nCPU: {_common.cpu_name()}, {os.cpu_count()} cores, bfloat16 units: "
        f"{', '.join(precision.cpu_bf16_units()) or 'none'}; jax {jax.__version__}.\n")
  print(table(rows))
  if args.out:
    _common.write_json(args.out, {'cpu': _common.cpu_name(),
                                  'bf16_units': precision.cpu_bf16_units(),
                                  'batch': args.batch, 'results': rows})


if __name__ == '__main__':
  main()

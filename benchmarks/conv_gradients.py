r"""ResNet-18's convolutions one by one, in the three products of a training step: XLA:CPU
against PyTorch (oneDNN, ``channels_last``), in the same process.

    python benchmarks/conv_gradients.py --out benchmarks/results/conv_gradients.json

For each 3x3 and 7x7 convolution shape of ResNet-18 at batch 32, 224 px (the 1x1
shortcuts are dots): the forward convolution, the gradient with respect to the input
(``dx``) and with respect to the kernel (``dw``), each jitted alone in JAX (``jax.vjp``)
and called alone in PyTorch (``torch.nn.grad.conv2d_input`` / ``conv2d_weight``), float32,
medians of interleaved rounds. The totals weight each shape by how often ResNet-18 has
it: what the convolutions of one train step cost in each framework. Also times the XLA
configurations that could change the convolution kernels (``--configs``), each in a
worker process, since XLA reads its flags once. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)

BATCH = 32
# (map size, in channels, out channels, kernel, stride, how many ResNet-18 has)
SHAPES = [(224, 3, 64, 7, 2, 1), (56, 64, 64, 3, 1, 4), (56, 64, 128, 3, 2, 1),
          (28, 128, 128, 3, 1, 3), (28, 128, 256, 3, 2, 1), (14, 256, 256, 3, 1, 3),
          (14, 256, 512, 3, 2, 1), (7, 512, 512, 3, 1, 3)]
_YNN = '--xla_cpu_experimental_ynn_fusion_type'
# Name -> XLA_FLAGS of the worker ('' keeps what `import qscore_jax` sets).
CONFIGS = {
    'qscore_jax': '',
    'ynn-conv': f'{_YNN}=individual_dot,individual_convolution,reduce',
    'onednn': f'--xla_cpu_use_onednn=true {_YNN}=individual_dot,reduce',
    'onednn-custom-call': f'--xla_cpu_experimental_onednn_custom_call=true {_YNN}=individual_dot,reduce',
    'xnn-conv': f'--xla_cpu_experimental_xnn_fusion_type=individual_convolution {_YNN}=individual_dot,reduce',
}


def worker(rounds: int, with_torch: bool) -> list[dict]:
  """Runs in a fresh process; per shape, median milliseconds of each product."""
  import qscore_jax  # pylint: disable=import-outside-toplevel,unused-import  # its XLA flag, first
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  torch = None
  if with_torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
  rows = []
  for size, cin, cout, kernel, stride, count in SHAPES:
    pad = kernel // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, size, size, cin)).astype(np.float32)
    w = (rng.standard_normal((kernel, kernel, cin, cout)) * 0.05).astype(np.float32)

    def conv(a, b, stride=stride, pad=pad):
      return jax.lax.conv_general_dilated(a, b, (stride, stride), [(pad, pad)] * 2,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    xj, wj = jnp.asarray(x), jnp.asarray(w)
    g = jnp.ones_like(conv(xj, wj))
    fwd = jax.jit(conv)
    dx = jax.jit(lambda a, b, c, conv=conv: jax.vjp(lambda a: conv(a, b), a)[1](c)[0])
    dw = jax.jit(lambda a, b, c, conv=conv: jax.vjp(lambda b: conv(a, b), b)[1](c)[0])
    calls = {'jax_fwd': lambda: fwd(xj, wj).block_until_ready(),
             'jax_dw': lambda: dw(xj, wj, g).block_until_ready()}
    if cin > 3:  # the stem's input gradient is never needed
      calls['jax_dx'] = lambda: dx(xj, wj, g).block_until_ready()
    if torch is not None:
      cl = torch.channels_last
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl)
      wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=cl)
      gt = torch.ones(torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad).shape
                      ).contiguous(memory_format=cl)

      def torch_fwd():
        with torch.no_grad():
          torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)

      calls['torch_fwd'] = torch_fwd
      calls['torch_dw'] = lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, stride=stride,
                                                              padding=pad)
      if cin > 3:
        calls['torch_dx'] = lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, stride=stride,
                                                               padding=pad)
    for call in calls.values():  # compile, warm up
      call()
    times = {name: [] for name in calls}
    for _ in range(rounds):  # interleaved: every product once per round
      for name, call in calls.items():
        times[name].append(_common.median_seconds(call, 1) * 1e3)
    rows.append({'shape': [size, cin, cout, kernel, stride], 'count': count,
                 **{name: float(np.median(t)) for name, t in times.items()}})
  return rows


def _totals(rows: list[dict], prefix: str) -> dict[str, float]:
  return {product: sum(row.get(f'{prefix}_{product}', 0.0) * row['count'] for row in rows)
          for product in ('fwd', 'dx', 'dw')}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--worker', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(int(args.worker[0]), args.worker[1] == '1')))
    return
  results = {}
  for config in args.configs:
    env = dict(os.environ)
    if CONFIGS[config]:
      env['XLA_FLAGS'] = CONFIGS[config]
    with_torch = config == 'qscore_jax'  # PyTorch once, beside the library's own setting
    out = subprocess.run([sys.executable, __file__, '--worker', str(args.rounds),
                          '1' if with_torch else '0'], env=env, check=True,
                         capture_output=True, text=True).stdout
    results[config] = json.loads(out.strip().splitlines()[-1])
  rows = results[args.configs[0]]
  print(f'CPU: {_common.cpu_name()} ({_common.cpu_flag_summary()}); batch {BATCH}, float32, ms\n')
  print('| map, in -> out, kernel/stride (x count) | XLA fwd | XLA dx | XLA dw | torch fwd | '
        'torch dx | torch dw |\n|---|---|---|---|---|---|---|')
  for row in rows:
    size, cin, cout, kernel, stride = row['shape']
    cells = [f"{row.get(k, 0.0):.1f}" if k in row else '-' for k in
             ('jax_fwd', 'jax_dx', 'jax_dw', 'torch_fwd', 'torch_dx', 'torch_dw')]
    print(f"| {size}, {cin} -> {cout}, {kernel}x{kernel}/{stride} (x{row['count']}) | "
          + ' | '.join(cells) + ' |')
  summary = {}
  for config, config_rows in results.items():
    summary[config] = _totals(config_rows, 'jax')
  if 'torch_fwd' in rows[0]:
    summary['torch channels_last'] = _totals(rows, 'torch')
  print('\n| convolutions of one ResNet-18 step | fwd ms | dx ms | dw ms | total ms |\n|---|---|---|---|---|')
  for name, total in summary.items():
    print(f"| {name} | {total['fwd']:.0f} | {total['dx']:.0f} | {total['dw']:.0f} | "
          f"{sum(total.values()):.0f} |")
  if args.out:
    _common.write_json(args.out, {'cpu': _common.cpu_name(), 'cpu_flags': _common.cpu_flag_summary(),
                                  'batch': BATCH, 'rows': results, 'totals': summary})


if __name__ == '__main__':
  main()

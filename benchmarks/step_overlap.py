r"""Does the fine-tuning loop's host work overlap its steps? The real loop, timed two ways.

    python benchmarks/step_overlap.py --out benchmarks/results/step_overlap.json

``qscore_jax.finetune.loop.run`` on the tiny SimCLR config (ResNet-18 at width 1/16, batch 16
of 32-px images), with the host's batch preparation slowed by a sleep of about one step's
time per batch (what a slow JPEG decoder does; a sleep leaves the cores to the step, as a
loader on its own cores would). Two variants, alternated round by round in one process:

* ``overlapped``: the loop as shipped: batches prefetched onto the devices (two in flight),
  step k+1 dispatched before step k's metrics are read;
* ``synchronous``: the same loop, with every step's outputs waited for right after its
  dispatch (``jax.block_until_ready``), as the loop did before: host and device take turns.

Per step: the median over the logged steps after the first two (compilation) of
``1 / images_per_second * batch`` from ``metrics.jsonl``. With perfect overlap a step takes
max(host, device); with none, host + device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax

from qscore_jax.configs.finetune import get_config
from qscore_jax.finetune import core, loop

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)

TINY = ('dataset=synthetic_shapes/tiny,batch_size=16,arch_options.width_multiplier=0.0625,'
        'heads.projector_hidden=32,heads.projector_out=16,heads.predictor_hidden=8,'
        'regularizer.reference_examples=64,optimizer.learning_rate=0.05,progress=false,'
        'log_every_steps=1,checkpoint_every_steps=1000,export_model=false,method=simclr')


def _step_seconds(workdir: pathlib.Path, batch: int) -> float:
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return statistics.median(batch / line['images_per_second'] for line in lines[2:-1])


def one_run(steps: int, host_seconds: float, synchronous: bool, data_dir: str | None) -> float:
  """One fine-tuning run; the median seconds per step."""
  original_jit_step, original_batches = core.Trainer.jit_step, loop.ssl_batches

  def jit_step(self, mesh):
    step_fn = original_jit_step(self, mesh)
    return (lambda state, views: jax.block_until_ready(step_fn(state, views))) \
        if synchronous else step_fn

  class SlowBatches:  # the same batches (and attributes), each made host_seconds slower
    def __init__(self, batches):
      self.batches = batches

    def __getattr__(self, name):
      return getattr(self.batches, name)

    def __iter__(self):
      for batch in self.batches:
        time.sleep(host_seconds)
        yield batch

  def slow_batches(*args, **kwargs):
    return SlowBatches(original_batches(*args, **kwargs))
  core.Trainer.jit_step, loop.ssl_batches = jit_step, slow_batches
  try:
    spec = TINY + f',num_steps={steps}' + (f',data_dir={data_dir}' if data_dir else '')
    with tempfile.TemporaryDirectory() as work:
      loop.run(get_config(spec), pathlib.Path(work) / 'run')
      return _step_seconds(pathlib.Path(work) / 'run', 16)
  finally:
    core.Trainer.jit_step, loop.ssl_batches = original_jit_step, original_batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--data-dir', help='tfds data directory (synthetic_shapes/tiny is made '
                      'there on first use)')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  # The step's own time, with no host delay and nothing to overlap.
  device = one_run(args.steps, 0.0, True, args.data_dir)
  host = device
  rows = {'overlapped': [], 'synchronous': []}
  for index in range(args.rounds):
    order = ('overlapped', 'synchronous') if index % 2 == 0 else ('synchronous', 'overlapped')
    for name in order:
      rows[name].append(one_run(args.steps, host, name == 'synchronous', args.data_dir))
    print(f"round {index + 1}: overlapped {rows['overlapped'][-1] * 1e3:.0f} ms/step, "
          f"synchronous {rows['synchronous'][-1] * 1e3:.0f} ms/step", flush=True)
  summary = {'cpu': _common.cpu_name(), 'date': time.strftime('%Y-%m-%d'), 'jax': jax.__version__,
             'step_seconds_alone': device, 'host_seconds_per_batch': host,
             'rounds': rows,
             'median_seconds': {k: statistics.median(v) for k, v in rows.items()}}
  summary['synchronous_over_overlapped'] = (summary['median_seconds']['synchronous']
                                            / summary['median_seconds']['overlapped'])
  print(json.dumps(summary, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=2) + '\n')


if __name__ == '__main__':
  main()

"""Train-step time: a Flax ResNet step against PyTorch eager (channels_last), same run.

The step both frameworks run: ResNet forward in training mode (BatchNorm batch
statistics) + linear classifier + cross-entropy, backward, SGD with momentum
(weight decay 1e-4), on one batch of 224x224 images, fp32. The Flax step is
``jax.jit(value_and_grad)`` with the state donated; PyTorch is eager with
``channels_last``. Also timed: the project's own SimCLR train step
(:func:`qscore_jax.finetune.train_step`: two views, projector, NT-Xent and the
Q-Score regularizer) on the same number of images.

One worker process per configuration (XLA flags are read once per process).
The configurations add, one at a time, what moved the Flax step from "naive"
to the project's (``benchmarks/README.md`` explains each):

  * ``naive``: jaxlib 0.10's defaults (``QSCORE_JAX_KEEP_XLA_FLAGS=1``: dots,
    reductions and convolutions on YNNPACK), and the model with
    ``flax.linen.max_pool`` and without materialized activations;
  * ``dots-only``: only dots on YNNPACK (the setting of issue #2, tuned for
    inference), which also takes the reductions off YNNPACK;
  * ``+xla-conv``: convolutions on XLA's own kernels, dots and reductions on
    YNNPACK: the flag ``import qscore_jax`` sets (``qscore_jax/_xla_cpu.py``);
  * ``+maxpool-grad``: + ``qscore_jax.models.pooling.max_pool``'s gradient;
  * ``qscore_jax``: + activations materialized before the backward pass's
    transposes (``qscore_jax.models.resnet._materialized``): the library as shipped.

Rounds interleave the frameworks; medians are reported. Run (about 15 minutes):

    python benchmarks/train_step.py --out benchmarks/results/train_step.json
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

_YNN = '--xla_cpu_experimental_ynn_fusion_type'
# name -> (environment, model changes undone in the worker).
CONFIGS = {
    'naive': ({'QSCORE_JAX_KEEP_XLA_FLAGS': '1'}, ('maxpool', 'materialize')),
    'dots-only': ({'XLA_FLAGS': f'{_YNN}=individual_dot'}, ('maxpool', 'materialize')),
    '+xla-conv': ({'XLA_FLAGS': f'{_YNN}=individual_dot,reduce'}, ('maxpool', 'materialize')),
    '+maxpool-grad': ({'XLA_FLAGS': f'{_YNN}=individual_dot,reduce'}, ('materialize',)),
    'qscore_jax': ({}, ()),
}


def _undo_model_changes(changes: list[str]) -> None:
  """Puts back what a naive Flax ResNet does, for the ablation rows."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import resnet  # pylint: disable=import-outside-toplevel
  if 'maxpool' in changes:
    resnet.max_pool = nn.max_pool
  if 'materialize' in changes:
    resnet._materialized = lambda x, one: x  # pylint: disable=protected-access


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def worker(arch: str, batch: int, rounds: int, ssl: bool, undo: list[str]) -> dict:
  """Runs in a fresh process; returns median step times of interleaved rounds."""
  _undo_model_changes(undo)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  from qscore_jax.convert.layout import resnet_from_torch  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import build_model  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, batch)

  reference = getattr(torchvision.models, arch)()
  model = build_model(arch)
  variables = resnet_from_torch({k: v.numpy() for k, v in reference.state_dict().items()
                                 if not k.startswith('fc.')})
  params = {'backbone': variables['params'],
            'fc': {'kernel': reference.fc.weight.detach().numpy().T.copy(),
                   'bias': reference.fc.bias.detach().numpy().copy()}}
  batch_stats = variables['batch_stats']
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

  def loss_fn(params, batch_stats, x, y):
    h, updates = model.apply({'params': params['backbone'], 'batch_stats': batch_stats}, x,
                             train=True, mutable=['batch_stats'])
    logits = h @ params['fc']['kernel'] + params['fc']['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  def step(params, batch_stats, opt_state, x, y):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    deltas, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, deltas), updates['batch_stats'], opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2))
  state = jax.device_put((params, batch_stats, tx.init(params)))
  x, y = jnp.asarray(images), jnp.asarray(labels)
  compile_start = time.perf_counter()
  *state, loss = step(*state, x, y)
  loss.block_until_ready()
  compile_s = time.perf_counter() - compile_start

  def flax_step():
    nonlocal state
    *state, loss = step(*state, x, y)
    loss.block_until_ready()

  torch_model = copy.deepcopy(reference).to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  y_torch = torch.from_numpy(labels)

  def torch_step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(torch_model(x_torch), y_torch).backward()
    optimizer.step()

  torch_step()
  ssl_step = None
  if ssl:
    from qscore_jax import regularizer  # pylint: disable=import-outside-toplevel
    from qscore_jax.finetune import core, get_method  # pylint: disable=import-outside-toplevel
    method = get_method('simclr')
    heads = method.build_heads(model.num_features, {})
    sgd, schedule = core.make_optimizer('lars', 0.1, weight_decay=1e-6, momentum=0.9,
                                        total_steps=100, warmup_steps=0)
    trainer = core.Trainer(model, heads, method, (('temperature', 0.1),), sgd, schedule,
                           regularizer.RegularizerConfig(), 100)
    ssl_state = core.create_state(trainer, variables,
                                  core.init_heads(trainer, jax.random.key(0), model.num_features),
                                  np.ones(model.num_features, bool))
    views = (x[:batch // 2], x[batch // 2:])
    jitted = trainer.jit_step()
    ssl_state, metrics = jitted(ssl_state, views)
    jax.block_until_ready(metrics)

    def ssl_step():
      nonlocal ssl_state
      ssl_state, out = jitted(ssl_state, views)
      jax.block_until_ready(out)

  samples = {'flax': [], 'torch_cl': [], 'flax_ssl': []}
  for _ in range(rounds):
    samples['flax'].append(_timed(flax_step))
    samples['torch_cl'].append(_timed(torch_step))
    if ssl_step:
      samples['flax_ssl'].append(_timed(ssl_step))
  med = {k: statistics.median(v) for k, v in samples.items() if v}
  return {'arch': arch, 'batch': batch, 'rounds': rounds, 'compile_s': compile_s,
          'step_s': med, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'torch_threads': torch.get_num_threads(),
          'versions': {'jax': jax.__version__, 'torch': torch.__version__}}


def table(results: list[dict]) -> str:
  rows = ['| model | batch | XLA config | Flax step s | torch channels_last step s '
          '| Flax speed / torch | qscore SimCLR step s (2 x batch/2 views) |',
          '|---|---|---|---|---|---|---|']
  for r in results:
    s = r['step_s']
    ssl = f"{s['flax_ssl']:.2f}" if 'flax_ssl' in s else '-'
    rows.append(f"| {r['arch']} | {r['batch']} | {r['config']} | {s['flax']:.2f} "
                f"| {s['torch_cl']:.2f} | **{s['torch_cl'] / s['flax']:.2f}x** | {ssl} |")
  return '\n'.join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--arch', default='resnet18')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--worker', nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    arch, batch, rounds, ssl, undo = args.worker
    print(json.dumps(worker(arch, int(batch), int(rounds), ssl == '1',
                            [u for u in undo.split(',') if u and u != '-'])))
    return
  results = []
  for config in args.configs:
    env = {k: v for k, v in os.environ.items()
           if k not in ('XLA_FLAGS', 'QSCORE_JAX_KEEP_XLA_FLAGS')}
    config_env, undo = CONFIGS[config]
    env.update(config_env)
    ssl = '1' if config == 'qscore_jax' else '0'
    out = subprocess.run([sys.executable, __file__, '--worker', args.arch, str(args.batch),
                          str(args.rounds), ssl, ','.join(undo) or '-'], env=env,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1]) | {'config': config}
    results.append(result)
    print(f"{config}: {result['step_s']}", file=sys.stderr)
  print(table(results))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump({'cpu': _common.cpu_name(), 'cpu_flags': _common.cpu_flag_summary(),
                 'cores': os.cpu_count(), 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()

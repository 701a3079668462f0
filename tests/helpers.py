"""Small helpers shared by the tests (no torch here)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from qscore_jax.models import abstract_variables


def random_variables(model, input_shape=None, seed=0):
  """Random params and BatchNorm statistics for ``model`` without compiling its init.

  ``jax.jit(model.init)`` compiles one RNG kernel per parameter (10-20 s for a
  ResNet on this CPU); shapes from ``eval_shape`` plus numpy are instant.
  Kernels are variance-preserving normal, BatchNorm variances in [0.5, 2].
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    scale = 1 / np.sqrt(fan_in) if len(leaf.shape) > 1 else 0.2
    value = rng.standard_normal(leaf.shape) * scale
    if name.endswith("['scale']"):
      value = value + 1.0
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, input_shape))


def free_port() -> int:
  """A free local TCP port (for the jax.distributed coordinator of 2-process tests)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def finish_json(process, timeout: int = 1500):
  """Waits for a test subprocess, asserts success (with its stderr), parses its last line."""
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1])


def run_on_simulated_devices(script: str, devices: int = 4) -> None:
  """Runs ``script`` in a fresh Python with ``devices`` CPU devices; it must print ``ok`` last.

  (The device count is fixed when JAX starts, hence the subprocess.)
  """
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')


# A fine-tuning config small enough for a test on a CPU (the tiny synthetic-shapes split,
# a ResNet-18 at 1/16 width, small heads, a log line every step).
TINY_FINETUNE = ('dataset=synthetic_shapes/tiny,batch_size=16,arch_options.width_multiplier=0.0625,'
                 'heads.projector_hidden=32,heads.projector_out=16,heads.predictor_hidden=8,'
                 'regularizer.reference_examples=64,optimizer.learning_rate=0.05,progress=false,'
                 'log_every_steps=1')

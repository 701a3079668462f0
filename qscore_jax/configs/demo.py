r"""Pre-training of the encoder shipped for ``qscore demo`` (``checkpoints/demo-simclr-r18w025``).

    qscore finetune --config demo --init random --workdir runs/demo
    rm -rf checkpoints/demo-simclr-r18w025 && cp -r runs/demo/model checkpoints/demo-simclr-r18w025

SimCLR from scratch on ``synthetic_shapes/fixed_colours_small`` (32 px, 2,000
training images), ResNet-18 at width 0.25 (128-d representations), the
small-batch recipe of the offline experiment (``configs/experiment.py``: SGD
lr 0.1, temperature 0.5, crops >= 40 %), with more steps. Its provenance
(this config, the step count) is in the checkpoint's ``metadata.json``; on the
project's 2-core CPU it trains in about the time given in
``checkpoints/README.md``. Training is deterministic on one machine; a CPU with other
floating-point kernels (AVX2 vs AVX-512) trains a different encoder.
"""

from __future__ import annotations

import ml_collections

from qscore_jax import experiment
from qscore_jax.configs import experiment as experiment_config
from qscore_jax.configs import finetune

STEPS = 2400


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo pre-training config, with ``arg`` (``key=value,...``) applied."""
  exp = experiment_config.get_config(f'pretrain_steps={STEPS}')
  c = experiment.pretrain_config(exp, 'simclr')
  c.progress = True
  c.checkpoint_every_steps = 400
  c.log_every_steps = 100
  if arg:
    finetune.apply_overrides(c, arg.split(','))
  return c

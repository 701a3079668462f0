r"""The paper's experiment, offline: pre-train, fine-tune with and without Q-Score, compare.

    qscore experiment --config experiment --workdir runs/experiment

For each method: pre-train a small encoder from scratch on the built-in synthetic
dataset; from that checkpoint, fine-tune (a) with the method's loss alone and
(b) with the Q-Score regularizer added, for the same steps, data and seeds;
then embed every model and report linear accuracy, the AUPRC of Q for
predicting misclassified samples, sparsity and the compression curve
(``qscore_jax.experiment``). Fields are documented inline; ``--config
experiment:seeds=0:1:2:3:4`` etc. override them.

The figures of the shipped config (2-core CPU) are in the README's
"Fine-tuning with the Q-Score regularizer" section and in ``EXPECTED`` below.
"""

from __future__ import annotations

import ml_collections

from qscore_jax.configs import finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config, with ``arg`` (``key=value,...``) applied."""
  c = ml_collections.ConfigDict()
  c.methods = ('simclr', 'byol')       # a contrastive and a non-contrastive method
  c.dataset = 'synthetic_shapes/small'  # 32 px, built in, nothing to download
  c.eval_dataset = 'synthetic_shapes/small'
  c.arch = 'resnet18'
  c.width_multiplier = 0.25            # 128-d representations
  c.batch_size = 64
  c.pretrain_steps = 400
  c.finetune_steps = 100
  c.seeds = (0, 1, 2)                  # fine-tuning seeds (data order, augmentations)
  c.finetune_lr_fraction = 0.1         # fine-tuning lr = this x the method's recipe lr
  c.regularizer = ml_collections.ConfigDict()
  c.regularizer.lambda1 = 1e-4         # the paper's values
  c.regularizer.lambda2 = 1e-4
  c.regularizer.reference_examples = 1024
  c.compression_removed = (0.5, 0.75, 0.9)  # fractions of the features removed (Q's ranking)
  c.lock()
  if arg:
    finetune.apply_overrides(c, arg.split(','))
  return c

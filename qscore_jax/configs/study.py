r"""When does Q-Score find a representation's mistakes? (``qscore study``)

    qscore study --config study --workdir runs/study

Pre-trains a SimCLR and a BYOL encoder from scratch on each of three synthetic-shapes
configurations whose errors have a known source (the recipe of ``qscore experiment``:
ResNet-18 x0.25, 800 steps of batch 64, SGD at 0.1; four checkpoints kept along the
way for ``qscore track``), then measures, per encoder, how well each per-sample
score finds the linear probe's errors, overall and by the error's source, and how
each score follows the images' ground-truth difficulty (``qscore_jax.study``):

* ``weak_evidence``: objects of widely varying size, contrast and occlusion; the
  background texture is independent of the class. Errors come from weak evidence.
* ``spurious``: easy objects; the texture is the class's own 80% of the time. Errors
  come mostly from the misleading texture (a cue conflict).
* ``mixed``: both.

Fields are documented inline; ``--config study:pretrain_steps=400`` etc. override
them (``--set eps=2`` reuses every trained encoder and reruns only the analyses).

What the shipped config measured (2026-12-03, 2-core Intel Xeon, 1,093 s; tables in the
README's "When does Q-Score find mistakes?" section, files in
``benchmarks/results/study/2026-12-03-Intel-R-Xeon-R-Processor/``):

* The self-supervised encoders do not learn the shapes (17-20% on ``weak_evidence``,
  chance 10%; the supervised control 75%), and on them Q-Score is at or near chance for
  either source of error (AUROC 0.49-0.53 at eps 4, 0.50-0.60 at eps 2).
* At the paper's eps = 4, Q is 0 on 78-99% of their test images: it cannot rank them.
* Where the representation encodes the object (the control) and the errors come from
  weak evidence, Q-Score at eps = 2 finds them (AUROC 0.74 [0.69, 0.79]) and follows the
  visible evidence (Spearman 0.57); cue-conflict errors it hardly finds (AUPRC 0.17 against
  chance 0.14 on ``mixed``).
* The L2 norm does better than Q-Score on the control, neighbourhood consistency does best
  among label-free scores on the self-supervised encoders, and the probe's max-softmax
  beats them all on 8 of 9 encoders.
"""

from __future__ import annotations

import ml_collections

from qscore_jax.configs import experiment, finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study config, with ``arg`` (``key=value,...``) applied."""
  recipe = experiment.get_config()
  c = ml_collections.ConfigDict()
  c.datasets = ('synthetic_shapes/weak_evidence', 'synthetic_shapes/spurious',
                'synthetic_shapes/mixed')
  # A contrastive and a non-contrastive method, and the control: the same network trained
  # with the labels (supervised_steps steps), a representation that does encode the objects.
  c.methods = ('simclr', 'byol', 'supervised')
  # The experiment's pre-training recipe (qscore_jax/configs/experiment.py).
  c.arch = recipe.arch
  c.width_multiplier = recipe.width_multiplier  # 128-d representations
  c.batch_size = recipe.batch_size
  c.pretrain_steps = recipe.pretrain_steps
  c.optimizer = recipe.optimizer
  c.learning_rate = recipe.learning_rate
  c.min_crop_scale = recipe.min_crop_scale
  c.loss = recipe.loss
  c.regularizer = recipe.regularizer   # not used: pre-training has no regularizer
  c.supervised_steps = 3000            # the control's steps (cross-entropy, batch_size)
  c.checkpoints = 4                    # evenly spaced checkpoints kept (qscore track)
  c.eps = 4.0                          # Q-Score's highly-active threshold (the paper's; demo: 2)
  c.knn_k = 10                         # neighbours of kNN agreement
  c.consistency_k = 10                 # neighbours of neighbourhood consistency
  c.bootstrap_resamples = 1000         # intervals of every AUPRC/AUROC and rho
  c.lock()
  if arg:
    finetune.apply_overrides(c, arg.split(','))
  return c

r"""The paper's experiment, offline: pre-train, fine-tune with and without Q-Score, compare.

    qscore experiment --config experiment --workdir runs/experiment

For each method: pre-train a small encoder from scratch on the built-in
synthetic shapes (``synthetic_shapes/fixed_colours_small``: 32 px, 2,000 /
500 images, one colour scheme for all); from that checkpoint, fine-tune (a)
with the method's loss alone and (b) with the Q-Score regularizer added, for
the same steps, data and seeds; then embed every model, and a randomly
initialised encoder as the floor, and report linear accuracy, the AUPRC of Q
for predicting misclassified samples, sparsity and the compression curve
(``qscore_jax.experiment``). Fields are documented inline; ``--config
experiment:seeds=0:1:2:3:4`` etc. override them.

The figures of the shipped config on the project's 2-core CPU are in the
README's "The paper's experiment, offline" section and in ``EXPECTED`` below.
"""

from __future__ import annotations

import ml_collections

from qscore_jax.configs import finetune

# results.json's summary of the shipped command on the project's 2-core CPU machine (762 s,
# 2026-11-25): {method: {model: {metric: (mean, sample std over the seeds)}}}.
EXPECTED = {
    'simclr': {
        'pretrained': {'top1': (0.8169, 0.0000), 'auprc_q': (0.1864, 0.0000), 'auprc_chance': (0.1831, 0.0000), 'mean_q': (1.4409, 0.0000), 'num_discriminative': (28.0000, 0.0000), 'hoyer': (0.4224, 0.0000), 'zero_fraction': (0.3703, 0.0000), 'top1_removed_0.5': (0.7465, 0.0000), 'top1_removed_0.75': (0.7324, 0.0000), 'top1_removed_0.9': (0.5493, 0.0000)},
        'plain': {'top1': (0.8160, 0.0016), 'auprc_q': (0.1850, 0.0102), 'auprc_chance': (0.1840, 0.0016), 'mean_q': (1.3136, 0.1068), 'num_discriminative': (30.0000, 3.0000), 'hoyer': (0.4236, 0.0018), 'zero_fraction': (0.3741, 0.0008), 'top1_removed_0.5': (0.7690, 0.0123), 'top1_removed_0.75': (0.7080, 0.0163), 'top1_removed_0.9': (0.5174, 0.0208)},
        'qscore': {'top1': (0.8131, 0.0091), 'auprc_q': (0.1933, 0.0156), 'auprc_chance': (0.1869, 0.0091), 'mean_q': (1.3177, 0.0487), 'num_discriminative': (29.3333, 0.5774), 'hoyer': (0.4269, 0.0014), 'zero_fraction': (0.3795, 0.0009), 'top1_removed_0.5': (0.7671, 0.0133), 'top1_removed_0.75': (0.7033, 0.0071), 'top1_removed_0.9': (0.5408, 0.0171)},
    },
    'byol': {
        'pretrained': {'top1': (0.7972, 0.0000), 'auprc_q': (0.1996, 0.0000), 'auprc_chance': (0.2028, 0.0000), 'mean_q': (0.1627, 0.0000), 'num_discriminative': (26.0000, 0.0000), 'hoyer': (0.3364, 0.0000), 'zero_fraction': (0.2692, 0.0000), 'top1_removed_0.5': (0.7493, 0.0000), 'top1_removed_0.75': (0.6592, 0.0000), 'top1_removed_0.9': (0.5183, 0.0000)},
        'plain': {'top1': (0.8047, 0.0133), 'auprc_q': (0.1914, 0.0167), 'auprc_chance': (0.1953, 0.0133), 'mean_q': (0.2196, 0.0329), 'num_discriminative': (22.0000, 4.0000), 'hoyer': (0.3350, 0.0017), 'zero_fraction': (0.2663, 0.0020), 'top1_removed_0.5': (0.7455, 0.0091), 'top1_removed_0.75': (0.6854, 0.0043), 'top1_removed_0.9': (0.5540, 0.0117)},
        'qscore': {'top1': (0.7925, 0.0127), 'auprc_q': (0.2084, 0.0097), 'auprc_chance': (0.2075, 0.0127), 'mean_q': (0.1762, 0.0369), 'num_discriminative': (28.0000, 5.5678), 'hoyer': (0.3356, 0.0014), 'zero_fraction': (0.2686, 0.0013), 'top1_removed_0.5': (0.7427, 0.0155), 'top1_removed_0.75': (0.6779, 0.0099), 'top1_removed_0.9': (0.5493, 0.0049)},
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config, with ``arg`` (``key=value,...``) applied."""
  c = ml_collections.ConfigDict()
  c.methods = ('simclr', 'byol')       # a contrastive and a non-contrastive method
  # The built-in synthetic shapes, 32 px, one colour scheme for all images: with random
  # colours self-supervision learns the palettes and stays at chance (see the README).
  c.dataset = 'synthetic_shapes/fixed_colours_small'
  c.eval_dataset = 'synthetic_shapes/fixed_colours_small'
  c.arch = 'resnet18'
  c.width_multiplier = 0.25            # 128-d representations
  c.batch_size = 64
  c.pretrain_steps = 800
  c.finetune_steps = 100
  c.seeds = (0, 1, 2)                  # fine-tuning seeds (data order, augmentations)
  # A small-batch recipe: the official LARS lr 0.3 x 64/256 with SimCLR's T = 0.1 (made
  # for batch 4096) leaves these encoders below a random one in 800 steps.
  c.optimizer = 'sgd'                  # momentum 0.9, the method's weight decay
  c.learning_rate = 0.1                # pre-training (1 epoch warm-up, cosine)
  c.finetune_lr_fraction = 0.1         # fine-tuning lr = this x learning_rate (cosine)
  c.min_crop_scale = 0.4               # global crops cover >= 40% of the 32-px image
  c.loss = ml_collections.ConfigDict({'simclr': {'temperature': 0.5}})
  c.regularizer = ml_collections.ConfigDict()
  c.regularizer.lambda1 = 1e-4         # the paper's values
  c.regularizer.lambda2 = 1e-4
  c.regularizer.reference_examples = 1024
  c.compression_removed = (0.5, 0.75, 0.9)  # fractions of the features removed (Q's ranking)
  c.lock()
  if arg:
    finetune.apply_overrides(c, arg.split(','))
  return c

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

# results.json's summary of the shipped command on the project's 2-core CPU machine (1,247 s,
# 2026-11-25): {method: {model: {metric: (mean, sample std over the seeds)}}}.
EXPECTED = {
    'simclr': {
        'pretrained': {'top1': (0.5680, 0.0000), 'auprc_q': (0.4339, 0.0000), 'auprc_chance': (0.4320, 0.0000), 'mean_q': (0.1299, 0.0000), 'num_discriminative': (9.0000, 0.0000), 'hoyer': (0.4263, 0.0000), 'active_features': (0.1080, 0.0000), 'zero_fraction': (0.3982, 0.0000), 'top1_removed_0.5': (0.5620, 0.0000), 'top1_removed_0.75': (0.5600, 0.0000), 'top1_removed_0.9': (0.5160, 0.0000)},
        'plain': {'top1': (0.5660, 0.0020), 'auprc_q': (0.4353, 0.0036), 'auprc_chance': (0.4340, 0.0020), 'mean_q': (0.2152, 0.0584), 'num_discriminative': (10.3333, 0.5774), 'hoyer': (0.4276, 0.0016), 'active_features': (0.1020, 0.0053), 'zero_fraction': (0.4002, 0.0017), 'top1_removed_0.5': (0.5733, 0.0061), 'top1_removed_0.75': (0.5600, 0.0053), 'top1_removed_0.9': (0.5373, 0.0090)},
        'qscore': {'top1': (0.5733, 0.0114), 'auprc_q': (0.4286, 0.0110), 'auprc_chance': (0.4267, 0.0114), 'mean_q': (0.3476, 0.0351), 'num_discriminative': (10.6667, 2.0817), 'hoyer': (0.4308, 0.0017), 'active_features': (0.1527, 0.0122), 'zero_fraction': (0.4036, 0.0016), 'top1_removed_0.5': (0.5787, 0.0076), 'top1_removed_0.75': (0.5607, 0.0042), 'top1_removed_0.9': (0.5300, 0.0020)},
    },
    'byol': {
        'pretrained': {'top1': (0.4920, 0.0000), 'auprc_q': (0.5114, 0.0000), 'auprc_chance': (0.5080, 0.0000), 'mean_q': (0.1270, 0.0000), 'num_discriminative': (8.0000, 0.0000), 'hoyer': (0.4322, 0.0000), 'active_features': (0.1180, 0.0000), 'zero_fraction': (0.4036, 0.0000), 'top1_removed_0.5': (0.4740, 0.0000), 'top1_removed_0.75': (0.4360, 0.0000), 'top1_removed_0.9': (0.4080, 0.0000)},
        'plain': {'top1': (0.4967, 0.0200), 'auprc_q': (0.5075, 0.0194), 'auprc_chance': (0.5033, 0.0200), 'mean_q': (0.1175, 0.0032), 'num_discriminative': (10.3333, 6.6583), 'hoyer': (0.4241, 0.0025), 'active_features': (0.1207, 0.0042), 'zero_fraction': (0.3971, 0.0018), 'top1_removed_0.5': (0.4653, 0.0204), 'top1_removed_0.75': (0.4367, 0.0186), 'top1_removed_0.9': (0.4133, 0.0180)},
        'qscore': {'top1': (0.4727, 0.0219), 'auprc_q': (0.5406, 0.0037), 'auprc_chance': (0.5273, 0.0219), 'mean_q': (0.5345, 0.2966), 'num_discriminative': (8.3333, 1.5275), 'hoyer': (0.4091, 0.0035), 'active_features': (0.2720, 0.0280), 'zero_fraction': (0.3473, 0.0051), 'top1_removed_0.5': (0.4467, 0.0221), 'top1_removed_0.75': (0.4213, 0.0212), 'top1_removed_0.9': (0.4113, 0.0269)},
    },
    'none': {
        'random init': {'top1': (0.3140, 0.0000), 'auprc_q': (0.6856, 0.0000), 'auprc_chance': (0.6860, 0.0000), 'mean_q': (0.0965, 0.0000), 'num_discriminative': (3.0000, 0.0000), 'hoyer': (0.4262, 0.0000), 'active_features': (0.1160, 0.0000), 'zero_fraction': (0.1996, 0.0000), 'top1_removed_0.5': (0.2800, 0.0000), 'top1_removed_0.75': (0.2400, 0.0000), 'top1_removed_0.9': (0.2160, 0.0000)},
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

r"""SimSiam (predictor, SGD): fine-tuning with the Q-Score regularizer; every field of ``finetune.py``.

Fine-tuning a converted checkpoint (the paper's schedule: lr 1e-5, 50 epochs):

    qscore finetune --config simsiam:dataset=imagenet100,batch_size=256 --init <converted simsiam id> \\
        --workdir runs/simsiam_qreg

Pre-training from scratch with the method's own recipe (lr = base lr x batch / 256) —
the check that a setup works, with the figures measured on the project's 2-core CPU
machine (ResNet-18 x0.25, synthetic_shapes/small 32 px, batch 64, 150 steps,
the official head widths; 71 s here):

    qscore finetune --config simsiam:dataset=synthetic_shapes/small,batch_size=64,num_steps=150,\\
optimizer.learning_rate=None,arch_options.width_multiplier=0.25,regularizer.reference_examples=512,log_every_steps=50 \\
        --init random --workdir runs/simsiam_scratch

Expected: SSL loss at steps 50 / 100 / 150 = -0.031, -0.266, -0.393 (metrics.jsonl, means over the
last 50 steps), regularizer 0.186, batch mean Q 0.0022.
"""

from qscore_jax.configs import finetune

# The figures of the docstring's from-scratch command (metrics.jsonl at step 150).
EXPECTED = {'ssl_loss': [-0.031, -0.266, -0.393], 'regularizer': 0.186,
            'qscore_mean': 0.0022}


def get_config(arg: str | None = None):
  """The fine-tuning config with ``method=simsiam`` and ``arg`` applied."""
  return finetune.for_method('simsiam', arg)

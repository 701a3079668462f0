r"""Barlow Twins (LARS): fine-tuning with the Q-Score regularizer; every field of ``finetune.py``.

Fine-tuning a converted checkpoint (the paper's schedule: lr 1e-5, 50 epochs):

    qscore finetune --config barlowtwins:dataset=imagenet100,batch_size=256 --init <converted barlowtwins id> \\
        --workdir runs/barlowtwins_qreg

Pre-training from scratch with the method's own recipe (lr = base lr x batch / 256) —
the check that a setup works, with the figures measured on the project's 2-core CPU
machine (ResNet-18 x0.25, synthetic_shapes/small 32 px, batch 64, 150 steps,
heads 2048 wide instead of the official 8192; 109 s here):

    qscore finetune --config barlowtwins:dataset=synthetic_shapes/small,batch_size=64,num_steps=150,\\
optimizer.learning_rate=None,arch_options.width_multiplier=0.25,regularizer.reference_examples=512,log_every_steps=50,heads.projector_hidden=2048,heads.projector_out=2048 \\
        --init random --workdir runs/barlowtwins_scratch

Expected: SSL loss at steps 50 / 100 / 150 = 1944.375, 1772.021, 1732.732 (metrics.jsonl, means over the
last 50 steps), regularizer 7.998, batch mean Q 6.0107.
"""

from qscore_jax.configs import finetune

# The figures of the docstring's from-scratch command (metrics.jsonl at step 150).
EXPECTED = {'ssl_loss': [1944.375, 1772.021, 1732.732], 'regularizer': 7.998,
            'qscore_mean': 6.0107}


def get_config(arg: str | None = None):
  """The fine-tuning config with ``method=barlowtwins`` and ``arg`` applied."""
  return finetune.for_method('barlowtwins', arg)

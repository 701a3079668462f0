r"""MoCo v2 (queue of 65536 keys, momentum encoder, SGD); every field of ``finetune.py``.

Fine-tuning the converted official checkpoint (the paper's schedule: lr 1e-5, 50 epochs;
``imagenet1k.py`` has the full ImageNet setup):

    qscore finetune --config mocov2:dataset=imagenet2012,batch_size=256 --init mocov2-r50-800ep \\
        --workdir runs/mocov2_qreg

Pre-training from scratch with the method's own recipe (lr = base lr x batch / 256) —
the check that a setup works, with the figures measured on the project's 2-core CPU
machine (ResNet-18 x0.25, synthetic_shapes/small 32 px, batch 64, 150 steps, the official head and a queue of 65536;
384 s here, measured while other jobs shared the machine):

    qscore finetune --config mocov2:dataset=synthetic_shapes/small,batch_size=64,num_steps=150,\\
optimizer.learning_rate=None,arch_options.width_multiplier=0.25,regularizer.reference_examples=512,log_every_steps=50 \\
        --init random --workdir runs/mocov2_scratch

Expected: SSL loss at steps 50 / 100 / 150 = 8.135, 8.644, 8.987 (metrics.jsonl, means over the
last 50 steps), regularizer 0.255, batch mean Q 0.001.
"""

from qscore_jax.configs import finetune

# The figures of the docstring's from-scratch command (metrics.jsonl at step 150).
EXPECTED = {'ssl_loss': [8.135, 8.644, 8.987], 'regularizer': 0.255,
            'qscore_mean': 0.001}


def get_config(arg: str | None = None):
  """The fine-tuning config with ``method=mocov2`` and ``arg`` applied."""
  return finetune.for_method('mocov2', arg)

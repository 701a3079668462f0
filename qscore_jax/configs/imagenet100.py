r"""ImageNet-100 fine-tuning of a ResNet-18 with the Q-Score regularizer (the paper's setup).

One config for every method: ``--config imagenet100:method=<method>``. ImageNet-100 is the
CMC/solo-learn 100-class subset of ImageNet (``qscore prepare imagenet100`` builds it from
the ImageNet download). The schedule is the paper's: the method's objective plus the
regularizer (lambda1 = lambda2 = 1e-4, D fixed from the initial model on 10,000 training
images), learning rate 1e-5, cosine, no warm-up, 50 epochs, global batch 256.

No official ImageNet-100 ResNet-18 checkpoints exist; solo-learn publishes one per method.
Convert it once, then fine-tune from the converted directory:

    qscore convert --file <solo-learn .ckpt> --method solo-learn --out models/byol_r18_in100
    qscore finetune --config imagenet100:method=byol --init models/byol_r18_in100 \
        --workdir runs/byol_r18_in100_qreg
    qscore finetune --config imagenet100:method=byol,regularizer.kind=none \
        --init models/byol_r18_in100 --workdir runs/byol_r18_in100_plain
    qscore compare runs/byol_r18_in100_plain runs/byol_r18_in100_qreg --dataset imagenet100

(``--init random`` pre-trains from scratch with the same config; set
``optimizer.learning_rate=None`` and ``num_epochs=400`` for the method's own recipe.)
"""

from qscore_jax.configs import finetune

METHODS = ('simclr', 'byol', 'simsiam', 'vicreg', 'barlowtwins', 'mocov2', 'mocov3', 'swav',
           'dino')


def get_config(arg: str | None = None):
  """The ImageNet-100 fine-tuning config; ``arg`` must start with ``method=<method>``."""
  defaults = {'dataset': 'imagenet100', 'arch': 'resnet18', 'batch_size': 256, 'num_epochs': 50.0,
              'checkpoint_every_steps': 1000, 'log_every_steps': 50}
  return finetune.with_defaults(arg, defaults, 'imagenet100', METHODS)

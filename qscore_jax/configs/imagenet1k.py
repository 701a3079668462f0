r"""ImageNet-1K fine-tuning of a converted ResNet-50 with the Q-Score regularizer (the paper's setup).

One config for every method: ``--config imagenet1k:method=<method>`` (further ``key=value``
overrides after it). The schedule is the paper's: the method's own objective plus the
regularizer (lambda1 = lambda2 = 1e-4, D fixed from the initial model on 10,000 training
images), learning rate 1e-5 with cosine decay and no warm-up, 50 epochs, the method's own
optimizer and augmentations, global batch 1024 (divisible by every TPU slice up to v4-512;
BatchNorm statistics and the regularizer's batch means are global over all hosts).

Launch on a TPU pod (every host runs the same command; the workdir must be a path every host
sees — a local disk on one host, a shared file system or gcsfuse mount on a pod):

    qscore finetune --config imagenet1k:method=swav --init swav-r50-800ep \
        --workdir /mnt/shared/runs/swav_r50_qreg

and the baseline without the regularizer, identical otherwise:

    qscore finetune --config imagenet1k:method=swav,regularizer.kind=none --init swav-r50-800ep \
        --workdir /mnt/shared/runs/swav_r50_plain

then ``qscore compare /mnt/shared/runs/swav_r50_plain /mnt/shared/runs/swav_r50_qreg
--dataset imagenet2012``. ImageNet must be prepared once (``qscore prepare imagenet2012`` with the two
tar files in ``<data-dir>/downloads/manual``). The official checkpoint of each method:
"""

from qscore_jax.configs import finetune

# The converted official ResNet-50 of each method (`qscore models`); heads are loaded with it
# when the release ships them, and trained from scratch otherwise.
INIT = {
    'simclr': 'simclr-v2-r50x1-sk0',
    'byol': 'byol-r50x1',
    'simsiam': 'simsiam-r50-100ep-bs256',
    'vicreg': 'vicreg-r50-full',
    'barlowtwins': 'barlowtwins-r50-full',
    'mocov2': 'mocov2-r50-800ep',
    'mocov3': 'mocov3-r50-1000ep',
    'swav': 'swav-r50-800ep',
    'dino': 'dino-r50-full',
}
__doc__ += '\n'.join(f'    {method:<12} --init {model}' for method, model in INIT.items()) + '\n'


def get_config(arg: str | None = None):
  """The ImageNet-1K fine-tuning config; ``arg`` must start with ``method=<method>``."""
  defaults = {'dataset': 'imagenet2012', 'arch': 'resnet50', 'batch_size': 1024, 'num_epochs': 50.0,
              'checkpoint_every_steps': 1000, 'log_every_steps': 50}
  return finetune.with_defaults(arg, defaults, 'imagenet1k', INIT)

"""Fine-tuning (and pre-training) with the SSL objectives and the Q-Score regularizer.

* :mod:`~qscore_jax.finetune.methods` — the methods: heads, losses, optimizer recipes;
* :mod:`~qscore_jax.finetune.core` — the train state, the optimizer, the data-parallel step;
* :mod:`~qscore_jax.finetune.loop` — the training loop driven by a config (checkpoints,
  resume, logs), used by ``qscore finetune``;
* :mod:`~qscore_jax.finetune.workdir` — the files a run leaves: ``run.json``, checkpoints
  that fail over to the newest intact one, logs cut back to the restored step, the lock.
"""

from qscore_jax.finetune.core import (TrainState, Trainer, create_state, ema_momentum,
                                      init_heads, make_optimizer, train_step)
from qscore_jax.finetune.methods import METHODS, Method, get_method

__all__ = ['METHODS', 'Method', 'TrainState', 'Trainer', 'create_state', 'ema_momentum',
           'get_method', 'init_heads', 'make_optimizer', 'train_step']

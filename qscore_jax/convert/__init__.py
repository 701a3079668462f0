"""Conversion of the official SSL checkpoints into qscore_jax Flax variables.

>>> from qscore_jax.convert import convert_checkpoint
>>> converted = convert_checkpoint('dino-vits16')            # downloads, converts, saves
>>> converted = convert_checkpoint(file='swav_800ep_pretrain.pth.tar', method='swav')
>>> h = converted.model.apply(converted.variables, images)    # (N, 2048)
"""

from qscore_jax.convert.api import (ConvertedModel, convert_checkpoint, convert_state,
                                    fetch_registry_files, infer_resnet, infer_vit)
from qscore_jax.convert.download import DownloadError, download
from qscore_jax.convert.readers import ReaderError, read_checkpoint
from qscore_jax.convert.rules import CONVERTIBLE_METHODS, SUBMODELS, ConversionError

__all__ = ['CONVERTIBLE_METHODS', 'ConversionError', 'ConvertedModel', 'DownloadError',
           'ReaderError', 'SUBMODELS', 'convert_checkpoint', 'convert_state', 'download',
           'fetch_registry_files', 'infer_resnet', 'infer_vit', 'read_checkpoint']

"""Test-session setup.

PyTorch's CUDA wheels bundle triton, which crashes (segfault) when it is first
imported *after* TensorFlow in the same process; torchvision and timm import
it. The parity references are therefore imported before any test can import
TensorFlow. (qscore_jax itself never imports triton: its converter only needs
torch.load.)
"""

import timm  # noqa: F401  pylint: disable=unused-import
import torch  # noqa: F401  pylint: disable=unused-import
import torchvision  # noqa: F401  pylint: disable=unused-import


import pathlib  # pylint: disable=wrong-import-position,wrong-import-order

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  """A tfds data directory with ``synthetic_shapes/tiny`` (256 train / 128 test, 32 px)
  prepared once for the session, before any subprocess reads it."""
  path = str(tmp_path_factory.mktemp('tfds'))
  from qscore_jax.data import dataset_info  # pylint: disable=import-outside-toplevel
  dataset_info('synthetic_shapes/tiny', path)
  return path


@pytest.fixture
def model_restores(monkeypatch):
  """The saved model directories restored while the test runs, in order (one entry per
  restore of a backbone's variables; heads are not counted)."""
  from qscore_jax.models import weights  # pylint: disable=import-outside-toplevel
  restored = []
  original = weights._restore  # pylint: disable=protected-access

  def counting(path, target, what):
    if what == 'model':
      restored.append(pathlib.Path(path).parent)
    return original(path, target, what)

  monkeypatch.setattr(weights, '_restore', counting)
  return restored

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

"""What a new user meets in the first hour: listings, typos, hints and the README's claims."""

import configparser
import pathlib
import re
import sys

import numpy as np
import pytest

from qscore_jax import cli, losses
from qscore_jax.data import DatasetError
from qscore_jax._text import install_hint
from qscore_jax.models import list_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def _suggestions(message: str) -> list[str]:
  """The names of a message's ``Did you mean 'a', 'b'?``."""
  match = re.search(r'Did you mean (.*?)\?', message)
  assert match, message
  return re.findall(r"'([^']*)'", match.group(1))


def test_every_install_hint_names_the_package_and_the_clone_command(monkeypatch, tmp_path):
  hint = install_hint('convert')
  assert 'pip install "qscore-jax[convert]"' in hint and 'pip install -e ".[convert]"' in hint
  # The converter's hint without torch is that text.
  from qscore_jax.convert import readers  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(readers.ReaderError) as error:
    readers.read_torch(tmp_path / 'model.pth')
  assert hint in str(error.value)
  # No other module of the package spells out an extra's install command.
  for path in (ROOT / 'qscore_jax').rglob('*.py'):
    if path.name != '_text.py':
      text = path.read_text()
      assert not re.search(r'qscore-jax\[|\.\[(convert|test)\]', text), path

"""Small text helpers shared by every layer (no imports from the package)."""

import difflib


def did_you_mean(name: str, choices) -> str:
  """`` Did you mean 'a', 'b'?`` for the up to 3 closest ``choices``, or ``''``.

  Args:
    name: the unknown name.
    choices: the known names (any iterable of strings).
  """
  close = difflib.get_close_matches(name, list(choices), n=3)
  return f' Did you mean {", ".join(map(repr, close))}?' if close else ''


def install_hint(extra: str) -> str:
  """How to install the optional dependencies ``extra``, for an installed package and a clone.

  One text for every hint (the converter's PyTorch, the test references), so that
  someone working in a clone is told the command that helps there too.

  Args:
    extra: the name of an ``[options.extras_require]`` entry of setup.cfg, e.g. ``'convert'``.

  Returns:
    ``pip install "qscore-jax[EXTRA]" (installed package) or pip install -e ".[EXTRA]" (in a
    clone of the repository)``.
  """
  return (f'pip install "qscore-jax[{extra}]" (installed package) or '
          f'pip install -e ".[{extra}]" (in a clone of the repository)')

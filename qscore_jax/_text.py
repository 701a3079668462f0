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

"""Every public function, class and CLI command is documented with its arguments.

The public API of a module is its ``__all__`` (or, for a module without one, the
names it defines that do not start with ``_``); private modules (``_name``) are
skipped. For every public function: a docstring that names each parameter, in an
``Args:`` section (``a, b: ...`` groups are fine) or in double backticks in the prose.
For every public class: a docstring, and each constructor parameter / dataclass or
Flax field named in the class (or ``__init__``) docstring; its public methods (and
``__call__``) like functions, its properties with a docstring. For the ``qscore``
command: every subcommand has a help and a description, every argument a help that
states its default when it has one, and ``qscore --help`` lists every subcommand.
Failures name every offending function, parameter or argument. (Whether a docstring
states array shapes and dtypes is left to review.)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import qscore_jax
from qscore_jax import cli

# Section headers of Google-style docstrings that list names.
_NAME_SECTIONS = ('Args', 'Arguments', 'Attributes', 'Parameters', 'Fields', 'Keyword Args')
_ANY_SECTION = re.compile(
    r'^\s*(Args|Arguments|Attributes|Parameters|Fields|Keyword Args|Returns?|Yields?|Raises|'
    r'Examples?|Notes?|Example usage|See Also|Warning|Warnings)\s*:\s*$')
# Fields every Flax module has (set by Flax, not by the class).
_FLAX_FIELDS = {'parent', 'name'}


def _modules():
  """Every importable non-private module of the package (and qscore_jax.checkpoints)."""
  names = ['qscore_jax']
  for info in pkgutil.walk_packages(qscore_jax.__path__, 'qscore_jax.'):
    if not any(part.startswith('_') for part in info.name.split('.')):
      names.append(info.name)
  names.append('qscore_jax.checkpoints')
  modules = []
  for name in sorted(set(names)):
    try:
      modules.append(importlib.import_module(name))
    except ModuleNotFoundError:  # qscore_jax.checkpoints only exists once installed
      if name != 'qscore_jax.checkpoints':
        raise
  return modules


def _is_function(obj) -> bool:
  """A function, also behind a decorator (functools.cache, jax.jit, ...)."""
  try:
    return inspect.isfunction(inspect.unwrap(obj))
  except ValueError:
    return False


def _public_names(module):
  if hasattr(module, '__all__'):
    return list(module.__all__)
  return [name for name, obj in vars(module).items()
          if not name.startswith('_') and (_is_function(obj) or inspect.isclass(obj))
          and getattr(obj, '__module__', None) == module.__name__]


def _public_objects():
  """{qualified name: object} of the package's public functions and classes (deduplicated)."""
  found = {}
  seen = set()
  for module in _modules():
    for name in _public_names(module):
      obj = getattr(module, name)
      if not (_is_function(obj) or inspect.isclass(obj)):
        continue
      if not getattr(obj, '__module__', '').startswith('qscore_jax'):
        continue
      if id(obj) in seen:
        continue
      seen.add(id(obj))
      found[f'{obj.__module__}.{getattr(obj, "__qualname__", name)}'] = obj
  return found


def _sections(doc: str) -> str:
  """The text of the docstring's name-listing sections (Args:, Attributes:, ...)."""
  out, inside = [], False
  for line in doc.splitlines():
    match = _ANY_SECTION.match(line)
    if match:
      inside = match.group(1) in _NAME_SECTIONS
      continue
    if inside:
      out.append(line)
  return '\n'.join(out)


def _documents(doc: str, name: str) -> bool:
  """Whether ``doc`` documents ``name``: in a name section, or as ``name`` in the prose."""
  word = re.compile(rf'(?<![\w.]){re.escape(name)}(?!\w)')
  if word.search(_sections(doc)):
    return True
  return re.search(rf'``\**{re.escape(name)}(?!\w)', doc) is not None


def _parameters(func, skip_first: bool = False):
  try:
    signature = inspect.signature(func)
  except (TypeError, ValueError):
    return []
  params = list(signature.parameters.values())
  if skip_first and params:
    params = params[1:]
  return [p.name for p in params if p.name not in ('self', 'cls')]


def _function_problems(label, func, skip_first=False, extra_doc=''):
  doc = inspect.getdoc(func) or ''
  if not doc.strip():
    return [f'{label}: no docstring']
  doc = doc + '\n' + extra_doc
  return [f'{label}: parameter {p!r} not documented'
          for p in _parameters(func, skip_first) if not _documents(doc, p)]


def _fields(cls):
  """Constructor parameters of a class: dataclass / NamedTuple fields, else __init__'s."""
  if dataclasses.is_dataclass(cls):
    # Only the fields the package declares (not those of tfds' BuilderConfig or
    # Flax's parent/name).
    own = set()
    for base in cls.__mro__:
      if base.__module__.startswith('qscore_jax'):
        own.update(vars(base).get('__annotations__', {}))
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name in own]
    return [n for n in names if n not in _FLAX_FIELDS] if _is_flax_module(cls) else names
  if issubclass(cls, tuple) and hasattr(cls, '_fields'):
    return list(cls._fields)
  init = cls.__dict__.get('__init__')
  if init is not None and getattr(init, '__module__', '').startswith('qscore_jax'):
    return _parameters(init, skip_first=True)
  return []


def _is_flax_module(cls):
  try:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return issubclass(cls, nn.Module)


def _class_problems(label, cls):
  doc = inspect.getdoc(cls) or ''
  generated = dataclasses.is_dataclass(cls) and doc.startswith(f'{cls.__name__}(')
  if not doc.strip() or generated or doc == inspect.getdoc(cls.__mro__[1]):
    return [f'{label}: no docstring']
  problems = []
  init = cls.__dict__.get('__init__')
  init_doc = (inspect.getdoc(init) or '') if init is not None and not dataclasses.is_dataclass(
      cls) else ''
  for field in _fields(cls):
    if not _documents(doc + '\n' + init_doc, field):
      problems.append(f'{label}: field/parameter {field!r} not documented')
  for name, member in vars(cls).items():
    if name.startswith('_') and name != '__call__':
      continue
    member = getattr(member, 'wrapped', member)  # Flax wraps a module's descriptors
    if isinstance(member, property):
      if not (member.__doc__ or '').strip():
        problems.append(f'{label}.{name}: property without docstring')
      continue
    skip = isinstance(member, classmethod)
    func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
    if not inspect.isfunction(func) or not getattr(func, '__module__', '').startswith('qscore_jax'):
      continue  # dataclass/flax-generated or inherited
    if func.__qualname__.split('.')[0] != cls.__qualname__.split('.')[0]:
      continue  # generated (e.g. flax.struct's replace)
    problems += _function_problems(f'{label}.{name}', func, skip_first=skip)
  return problems


def test_there_is_a_public_api_to_check():
  objects = _public_objects()
  assert len(objects) > 100
  assert 'qscore_jax.stats.qscore' in objects and 'qscore_jax.cli.build_parser' in objects


def test_every_public_function_and_class_documents_its_arguments():
  problems = []
  for label, obj in sorted(_public_objects().items()):
    if inspect.isclass(obj):
      problems += _class_problems(label, obj)
    else:
      problems += _function_problems(label, obj)
  assert not problems, (f'{len(problems)} documentation problem(s):\n  '
                        + '\n  '.join(problems))


def test_the_checker_catches_an_undocumented_parameter():
  def documented(images, eps=4.0, **options):
    """Does something.

    Args:
      images: (N, H, W, 3) float32.
      eps, **options: thresholds.
    """
    del images, eps, options

  def prose(counts, band):
    """Band of ``counts`` between the ``band`` percentiles."""
    del counts, band

  def undocumented(images, eps=4.0):
    """Does something with images.

    Args:
      images: (N, H, W, 3) float32.
    Returns:
      eps-thresholded (not a documented name: outside Args).
    """
    del images, eps

  assert not _function_problems('documented', documented)
  assert not _function_problems('prose', prose)
  assert _function_problems('undocumented', undocumented) == [
      "undocumented: parameter 'eps' not documented"]
  assert _function_problems('bare', lambda x: x) == ['bare: no docstring']


# ----------------------------------------------------------------------------- the CLI


# pylint: disable=protected-access
# Actions whose default is not a value the user would pass (flags, accumulators).
_NO_DEFAULT_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction,
                       argparse._StoreConstAction, argparse._AppendAction, argparse._CountAction)


def _subparsers(parser):
  """``({command: subparser}, {command: its help})`` of a parser with subcommands."""
  action, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  helps = {choice.dest: choice.help for choice in action._choices_actions}
  return action.choices, helps


def _states_default(action):
  """Whether an argument has a default its help should state."""
  if isinstance(action, _NO_DEFAULT_ACTIONS):
    return False
  return action.default is not None and action.default is not argparse.SUPPRESS


def _parser_problems(parser):
  """Every help problem of a parser and its subcommands, one readable line each."""
  choices, helps = _subparsers(parser)
  prog = parser.prog
  problems = [] if (parser.description or '').strip() else [f'{prog}: no description']
  commands = [('', parser)] + [(f' {command}', sub) for command, sub in choices.items()]
  for command, sub in commands:
    if command and not (helps.get(command.strip()) or '').strip():
      problems.append(f'{prog}{command}: no help')
    if command and not (sub.description or '').strip():
      problems.append(f'{prog}{command}: no description')
    for action in sub._actions:
      if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
        continue
      flag = '/'.join(action.option_strings) or action.dest
      text = (action.help or '').strip()
      if not text or text == argparse.SUPPRESS:
        problems.append(f'{prog}{command} {flag}: no help')
      elif _states_default(action) and not re.search(r'default|%\(default\)', text):
        problems.append(f'{prog}{command} {flag}: help does not state the default '
                        f'{action.default!r}')
  return problems
# pylint: enable=protected-access


def test_every_subcommand_and_argument_has_help():
  problems = _parser_problems(cli.build_parser())
  assert not problems, f'{len(problems)} CLI help problem(s):\n  ' + '\n  '.join(problems)


def test_the_cli_checker_catches_missing_helps():
  parser = argparse.ArgumentParser(prog='toy', description='A toy.')
  commands = parser.add_subparsers(dest='command')
  good = commands.add_parser('good', help='fine', description='Fine.')
  good.add_argument('--size', type=int, default=3, help='a size (default 3)')
  good.add_argument('--flag', action='store_true', help='a flag')
  bad = commands.add_parser('bad')
  bad.add_argument('path')
  bad.add_argument('--size', type=int, default=3, help='a size')
  assert _parser_problems(parser) == [
      'toy bad: no help', 'toy bad: no description', 'toy bad path: no help',
      "toy bad --size: help does not state the default 3"]


def _lists_commands(text: str, commands) -> list[str]:
  """The commands that ``text`` (a ``--help`` output) does not list on a line of their own."""
  return [c for c in commands if not re.search(rf'^\s+{re.escape(c)}\s', text, re.MULTILINE)]


def test_help_of_every_command_formats_and_lists_the_subcommands(capsys):
  parser = cli.build_parser()
  choices, _ = _subparsers(parser)
  missing = _lists_commands(parser.format_help(), choices)
  assert not missing, f'qscore --help does not list {missing}'
  for command, sub in choices.items():
    assert sub.format_help().startswith(f'usage: qscore {command}'), command
    with pytest.raises(SystemExit) as stop:  # `qscore <command> --help` through main()
      cli.main([command, '--help'])
    assert stop.value.code == 0, command
    out = capsys.readouterr().out
    assert out.startswith(f'usage: qscore {command}') and sub.description.split()[0] in out, command


def _launchers():
  """``python -m qscore_jax.cli``, and the installed ``qscore`` script when there is one."""
  launchers = [[sys.executable, '-m', 'qscore_jax.cli']]
  script = pathlib.Path(sys.executable).with_name('qscore')
  if script.is_file():
    launchers.append([str(script)])
  return launchers


@pytest.mark.parametrize('launcher', _launchers(), ids=lambda argv: pathlib.Path(argv[-1]).name)
def test_help_runs_as_a_command(launcher):
  result = subprocess.run([*launcher, '--help'], capture_output=True, text=True, check=True,
                          timeout=300)
  assert result.stdout.startswith('usage: qscore')
  choices, _ = _subparsers(cli.build_parser())
  missing = _lists_commands(result.stdout, choices)
  assert not missing, f'`qscore --help` does not list {missing}'
  result = subprocess.run([*launcher, 'inspect', '--help'], capture_output=True, text=True,
                          check=True, timeout=300)
  assert result.stdout.startswith('usage: qscore inspect')

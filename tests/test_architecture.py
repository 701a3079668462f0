"""The package's layers (ARCHITECTURE.md), checked on its import statements.

The import graph is read from the source (every ``import`` statement, at module
level or inside a function), so a cycle cannot hide in a function-level import.
"""

import ast
import itertools
import pathlib
import re
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'qscore_jax'

# The layer of every module: a module imports only modules of its own layer or below.
CORE, IO, DRIVER, CLI, FACADE = range(5)
LAYER_NAMES = {CORE: 'core (pure array functions)', IO: 'I/O (stores, weights, converters, data)',
               DRIVER: 'drivers', CLI: 'the CLI', FACADE: 'the package facade'}
LAYERS = {
    # Pure array functions: statistics, regularizer, losses, metrics, probe, heatmaps, the
    # Flax modules and their variables. No files, no datasets.
    CORE: {'qscore_jax._text', 'qscore_jax._version', 'qscore_jax._xla_cpu', 'qscore_jax.parallel',
           'qscore_jax.stats', 'qscore_jax.validation', 'qscore_jax.regularizer',
           'qscore_jax.losses', 'qscore_jax.metrics', 'qscore_jax.findings', 'qscore_jax.probe', 'qscore_jax.compression',
           'qscore_jax.saliency', 'qscore_jax.models.features', 'qscore_jax.models.inputs',
           'qscore_jax.models.pooling', 'qscore_jax.models.precision', 'qscore_jax.models.cpu_conv', 'qscore_jax.models.resnet', 'qscore_jax.models.vit',
           'qscore_jax.models.heads', 'qscore_jax.models.variables',
           'qscore_jax.finetune.core', 'qscore_jax.finetune.methods', 'qscore_jax.finetune'},
    # Reading and writing: representation stores, figures and JSON, saved models, the
    # registry of releases, converters, datasets and input pipelines.
    IO: {'qscore_jax.outputs', 'qscore_jax.remote', 'qscore_jax.store', 'qscore_jax.streaming', 'qscore_jax.report',
         'qscore_jax.models',
         'qscore_jax.models.registry', 'qscore_jax.models.weights', 'qscore_jax.models.encoder',
         'qscore_jax.convert', 'qscore_jax.convert.api', 'qscore_jax.convert.download',
         'qscore_jax.convert.layout', 'qscore_jax.convert.readers', 'qscore_jax.convert.rules',
         'qscore_jax.data', 'qscore_jax.data._tensorflow', 'qscore_jax.data.augment',
         'qscore_jax.data.datasets', 'qscore_jax.data.digits', 'qscore_jax.data.errors',
         'qscore_jax.data.folder', 'qscore_jax.data.imagenet100', 'qscore_jax.data.pipeline',
         'qscore_jax.data.preprocess', 'qscore_jax.data.preprocessing',
         'qscore_jax.data.salient', 'qscore_jax.data.synthetic', 'qscore_jax.finetune.workdir'},
    # What runs the method end to end, and the configs that describe runs.
    DRIVER: {'qscore_jax.embed', 'qscore_jax.analysis', 'qscore_jax.interpret',
             'qscore_jax.demo', 'qscore_jax.experiment', 'qscore_jax.study', 'qscore_jax.track',
             'qscore_jax.summary',
             'qscore_jax.supervised', 'qscore_jax.finetune.loop', 'qscore_jax.configs',
             'qscore_jax.configs.*'},
    CLI: {'qscore_jax.cli'},
    FACADE: {'qscore_jax'},
}
# Core modules that may not import the data package even though it is below drivers.
FORBIDDEN_FOR_CORE = ('qscore_jax.data',)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))
          if 'checkpoints' not in p.relative_to(PACKAGE).parts}


def _imports(name: str, path: pathlib.Path, modules) -> list[tuple[str, ast.stmt]]:
  """``(imported package module, statement)`` for every import of a qscore_jax module."""

  def known(dotted):
    while dotted and dotted not in modules:
      dotted = dotted.rpartition('.')[0]
    return dotted or None

  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [known(a.name) for a in node.names if a.name.startswith('qscore_jax')]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        for _ in range(node.level - 1):
          package = package.rpartition('.')[0]
        base = f'{package}.{base}' if base else package
      if base.startswith('qscore_jax'):
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else known(base)
                   for a in node.names]
    found += [(t, node) for t in targets if t and t != name]
  return found


def _layer(name: str) -> int:
  for layer, members in LAYERS.items():
    if name in members or any(m.endswith('.*') and name.startswith(m[:-1]) for m in members):
      return layer
  raise AssertionError(f'{name} is in no layer: add it to LAYERS here and to ARCHITECTURE.md.')


def _graph():
  modules = _modules()
  return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
  for name in _modules():
    _layer(name)


def test_no_import_cycle_among_the_packages_modules():
  _, graph = _graph()
  edges = {m: sorted({t for t, _ in imports}) for m, imports in graph.items()}
  # Tarjan's strongly connected components: any with two or more modules is a cycle.
  index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], itertools.count()

  def visit(v):
    index[v] = low[v] = next(counter)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for module in edges:
    if module not in index:
      visit(module)
  assert not cycles, f'import cycles: {cycles}'


def test_each_layer_imports_only_its_own_layer_and_those_below():
  modules, graph = _graph()
  wrong = []
  for module, imports in graph.items():
    for target, node in imports:
      if _layer(target) > _layer(module) or target in LAYERS[FACADE] | LAYERS[CLI]:
        wrong.append(f'{modules[module].relative_to(PACKAGE.parent)}:{node.lineno}: '
                     f'{module} ({LAYER_NAMES[_layer(module)]}) imports {target} '
                     f'({LAYER_NAMES[_layer(target)]})')
      if _layer(module) == CORE and target.startswith(FORBIDDEN_FOR_CORE):
        wrong.append(f'{module} is a pure array module but imports {target}')
  assert not wrong, '\n'.join(wrong)


def test_imports_inside_functions_say_why():
  """Only where they keep `import qscore_jax` and `qscore --help` fast (or an optional
  dependency optional), with a one-line comment above the block of imports."""
  silent = []
  for module, path in _modules().items():
    lines = path.read_text().splitlines()
    for function in ast.walk(ast.parse(path.read_text())):
      if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(function):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
          continue
        above = node.lineno - 2
        while above >= 0 and lines[above].strip().startswith(('import ', 'from ')):
          above -= 1  # one reason covers a block of imports
        if above < 0 or not lines[above].strip().startswith('#'):
          silent.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} ({module})')
  assert not silent, 'function-level imports without a reason comment above them:\n' + \
      '\n'.join(silent)


@pytest.mark.parametrize('statement', ['import qscore_jax', 'import qscore_jax.cli',
                                       'import qscore_jax.data.preprocessing',
                                       'import qscore_jax.data.augment'])
def test_importing_the_package_imports_neither_tensorflow_nor_torch(statement):
  heavy = ('tensorflow', 'tensorflow_datasets', 'torch', 'torchvision', 'timm')
  code = (f'import sys; {statement}; '
          f'print(",".join(m for m in {heavy!r} if m in sys.modules))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, timeout=300)
  assert result.stdout.strip() == '', f'`{statement}` imports {result.stdout.strip()}'


def test_architecture_md_places_every_module():
  """The map stays true: every module's path appears in ARCHITECTURE.md's table (as
  ``name``, ``package/name``, ``package/*`` or ``package/{a,name,b}``)."""
  text = (PACKAGE / 'ARCHITECTURE.md').read_text()
  missing = []
  for name, source in _modules().items():
    parts = name.split('.')[1:]
    if source.name == '__init__.py' or parts[-1].startswith('_'):
      continue  # packages are placed by their modules; private helpers go with them
    path, package, leaf = '/'.join(parts), '/'.join(parts[:-1]), parts[-1]
    forms = [f'`{path}`', f'`{path}/*`', f'{path}/*'] + (
        [f'{package}/*', f'{package}/{leaf}'] if package else [])
    braces = any(leaf in group.split(',') for group in
                 re.findall(rf'{package}/\{{([^}}]*)\}}', text)) if package else False
    if not braces and not any(form in text for form in forms):
      missing.append(path)
  assert not missing, f'ARCHITECTURE.md does not place: {missing}'

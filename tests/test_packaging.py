"""The package installs what it needs: every sub-package and the checkpoint registry."""

import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared_packages():
  config = configparser.ConfigParser()
  config.read(ROOT / 'setup.cfg')
  return set(config['options']['packages'].split())


def test_every_subpackage_is_declared():
  found = {'.'.join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / 'qscore_jax').rglob('__init__.py')}
  assert found | {'qscore_jax.checkpoints'} == _declared_packages()


def test_wheel_contains_the_registry_and_the_demo_model(tmp_path):
  source = tmp_path / 'src'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '*.egg-info', 'build', '__pycache__', '.pytest_cache'))
  for converted in (source / 'checkpoints').iterdir():  # git-ignored conversions
    if converted.is_dir() and converted.name not in ('__pycache__', 'demo-simclr-r18w025'):
      shutil.rmtree(converted)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(source)], check=True)
  wheel, = (tmp_path / 'dist').glob('qscore_jax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  assert 'qscore_jax/checkpoints/registry.toml' in names
  assert 'qscore_jax/models/resnet.py' in names
  assert not any(n.startswith('tests/') for n in names)
  shipped = {n for n in names if n.startswith('qscore_jax/checkpoints/demo-simclr-r18w025/')}
  in_repo = {'qscore_jax/checkpoints/' + str(p.relative_to(ROOT / 'checkpoints'))
             for p in (ROOT / 'checkpoints' / 'demo-simclr-r18w025').rglob('*') if p.is_file()}
  assert shipped == in_repo and shipped

  # Installed from the wheel (not editable), the shipped model resolves and loads from any
  # working directory.
  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
                  str(site), str(wheel)], check=True)
  script = ('from qscore_jax.models.weights import load_model, resolve_model_dir\n'
            'directory = resolve_model_dir("demo-simclr-r18w025")\n'
            'model, variables, meta = load_model(directory)\n'
            'print(directory, model.num_features)')
  result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': str(site)})
  assert result.returncode == 0, result.stderr[-3000:]
  directory, dim = result.stdout.split()
  assert pathlib.Path(directory).is_relative_to(site) and dim == '128'

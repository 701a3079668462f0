"""The package installs what it needs: every sub-package and the checkpoint registry."""

import configparser
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


def test_wheel_contains_the_registry(tmp_path):
  source = tmp_path / 'src'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '*.egg-info', 'build', '__pycache__', '.pytest_cache'))
  for converted in (source / 'checkpoints').iterdir():  # git-ignored conversions
    if converted.is_dir() and converted.name != '__pycache__':
      shutil.rmtree(converted)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(source)], check=True)
  wheel, = (tmp_path / 'dist').glob('qscore_jax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  assert 'qscore_jax/checkpoints/registry.toml' in names
  assert 'qscore_jax/models/resnet.py' in names
  assert not any(n.startswith('tests/') for n in names)

"""The README says what the repository does: its commands and its supported-models table."""

import pathlib
import re
import urllib.parse

from qscore_jax.models import list_models
from parity_cases import (COVERED_ELSEWHERE, SLOW, SMALL_IN_DEFAULT_RUN, parity_status,
                          registry_configurations)

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()

DEMO_COMMAND = 'pip install -e . && qscore demo'
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest'

# Where each claim of the table's last column is tested.
CONVERTER_TESTS = {  # (method, container) -> test of tests/test_convert.py
    ('simclr', 'tf1'): 'test_simclr_v2_tf1',
    ('simclr', 'tf1_zip'): 'test_simclr_v1_zip',
    ('swav', 'torch_flat'): 'test_swav',
    ('moco', 'torch_state_dict'): 'test_moco',
    ('mocov3', 'torch_state_dict'): 'test_mocov3',
    ('byol', 'byol_pickle'): 'test_byol_pickle',
    ('dino', 'torch_flat'): 'test_dino_backbone_only',
    ('dino', 'torch_full'): 'test_dino_full',
    ('simsiam', 'torch_state_dict'): 'test_simsiam',
    ('vicreg', 'torch_flat'): 'test_vicreg_and_barlowtwins',
    ('vicreg', 'torch_full'): 'test_vicreg_and_barlowtwins',
    ('barlowtwins', 'torch_flat'): 'test_vicreg_and_barlowtwins',
    ('barlowtwins', 'torch_full'): 'test_vicreg_and_barlowtwins',
}
# The selective-kernel (sk_ratio) SimCLR rows: tests/test_simclr_sk.py.
# Files with the complete top-level structure the official code writes (optimizer states,
# scalers, args, ...): tests/test_convert_layouts.py. Flat backbone files hold nothing else.
LAYOUT_TESTS = {
    # SimCLR v2's TF1 files: test_simclr_v2_tf1 / test_simclr_sk.py write them complete.
    ('simclr', 'tf1_zip'): 'test_simclr_release',
    ('swav', 'torch_flat'): 'test_swav_training_checkpoint',
    ('moco', 'torch_state_dict'): 'test_moco_release',
    ('mocov3', 'torch_state_dict'): 'test_mocov3_release',
    ('byol', 'byol_pickle'): 'test_byol_release',
    ('dino', 'torch_full'): 'test_dino_full_release',
    ('simsiam', 'torch_state_dict'): 'test_simsiam_release',
    ('vicreg', 'torch_full'): 'test_vicreg_and_barlowtwins_full_release',
    ('barlowtwins', 'torch_full'): 'test_vicreg_and_barlowtwins_full_release',
}
SK_CONVERTER_TEST = 'test_tf1_checkpoint_end_to_end'


def _architecture_status(spec) -> str:
  """How the backbone of ``spec`` is verified: its outputs against torchvision / timm with
  random weights, at its real depth and width, by the test that tests/parity_cases.py names
  (tests/test_resnet_parity.py, tests/test_vit_parity.py)."""
  options = dict(spec.arch_options)
  if options.get('sk_ratio'):  # tests/test_simclr_sk.py, every row at its depth and width
    where = ('224x224 and 225x193' if spec.id == 'simclr-v2-r50x1-sk1'
             else 'this depth and width, 64x72, slow test')
    return f'outputs = PyTorch SK reference written from google-research/simclr ({where})'
  if spec.arch.startswith('vit'):
    interpolation = options.get('pos_embed_interpolation') == 'dino'
    reference = 'timm' + (", with DINO's interpolation" if interpolation else '')
  else:
    details = []
    width = options.get('width_multiplier', 1)
    if width != 1:
      details.append(f'every channel ×{width:g}')
    if options.get('conv_padding') == 'tf_same':
      details.append('TF SAME padding by hand')
    elif options.get('pool_padding') == 'tf_same':
      details.append('TF-SAME max-pool by hand')
    reference = 'torchvision' + (f' ({", ".join(details)})' if details else '')
  return f'outputs = {reference}: {parity_status(spec.arch, options)}'


def _source(url: str) -> str:
  parsed = urllib.parse.urlparse(url)
  return f'[{parsed.netloc}]({url})'


def models_table_lines() -> list[str]:
  """The README's supported-models table, from the registry."""
  lines = ['| id | method | architecture | official source | preprocessing | parity testing |',
           '|---|---|---|---|---|---|']
  for spec in list_models():
    options = ', '.join(f'{k}={v}' for k, v in spec.arch_options.items())
    arch = f'{spec.arch} ({options})' if options else spec.arch
    if spec.supported:
      container = spec.container + ('_zip' if spec.url.endswith('.zip') else '')
      converter = (f'test_simclr_sk.py::{SK_CONVERTER_TEST}' if spec.arch_options.get('sk_ratio')
                   else CONVERTER_TESTS[(spec.method, container)])
      status = f'{_architecture_status(spec)}; converter: `{converter}`'
      if (spec.method, container) in LAYOUT_TESTS and not spec.arch_options.get('sk_ratio'):
        status += (f', full layout: `test_convert_layouts.py::'
                   f'{LAYOUT_TESTS[(spec.method, container)]}`')
    else:
      status = f'**not supported**: {spec.reason}'
    lines.append(f'| `{spec.id}` | {spec.method} | {arch} | {_source(spec.url)} | '
                 f'{spec.preprocessing.name} | {status} |')
  return lines


def test_the_first_lines_are_the_two_commands_and_ci_runs_the_second():
  block = README.split('```bash\n', 1)[1].split('```', 1)[0].splitlines()
  assert [line.split('  #')[0].strip() for line in block] == [DEMO_COMMAND, TEST_COMMAND]
  assert README.index('```bash') < 40  # the first thing a newcomer sees
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert ci[-1] == TEST_COMMAND


def test_the_supported_models_table_is_the_registry():
  expected = '\n'.join(models_table_lines())
  assert expected in README, ('README.md\'s supported-models table differs from the registry; '
                              'replace it with:\n' + expected)


def test_every_converter_test_named_in_the_table_exists():
  tests = (ROOT / 'tests' / 'test_convert.py').read_text()
  for names in CONVERTER_TESTS.values():
    for name in names.split(', '):
      assert re.search(rf'^def {name}\(', tests, re.M), name
  sk_tests = (ROOT / 'tests' / 'test_simclr_sk.py').read_text()
  assert re.search(rf'^def {SK_CONVERTER_TEST}\(', sk_tests, re.M)
  layout_tests = (ROOT / 'tests' / 'test_convert_layouts.py').read_text()
  for name in LAYOUT_TESTS.values():
    assert re.search(rf'^def {name}\(', layout_tests, re.M), name


def test_every_parity_test_named_in_the_table_exists():
  configurations = {**registry_configurations('resnet'), **registry_configurations('vit')}
  assert SMALL_IN_DEFAULT_RUN <= SLOW <= set(configurations)
  assert set(COVERED_ELSEWHERE) <= set(configurations)
  for name in COVERED_ELSEWHERE.values():
    module, test = name.split('::')
    assert re.search(rf'^def {test}\(', (ROOT / 'tests' / module).read_text(), re.M), name
  for module in ('test_resnet_parity.py', 'test_vit_parity.py'):
    assert re.search(r'^def test_registry_backbone_parity\(arch, options\):',
                     (ROOT / 'tests' / module).read_text(), re.M), module


def test_every_cli_command_is_in_the_readme():
  from qscore_jax import cli  # pylint: disable=import-outside-toplevel
  parser = cli.build_parser()
  commands = next(a for a in parser._actions if a.dest == 'command').choices  # pylint: disable=protected-access
  section = README.split('## Command line', 1)[1].split('\n## ', 1)[0]
  for name in commands:
    assert f'qscore {name}' in section, name

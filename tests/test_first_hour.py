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


def test_datasets_lists_every_config_of_the_built_in_datasets(capsys):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from qscore_jax.data.datasets import BUILT_IN  # pylint: disable=import-outside-toplevel
  from qscore_jax.demo import DEMO_DATASET  # pylint: disable=import-outside-toplevel
  assert cli.main(['datasets']) == 0
  lines = capsys.readouterr().out.splitlines()
  listed = {line.split()[0]: line for line in lines if line.startswith('    ')}
  assert DEMO_DATASET in listed
  for base in BUILT_IN:
    configs = tfds.builder_cls(base).BUILDER_CONFIGS
    for config in configs:  # one line each, saying what it is
      assert config.description in listed[f'{base}/{config.name}']
    assert any(line.startswith(f'  {base}: ') for line in lines)  # the dataset, what it is


def test_a_dataset_typo_suggests_each_name_once(tmp_path, capsys):
  argv = ['embed', 'demo-simclr-r18w025', '--dataset', 'synthetic_shapez', '--split', 'test',
          '--out', str(tmp_path / 'store'), '--no-progress']
  assert cli.main(argv) == 2
  suggested = _suggestions(capsys.readouterr().err)
  assert suggested == ['synthetic_shapes']
  # With a config: the full name/config strings.
  from qscore_jax.data.datasets import builder  # pylint: disable=import-outside-toplevel
  with pytest.raises(DatasetError) as error:
    builder('synthetic_shapez/fixed_colours_smal')
  assert _suggestions(str(error.value)) == ['synthetic_shapes/fixed_colours_small']


def test_a_config_typo_names_every_config_of_the_dataset():
  from qscore_jax.data.datasets import builder  # pylint: disable=import-outside-toplevel
  with pytest.raises(DatasetError) as error:
    builder('synthetic_shapes/fixed_colours_smal')
  message = str(error.value)
  assert "Unknown config 'fixed_colours_smal'" in message
  assert 'default, small, tiny, fixed_colours, fixed_colours_small' in message
  suggested = _suggestions(message)
  assert suggested[0] == 'synthetic_shapes/fixed_colours_small'
  assert len(set(suggested)) == len(suggested)
  assert 'Here are' not in message and 'BuilderConfig' not in message  # not tfds's own text
  with pytest.raises(DatasetError, match="imagenet100 has no configs; use plain 'imagenet100'"):
    builder('imagenet100/x')


@pytest.mark.parametrize('command', [['inspect'], ['embed', '--dataset', 'synthetic_shapes/tiny',
                                                   '--split', 'test', '--out', 'store']])
def test_a_registry_path_that_is_not_converted_says_to_convert_it(command, tmp_path, monkeypatch,
                                                                 capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main([command[0], 'checkpoints/swav-r50-800ep', *command[1:]]) == 2
  err = capsys.readouterr().err
  assert 'run `qscore convert swav-r50-800ep` first' in err
  assert '`qscore inspect swav-r50-800ep` alone builds its architecture with random weights' in err
  assert 'Did you mean' not in err
  # An existing directory named like an id, without a model in it: the same advice.
  (tmp_path / 'models' / 'dino-vits16').mkdir(parents=True)
  from qscore_jax.models import load_encoder  # pylint: disable=import-outside-toplevel
  with pytest.raises(FileNotFoundError, match=r'metadata\.json missing.*qscore convert '
                                              r'dino-vits16 --out models/dino-vits16'):
    load_encoder('models/dino-vits16')


def test_demo_help_and_readme_give_the_same_duration(capsys):
  first_command = next(line for line in README.splitlines() if 'qscore demo  ' in line)
  duration = re.search(r'\(([^()]*minute[^()]*)\)', first_command).group(1)
  assert duration == 'about a minute on 2 CPU cores'
  with pytest.raises(SystemExit):
    cli.main(['--help'])
  help_text = ' '.join(capsys.readouterr().out.split())
  assert duration in help_text
  assert 'few minutes' not in help_text


def test_readme_status_row_states_the_registry_counts():
  specs = list_models()
  methods = {s.method for s in specs}
  families = {'moco' if m == 'mocov3' else m for m in methods}
  unsupported = [s for s in specs if not s.supported]
  row = next(line for line in README.splitlines()
             if line.startswith('| registry of the published checkpoints'))
  assert f'{len(specs)} entries of {len(families)} methods, {len(methods)} `method` names' in row
  if unsupported:
    assert (f'{len(specs) - len(unsupported)} convertible, {len(unsupported)} listed as '
            'unsupported with the reason (`qscore models`)') in row
  else:
    assert f'all {len(specs)} convertible, none listed as unsupported' in row


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


def test_gitignore_covers_the_venv_and_the_default_outputs():
  patterns = (ROOT / '.gitignore').read_text().splitlines()
  assert cli.build_parser().parse_args(['demo']).out == 'qscore_demo'
  assert 'runs/' in README  # the README's commands write there
  for pattern in ('.venv/', 'qscore_demo/', 'runs/'):
    assert pattern in patterns


def test_readme_gives_the_cpu_only_torch_route_with_the_pins_of_setup_cfg():
  setup = configparser.ConfigParser()
  setup.read(ROOT / 'setup.cfg')
  test_extra = [line.strip() for line in setup['options.extras_require']['test'].splitlines()
                if line.strip() and not line.strip().startswith('#')]
  pins = [req for req in test_extra if re.match(r'(torch|torchvision)\b', req)]
  assert len(pins) == 2
  command = next(line for line in README.splitlines() if 'download.pytorch.org/whl/cpu' in line)
  assert command.startswith('`pip install ' + ' '.join(f'"{pin}"' for pin in pins)
                            + ' --index-url https://download.pytorch.org/whl/cpu`')
  # Said next to the test command's explanation, not in the two commands themselves.
  start = README.index('```bash')
  assert README.index('3.2 GB') > README.index('```', start + 3)
  assert README.index(command) < README.index('## `qscore demo`')
  after = README[README.index(command):README.index('## `qscore demo`')]
  assert 'pip install -e ".[test]"' in after


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_is_half_of_google_research_simclr_loss(temperature):
  """google-research/simclr objective.py add_contrastive_loss, in float64 NumPy: loss_a + loss_b."""
  rng = np.random.default_rng(7)
  z1 = rng.standard_normal((8, 16)).astype(np.float32)
  z2 = (z1 + 0.5 * rng.standard_normal((8, 16))).astype(np.float32)
  large_num = 1e9
  h1, h2 = (z.astype(np.float64) / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
            for z in (z1, z2))
  n = h1.shape[0]
  labels = np.eye(n, 2 * n)  # one_hot(arange(N), 2N)
  masks = np.eye(n)
  logits_aa = h1 @ h1.T / temperature - masks * large_num
  logits_bb = h2 @ h2.T / temperature - masks * large_num
  logits_ab = h1 @ h2.T / temperature
  logits_ba = h2 @ h1.T / temperature

  def softmax_cross_entropy(onehot, logits):  # tf.losses' default: mean over the N rows
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(np.sum(onehot * log_softmax, axis=1))

  loss_a = softmax_cross_entropy(labels, np.concatenate([logits_ab, logits_aa], 1))
  loss_b = softmax_cross_entropy(labels, np.concatenate([logits_ba, logits_bb], 1))
  ours = float(losses.nt_xent(z1, z2, temperature=temperature))
  assert 2 * ours == pytest.approx(loss_a + loss_b, rel=1e-5)
  assert ours != pytest.approx(loss_a + loss_b, rel=0.1)  # not the same scale
  # ... and the module and the function say so.
  for doc in (losses.__doc__, losses.nt_xent.__doc__):
    assert 'loss_a + loss_b' in doc and 'google-research/simclr' in doc and 'half' in doc

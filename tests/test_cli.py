"""The `qscore` command line: listing models and the inspect path."""

import dataclasses
import json
import subprocess
import sys

import pytest

from qscore_jax import cli, summary


def test_models_lists_the_registry(capsys, monkeypatch):
  assert cli.main(['models']) == 0
  out = capsys.readouterr().out
  assert 'dino-vits16' in out and 'num_heads=6' in out and 'sk_ratio=0.0625' in out
  assert 'not supported' not in out  # every entry converts
  # An entry that is not supported says why (none is since the SimCLR v2 _sk1 nets).
  import qscore_jax.models  # pylint: disable=import-outside-toplevel
  listed = qscore_jax.models.list_models
  monkeypatch.setattr(qscore_jax.models, 'list_models', lambda method=None, **kw: [
      dataclasses.replace(s, supported=False, reason='Reason X.') if s.id == 'byol-r50x1' else s
      for s in listed(method, **kw)])
  assert cli.main(['models', '--method', 'byol']) == 0
  assert '[not supported: Reason X.]' in capsys.readouterr().out
  assert cli.main(['models', '--method', 'byol', '--json']) == 0
  entries = json.loads(capsys.readouterr().out)
  assert {e['id'] for e in entries} == {'byol-r50x1', 'byol-r200x2'}
  assert all(e['url'].startswith('https://storage.googleapis.com/deepmind-byol/') for e in entries)


def test_inspect_reports_representation_statistics(capsys):
  assert cli.main(['inspect', 'resnet18', '--batch-size', '3', '--image-size', '64',
                   '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  rep = report['representation']
  assert report['batch_shape'] == [3, 64, 64, 3]
  assert rep['dim'] == 512 and rep['num_samples'] == 3
  assert rep['fraction_finite'] == 1.0
  assert rep['min'] >= 0  # pooled ReLU features
  assert report['weights'] == 'random initialisation'


def test_inspect_text_report_of_a_saved_model(tmp_path, capsys):
  from helpers import random_variables  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import build_model, get_model_spec, save_model  # pylint: disable=import-outside-toplevel
  model = build_model('vit_small', depth=1, embed_dim=32, num_heads=2, image_size=32)
  save_model(tmp_path / 'tiny', random_variables(model), get_model_spec('dino-vits16'),
             arch_options={'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'image_size': 32,
                           'patch_size': 16})
  assert cli.main(['inspect', str(tmp_path / 'tiny'), '--batch-size', '2',
                   '--image-size', '32']) == 0
  out = capsys.readouterr().out
  assert 'dino-vits16' in out and str(tmp_path / 'tiny') in out
  assert 'd=32' in out and 'highly active' in out


@pytest.mark.parametrize('argv,message', [
    (['inspect', 'resnet-50'], "neither a saved model directory.*Did you mean.*'resnet50'"),
    (['inspect', 'resnet18', '--batch-size', '0'], 'at least 1'),
    (['models', '--method', 'mae'], 'Unknown method'),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'qscore {argv[0]}: error:')
  import re  # pylint: disable=import-outside-toplevel
  assert re.search(message, err)


def test_console_script_help():
  result = subprocess.run([sys.executable, '-m', 'qscore_jax.cli', '--help'],
                          capture_output=True, text=True, check=True)
  assert all(command in result.stdout for command in ('inspect', 'models', 'interpret', 'experiment'))


def test_generated_images_are_deterministic_and_in_range():
  a = summary.generated_images(4, 32, 48, seed=3)
  b = summary.generated_images(4, 32, 48, seed=3)
  assert a.shape == (4, 32, 48, 3) and a.dtype.name == 'float32'
  assert (a == b).all() and a.min() >= 0 and a.max() <= 1
  assert not (a == summary.generated_images(4, 32, 48, seed=4)).all()


def test_datasets_and_prepare_commands(tmp_path, capsys):
  assert cli.main(['datasets']) == 0
  assert 'folder:/path' in capsys.readouterr().out
  assert cli.main(['prepare', 'synthetic_shapes/tiny', '--data-dir', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert 'synthetic_shapes/tiny: 10 classes, splits: test 128, train 256' in out
  assert 'core/spurious masks' in out
  assert cli.main(['datasets', 'cifar1']) == 2
  assert "Did you mean 'cifar10'" in capsys.readouterr().err
  assert cli.main(['prepare', 'salient_imagenet', '--data-dir', str(tmp_path)]) == 2
  assert '--salient-dir' in capsys.readouterr().err
  assert cli.main(['prepare', 'imagenet2012', '--data-dir', str(tmp_path)]) == 2
  assert 'downloads/manual' in capsys.readouterr().err

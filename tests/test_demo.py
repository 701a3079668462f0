"""`qscore demo` and the encoder shipped for it."""

import json
import pathlib
import re

import numpy as np
import pytest

from qscore_jax import cli
from qscore_jax.models.weights import SHIPPED_MODELS, load_model, resolve_model_dir

DEMO = 'demo-simclr-r18w025'


def test_the_shipped_model_resolves_from_anywhere_and_was_trained_by_the_demo_config(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the repository root: found through the package
  directory = resolve_model_dir(DEMO)
  assert DEMO in SHIPPED_MODELS and directory.name == DEMO
  model, variables, metadata = load_model(directory)
  assert (metadata['arch'], metadata['method'], model.num_features) == ('resnet18', 'simclr', 128)
  # Its provenance is the shipped pre-training config, field for field: `qscore finetune
  # --config demo` reproduces it.
  provenance = metadata['provenance']
  recorded = provenance['config']
  expected = json.loads(cli.load_config('demo').to_json())
  # dtype came after the model was trained; its default, auto, is float32 on a CPU, where the
  # shipped model was trained (in float32: the only dtype then).
  assert expected.pop('dtype') == 'auto' and 'dtype' not in recorded
  assert recorded == expected
  assert provenance['init'] == 'random' and provenance['steps'] == expected['num_steps']
  size = sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())
  assert size < 8 * 2 ** 20, f'the shipped model takes {size / 2 ** 20:.1f} MiB'
  import jax  # pylint: disable=import-outside-toplevel
  from qscore_jax.models import embed  # pylint: disable=import-outside-toplevel
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  h = np.asarray(embed(model, variables, images))
  assert h.shape == (4, 128) and np.isfinite(h).all() and h.std() > 0


def test_demo_writes_a_report_whose_numbers_are_the_analysis(tmp_path, tiny_data_dir, capsys,
                                                             model_restores):
  out = tmp_path / 'demo'
  args = ['demo', '--out', str(out), '--dataset', 'synthetic_shapes/tiny', '--probe-epochs', '5',
          '--data-dir', tiny_data_dir, '--no-progress']
  assert cli.main(args) == 0
  # The model is resolved and restored once for the whole report (embedding both splits,
  # the analysis, the heatmaps).
  assert model_restores == [resolve_model_dir(DEMO)]
  printed = capsys.readouterr().out
  report = out / 'report.md'
  assert f'report       {report}' in printed
  text = report.read_text()
  for heading in ('## 1. Discriminative features', '## 2. Q-Score', '## 3. Compression',
                  '## 4. Where the discriminative features look'):
    assert heading in text
  links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)
  assert len(links) >= 7  # frequencies, histograms, PR, class accuracy, compression, 2 heatmaps
  for link in links:
    assert (out / link).is_file(), link
  analysis = json.loads((out / 'analysis' / 'report.json').read_text())
  assert f"top-1 **{100 * analysis['probe']['top1']:.1f}%**" in text
  # One convention everywhere: the table row, the console row and report.json give the same
  # AUPRC of each view (and AUROC) for the same score.
  q = analysis['misclassification']['qscore']
  cells = [f"{q[key]:.3f} [{q[key + '_interval'][0]:.3f}, {q[key + '_interval'][1]:.3f}]"
           for key in ('auprc_correct_positive', 'auprc_error_positive', 'auroc')]
  assert f"| qscore | {' | '.join(cells)} |" in text
  assert re.search(r'^  qscore +' + r' +'.join(map(re.escape, cells)) + '$', printed, re.M)
  assert (f"| *chance* | {q['chance_auprc_correct_positive']:.3f} | "
          f"{q['chance_auprc_error_positive']:.3f} | 0.500 |") in text
  # What this shows comes first, and says the same as report.json and the console.
  summary = json.loads((out / 'report.json').read_text())
  assert [f['key'] for f in summary['findings']] == ['misclassification', 'compression',
                                                     'localisation']
  assert summary['findings'][:2] == [{**f, 'figure': f"analysis/{f['figure']}"}
                                     for f in analysis['findings']]
  assert summary['findings'][2] == json.loads((out / 'interpret.json').read_text())['findings'][0]
  first = text.index('## What this shows')
  assert first < text.index('## 1. Discriminative features')
  for finding in summary['findings']:
    assert f"**{finding['claim']}: {finding['verdict']}**, {finding['reason']}." in text
    assert f"{finding['verdict'].upper():<14}{finding['claim']}: {finding['reason']}." in printed
    assert finding['verdict'] in ('supported', 'not supported', 'inconclusive')
    assert finding['interval'] is None or finding['interval'][0] <= finding['interval'][1]
  assert printed.index('What this shows') < printed.index('linear probe   top-1')
  assert analysis['evaluation']['split_size'] == 128 and analysis['compression']
  interpretation = json.loads((out / 'interpret.json').read_text())
  assert interpretation['summary']['all']['images'] == 128

  # Run again into the same folder: stores and analysis are read back (same encoder, same
  # settings), the report's numbers are the same, and it is still one restore.
  before = (out / 'analysis' / 'report.json').read_text()
  stamp = (out / 'analysis' / 'scores.npz').stat().st_mtime_ns
  assert cli.main(args) == 0
  assert len(model_restores) == 2
  assert (out / 'analysis' / 'report.json').read_text() == before
  assert (out / 'analysis' / 'scores.npz').stat().st_mtime_ns == stamp


def test_demo_rejects_a_dataset_without_masks(tmp_path, capsys):
  assert cli.main(['demo', '--out', str(tmp_path), '--dataset', 'sklearn_digits',
                   '--no-progress']) == 2
  assert 'has no core/spurious masks' in capsys.readouterr().err


def test_an_unknown_model_is_a_clear_error(tmp_path, capsys):
  assert cli.main(['demo', '--out', str(tmp_path), '--model', 'no-such-model']) == 2
  assert 'neither a saved model directory' in capsys.readouterr().err


@pytest.mark.parametrize('flags', [['--num-processes', '2'], ['--process-id', '0']])
def test_multihost_options_need_distributed(flags, capsys):
  assert cli.main([*flags, 'models']) == 2
  assert 'only apply with --distributed' in capsys.readouterr().err

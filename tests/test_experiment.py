"""The offline experiment (qscore experiment): aggregation, table, and the shipped run."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qscore_jax import experiment
from qscore_jax.configs import experiment as experiment_config


def _fake_runs(rng):
  runs = []
  for method in ('simclr', 'byol'):
    runs.append({'method': method, 'variant': 'pretrained', 'seed': None,
                 'metrics': {'top1': 0.5, 'auprc_q': 0.4, 'auprc_chance': 0.3, 'mean_q': 0.01,
                             'num_discriminative': 20, 'hoyer': 0.5, 'active_features': 3.0,
                             'zero_fraction': 0.2, 'top1_removed_0.5': 0.45}})
    for seed in (0, 1, 2):
      for variant in experiment.VARIANTS:
        metrics = {key: float(rng.uniform()) for key in runs[0]['metrics']}
        runs.append({'method': method, 'variant': variant, 'seed': seed, 'metrics': metrics})
  return runs


def test_summary_is_the_mean_and_sample_std_over_seeds():
  runs = _fake_runs(np.random.default_rng(0))
  summary = experiment.summarize(runs)
  values = [r['metrics']['top1'] for r in runs if r['method'] == 'byol' and r['variant'] == 'qscore']
  mean, std, n = summary['byol']['qscore']['top1']
  assert n == 3 and mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
  assert summary['simclr']['pretrained']['top1'] == [0.5, 0.0, 1]


def test_table_has_a_row_per_model_kind_with_spread():
  runs = _fake_runs(np.random.default_rng(1))
  results = {'config': {'compression_removed': [0.5]}, 'runs': runs,
             'summary': experiment.summarize(runs)}
  lines = experiment.table_lines(results)
  rows = [line for line in lines if line.startswith('| simclr') or line.startswith('| byol')]
  assert len(rows) == 6 and all(' ± ' in row for row in rows if 'pretrained' not in row)
  assert 'top-1 % with 50% removed' in lines[0] and 'chance' in lines[-1]


def test_readme_shows_the_expected_table():
  """The README's table is the one EXPECTED (the shipped run's results.json) produces."""
  expected = experiment_config.EXPECTED
  summary = {m: {v: {k: [mean, std, 3 if v in experiment.VARIANTS else 1]
                     for k, (mean, std) in metrics.items()} for v, metrics in variants.items()}
             for m, variants in expected.items()}
  runs = [{'metrics': {'auprc_chance': metrics['auprc_chance'][0]}}
          for variants in expected.values() for metrics in variants.values()]
  config = experiment_config.get_config()
  lines = experiment.table_lines({'config': {'compression_removed': list(
      config.compression_removed)}, 'summary': summary, 'runs': runs})
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  for line in lines[:-1]:
    assert line in readme, line


def test_config_overrides_take_tuples_of_words():
  config = experiment_config.get_config('methods=byol:simsiam,seeds=3:4')
  assert config.methods == ('byol', 'simsiam') and config.seeds == (3, 4)
  with pytest.raises(ValueError, match='unknown config field'):
    experiment_config.get_config('seed=1')


@pytest.mark.slow
def test_shipped_experiment_runs_in_30_minutes_and_matches_the_readme(tmp_path):
  """The README's command, from scratch: under 30 minutes here, and every mean within the
  spread the README reports (means of seeds; the spread is their sample std)."""
  out = subprocess.run([sys.executable, '-m', 'qscore_jax.cli', 'experiment', '--workdir',
                        str(tmp_path)], capture_output=True, text=True, check=True, timeout=3600)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['seconds'] < 1800, out.stdout[-2000:]
  expected = experiment_config.EXPECTED
  for method, variants in expected.items():
    for variant, metrics in variants.items():
      for key, (mean, std) in metrics.items():
        got, got_std, _ = results['summary'][method][variant][key]
        # The pre-trained row has one model and no spread of its own: use the method's.
        spread = max(std, got_std, *(m[key][1] for m in variants.values()))
        assert abs(got - mean) <= max(spread, 1e-3), (method, variant, key, got, mean, spread)

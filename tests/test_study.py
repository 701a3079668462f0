"""qscore study (scores against errors of known source) and qscore track (label-free scores
along a run's checkpoints), end to end on tiny settings, checked against sklearn / scipy."""

import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as sk_metrics

from qscore_jax import cli, metrics, outputs, study, track
from qscore_jax.configs import study as study_config
from qscore_jax.data import split_attributes
from qscore_jax.finetune import loop

TINY = ('datasets=synthetic_shapes/tiny,pretrain_steps=4,supervised_steps=4,batch_size=32,'
        'checkpoints=2,bootstrap_resamples=50,consistency_k=5')
METHODS = ('simclr', 'byol', 'supervised')
TRACK = track.TrackConfig(lidar_examples=48, lidar_views=3, batch_size=64, probe_epochs=20)


@pytest.fixture(scope='module')
def data_env(tiny_data_dir):
  patch = pytest.MonkeyPatch()
  patch.setenv('QSCORE_JAX_DATA_DIR', tiny_data_dir)
  yield tiny_data_dir
  patch.undo()


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory, data_env):  # pylint: disable=unused-argument,redefined-outer-name
  root = tmp_path_factory.mktemp('study')
  config = study_config.get_config(TINY)
  lines = []
  results = study.run_study(config, root, log=lines.append)
  return config, root, results, lines


@pytest.fixture(scope='module')
def tracked(tiny_study):  # pylint: disable=redefined-outer-name
  _, root, _, _ = tiny_study
  lines = []
  return track.track(root / 'tiny-simclr', config=TRACK, log=lines.append), lines


def test_spearman_equals_scipy_with_ties_and_its_interval_holds_it():
  rng = np.random.default_rng(0)
  x = rng.normal(size=300)
  y = np.round(x + rng.normal(size=300), 1)  # ties
  result = metrics.spearman(x, y, resamples=200)
  assert result['rho'] == pytest.approx(scipy_stats.spearmanr(x, y).statistic, rel=1e-10)
  lo, hi = result['interval']
  assert lo < result['rho'] < hi and hi - lo < 0.3
  assert np.isnan(metrics.spearman(x, np.ones(300))['rho'])
  with pytest.raises(ValueError, match='NaN or inf'):
    metrics.spearman(x, np.full(300, np.nan))


def test_error_sources_split_the_errors_and_keep_every_correct_sample():
  correct = np.array([1, 1, 0, 0, 0, 1], bool)
  misleading = np.array([0, 1, 1, 0, 1, 0], bool)
  sources = study.error_sources(correct, misleading, cue_predictive=True)
  assert sources['cue conflict'].tolist() == [1, 1, 1, 0, 1, 1]
  assert sources['weak evidence'].tolist() == [1, 1, 0, 1, 0, 1]
  unrelated = study.error_sources(correct, misleading, cue_predictive=False)
  assert unrelated['weak evidence'].all() and (unrelated['cue conflict'] == correct).all()


def test_difficulty_is_the_visible_area_times_contrast():
  factors = study.difficulty({'object_area': np.array([0.2, 0.1]),
                              'occlusion': np.array([0.5, 0.0]), 'contrast': np.array([0.5, 1.0])})
  assert factors['evidence'] == pytest.approx([0.05, 0.1])


def test_study_measures_every_score_by_source_as_sklearn_and_scipy_do(tiny_study):  # pylint: disable=redefined-outer-name
  _, root, results, _ = tiny_study
  (entry,) = results['datasets']
  assert entry['cue_predictive'] and 0.7 < entry['cue_agreement'] < 0.9  # spurious rate 0.8
  attributes = split_attributes('synthetic_shapes/tiny', 'test')
  evidence = study.difficulty(attributes)['evidence']
  assert tuple(entry['encoders']) == METHODS
  for method in METHODS:
    encoder = entry['encoders'][method]
    assert set(encoder['scores']) == {key for key, _ in study.SCORES}
    saved = np.load(root / f'tiny-{method}' / 'eval' / 'scores.npz')
    order = np.argsort(saved['ids'])
    correct = saved['correct'][order].astype(bool)
    misleading = attributes['misleading'].astype(bool)
    assert encoder['top1'] == pytest.approx(correct.mean())
    conflict = ~correct & misleading
    assert encoder['errors'] == {'all': int((~correct).sum()), 'cue conflict': int(conflict.sum()),
                                 'weak evidence': int((~correct & ~misleading).sum())}
    q = saved['score_qscore_v1'][order].astype(np.float64)
    rows = correct | conflict
    cell = encoder['scores']['qscore_v1']['by_source']['cue conflict']
    assert cell['auprc_error_positive'] == pytest.approx(
        sk_metrics.average_precision_score(conflict[rows], -q[rows]))
    assert cell['chance_auprc_error_positive'] == pytest.approx(conflict.sum() / rows.sum())
    lo, hi = cell['auprc_error_positive_interval']
    assert lo <= cell['auprc_error_positive'] <= hi
    knn = saved['score_knn_agreement'][order].astype(np.float64)
    assert encoder['scores']['knn_agreement']['spearman']['evidence']['rho'] == pytest.approx(
        scipy_stats.spearmanr(knn, evidence).statistic)
  consistency = [entry['encoders'][m]['scores']['neighbourhood_consistency'] for m in METHODS]
  # One score for all encoders (occlusion is constant here: its rho is NaN).
  assert json.dumps(consistency[0]['spearman']) == json.dumps(consistency[2]['spearman'])
  table = (root / 'table.md').read_text()
  assert all(table.count(f'| {m} |') == len(study.SCORES) for m in METHODS)
  assert 'weak evidence' in table and (root / 'study.png').stat().st_size > 10_000
  assert outputs.read_marker(root)['kind'] == 'study'


def test_study_rerun_reuses_every_run_and_gives_the_same_results(tiny_study):  # pylint: disable=redefined-outer-name
  config, root, results, _ = tiny_study
  lines = []
  again = study.run_study(config, root, log=lines.append)
  assert sum('done earlier, reused' in line for line in lines) == len(METHODS)
  assert json.dumps(again['datasets'], sort_keys=True) == json.dumps(results['datasets'],
                                                                     sort_keys=True)


def test_study_keeps_the_checkpoints_track_reads(tiny_study):  # pylint: disable=redefined-outer-name
  config, root, _, _ = tiny_study
  recorded, provenance = loop.run_config_of(root / 'tiny-simclr')
  wanted = study.pretrain_config(config, 'synthetic_shapes/tiny', 'simclr')
  assert provenance['init'] == 'random'
  for key, value in json.loads(wanted.to_json()).items():
    if key not in loop.RESUMABLE_FIELDS + ('dtype',):
      assert json.loads(recorded.to_json())[key] == value, key
  assert sorted(int(p.name) for p in (root / 'tiny-simclr' / 'checkpoints').iterdir()) == [2, 4]


def test_study_refuses_a_supervised_control_of_another_config(tiny_study):  # pylint: disable=redefined-outer-name
  config, root, _, _ = tiny_study
  other = study_config.get_config(TINY.replace('supervised_steps=4', 'supervised_steps=5'))
  with pytest.raises(ValueError, match='supervised model of another config'):
    study.run_study(other, root, log=lambda _: None)
  assert study.run_study(config, root, log=lambda _: None)['datasets']  # still reusable


def test_study_refuses_a_folder_it_did_not_write(tmp_path, data_env):  # pylint: disable=unused-argument,redefined-outer-name
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(outputs.OutputError):
    study.run_study(study_config.get_config(TINY), tmp_path, log=lambda _: None)
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_track_scores_step_0_and_every_checkpoint(tiny_study, tracked):  # pylint: disable=redefined-outer-name
  _, root, results, _ = tiny_study
  result, _ = tracked
  rows = result['rows']
  assert [r['step'] for r in rows] == [0, 2, 4]
  # The last checkpoint is the exported model the study analysed: same weights, same accuracy
  # up to the probe's epochs (here fewer), same spectrum of the same test representations.
  final = results['datasets'][0]['encoders']['simclr']
  assert rows[-1]['model_fingerprint'] == final['model_fingerprint']
  assert rows[0]['model_fingerprint'] != rows[1]['model_fingerprint']
  reps = np.load(next((root / 'tiny-simclr' / 'eval' / 'store_test').rglob(
      'representations.npy')))
  assert rows[-1]['rankme'] == pytest.approx(metrics.rankme(reps), rel=1e-6)
  for key, _, _ in track.SCORES:
    values = [r[key] for r in rows]
    tau = result['kendall'][key]['tau']
    if tau is not None:
      assert tau == pytest.approx(scipy_stats.kendalltau(values, [r['top1'] for r in rows])
                                  .statistic)
  out = root / 'tiny-simclr' / 'track'
  assert (out / 'track.png').stat().st_size > 10_000
  assert (out / 'track.md').read_text().count('\n| ') == len(rows) + 1
  assert not list(out.rglob('representations.npy'))  # the stores were deleted


def test_track_reads_back_finished_steps_and_redoes_changed_settings(tiny_study, tracked):  # pylint: disable=redefined-outer-name
  _, root, _, _ = tiny_study
  first, _ = tracked
  lines = []
  again = track.track(root / 'tiny-simclr', config=TRACK, log=lines.append)
  assert sum('read back' in line for line in lines) == 3 and again['rows'] == first['rows']
  lines = []
  other = track.track(root / 'tiny-simclr', root / 'track-more-views',
                      config=dataclasses.replace(TRACK, lidar_views=4), log=lines.append)
  assert not any('read back' in line for line in lines)
  assert [r['top1'] for r in other['rows']] == [r['top1'] for r in first['rows']]
  assert other['settings']['lidar_views'] == 4


def test_track_skips_a_damaged_checkpoint_and_moves_nothing(tiny_study, tmp_path):  # pylint: disable=redefined-outer-name
  _, root, _, _ = tiny_study
  run = tmp_path / 'run'
  shutil.copytree(root / 'tiny-simclr', run, ignore=shutil.ignore_patterns('eval', 'track*'))
  damaged = [run / 'checkpoints' / '2'] + ([run / 'best' / '2'] if (run / 'best' / '2').is_dir()
                                            else [])
  for copy in damaged:  # every copy of step 2
    for path in (copy / 'state').rglob('*'):
      if path.is_file() and path.stat().st_size > 1000:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
  before = sorted(str(p.relative_to(run)) for p in run.rglob('*'))
  result = track.track(run, tmp_path / 'out', config=TRACK, log=lambda _: None)
  assert [r['step'] for r in result['rows']] == [0, 4]
  assert [s['step'] for s in result['skipped']] == [2]
  assert sorted(str(p.relative_to(run)) for p in run.rglob('*')) == before


def test_track_command_prints_the_table_and_refuses_what_it_cannot_track(tiny_study, tmp_path,
                                                                         capsys):  # pylint: disable=redefined-outer-name
  _, root, _, _ = tiny_study
  code = cli.main(['track', str(root / 'tiny-byol'), '--out', str(tmp_path / 'byol'),
                   '--lidar-examples', '32', '--lidar-views', '2', '--probe-epochs', '10'])
  printed = capsys.readouterr().out
  assert code == 0 and 'Kendall tau with top-1' in printed and '| 4 |' in printed
  assert json.loads((tmp_path / 'byol' / 'track.json').read_text())['method'] == 'byol'
  assert cli.main(['track', str(tmp_path / 'byol')]) == 1  # not a workdir
  assert 'not a readable qscore finetune workdir' in capsys.readouterr().err
  assert cli.main(['track', str(root / 'tiny-byol'), '--lidar-views', '1']) == 2
  assert 'at least 2 examples and 2 views' in capsys.readouterr().err
  assert cli.main(['track', 'gs://bucket/run']) == 2
  assert 'local workdir' in capsys.readouterr().err
  code = cli.main(['track', str(root / 'tiny-simclr'), '--out', str(tmp_path / 'byol')])
  assert code == 2 and 'holds the tracking of another run' in capsys.readouterr().err


def test_track_refuses_a_workdir_without_checkpoints(tiny_study, tmp_path):  # pylint: disable=redefined-outer-name
  _, root, _, _ = tiny_study
  run = tmp_path / 'run'  # a run that has not reached its first checkpoint yet
  shutil.copytree(root / 'tiny-simclr', run,
                  ignore=shutil.ignore_patterns('eval', 'track*', 'checkpoints', 'best', 'model'))
  with pytest.raises(loop.TrainingError, match='no checkpoint yet'):
    track.track(run, config=TRACK, log=lambda _: None)


RESULTS = pathlib.Path(__file__).parents[1] / 'benchmarks' / 'results' / 'study' / \
    '2026-12-03-Intel-R-Xeon-R-Processor'


@pytest.mark.parametrize('name', ['results.json', 'results_eps2.json'])
def test_readme_shows_the_committed_study_tables(name):
  """The README's condensed tables are summary_lines of the committed full-size run."""
  results = json.loads((RESULTS / name).read_text())
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  for line in study.summary_lines(results):
    assert line in readme, line
  assert results['config']['eps'] == (4.0 if name == 'results.json' else 2.0)


@pytest.mark.slow
def test_shipped_study_runs_in_45_minutes_and_supports_the_readme(tmp_path):
  """The README's command from scratch, then eps = 2 on the same encoders: the time, and the
  claims its reading makes (on another CPU the encoders differ; a failure here says which
  claim does not carry over)."""
  start = time.perf_counter()
  assert cli.main(['study', '--workdir', str(tmp_path)]) == 0
  assert time.perf_counter() - start < 45 * 60
  at4 = json.loads((tmp_path / 'results.json').read_text())
  assert cli.main(['study', '--workdir', str(tmp_path), '--set', 'eps=2']) == 0
  at2 = json.loads((tmp_path / 'results.json').read_text())
  for results in (at4, at2):
    for entry in results['datasets']:
      for method, encoder in entry['encoders'].items():
        q = encoder['scores']['qscore']['by_source']['all']
        soft = encoder['scores']['max_softmax']['by_source']['all']
        if method != 'supervised' and results is at4:
          lo, hi = q['auroc_interval']
          assert lo <= 0.55 and hi >= 0.45, (entry['dataset'], method, q['auroc'])
          assert encoder['qscore_zero_fraction'] > 0.5, (entry['dataset'], method)
        assert soft['auroc'] >= q['auroc'] - 0.02, (entry['dataset'], method)
  weak = {e['dataset']: e for e in at2['datasets']}['synthetic_shapes/weak_evidence']
  control = weak['encoders']['supervised']
  assert control['top1'] > 0.6 and all(weak['encoders'][m]['top1'] < 0.35
                                        for m in ('simclr', 'byol'))
  q = control['scores']['qscore']
  assert q['by_source']['all']['auroc_interval'][0] > 0.6
  assert q['spearman']['evidence']['rho'] > 0.3

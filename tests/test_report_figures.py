"""What the figures say: legends, titles and tiles read from the drawn matplotlib figures."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats as sp_stats

from qscore_jax import analysis, compression, interpret, metrics, report, saliency
from qscore_jax.probe import ProbeConfig


@pytest.fixture
def drawn(monkeypatch):
  """The figures the report functions draw, kept before they are written."""
  figures = []
  save = report._save  # pylint: disable=protected-access

  def keep(fig, path):
    figures.append(fig)
    return save(fig, path)
  monkeypatch.setattr(report, '_save', keep)
  return figures


def _legend(ax):
  return [t.get_text() for t in ax.get_legend().get_texts()]


def test_precision_recall_has_both_views_with_the_tables_auprc(tmp_path, drawn):
  rng = np.random.default_rng(0)
  correct = rng.random(300) < 0.7
  scores = {'qscore': rng.standard_normal(300) + correct, 'l2_norm': rng.standard_normal(300)}
  table = metrics.score_table(scores, correct, resamples=0)
  report.plot_precision_recall(scores, correct, table, tmp_path / 'pr.png')
  left, right = drawn[0].axes
  assert 'correct = positive' in left.get_title() and 'error = positive' in right.get_title()
  for ax, view in ((left, 'correct_positive'), (right, 'error_positive')):
    assert _legend(ax) == [f"{name} (AUPRC {table[name][f'auprc_{view}']:.3f})"
                           for name in scores] + [
        f"chance (AUPRC {table['qscore'][f'chance_auprc_{view}']:.3f})"]


def test_compression_band_has_the_colour_of_its_line(tmp_path, drawn):
  curve = {'fractions_removed': [0.0, 0.5], 'kept': [10, 5], 'ranked': [0.8, 0.7],
           'random_mean': [0.8, 0.6], 'random_std': [0.0, 0.05], 'random': [[0.8], [0.6]],
           'discriminative_only': {'kept': 3, 'accuracy': 0.5}}
  report.plot_compression(curve, tmp_path / 'c.png')
  ax = drawn[0].axes[0]
  random_line = next(line for line in ax.get_lines() if line.get_label().startswith('random'))
  band = ax.collections[0]
  assert np.allclose(band.get_facecolor()[0][:3],
                     np.asarray(__import__('matplotlib').colors.to_rgb(random_line.get_color())))
  ranked_line = ax.get_lines()[0]
  assert ranked_line.get_color() != random_line.get_color()


def test_class_scatter_states_r_with_its_interval_and_keeps_labels_in_the_frame(tmp_path, drawn):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 30)
  q = rng.random(300) + labels * 0.05
  correct = rng.random(300) < 0.5 + labels * 0.04
  names = [f'class-with-a-long-name-{c}' for c in range(10)]
  report.plot_class_accuracy(q, labels, correct, names, tmp_path / 's.png')
  fig = drawn[0]
  ax = fig.axes[0]
  mean_q = np.array([q[labels == c].mean() for c in range(10)])
  accuracy = np.array([correct[labels == c].mean() for c in range(10)])
  ci = sp_stats.pearsonr(mean_q, accuracy).confidence_interval(0.95)
  r = np.corrcoef(mean_q, accuracy)[0, 1]
  assert ax.get_title() == (f'per-class accuracy vs mean Q: Pearson r = {r:.2f} '
                            f'[{ci.low:.2f}, {ci.high:.2f}] over 10 classes')
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  renderer = FigureCanvasAgg(fig).get_renderer()
  frame = fig.bbox
  for text in ax.texts:
    box = text.get_window_extent(renderer)
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()


def test_figure_samples_show_each_image_once():
  q = np.array([5.0, 4.0, 0.1, 0.2, 0.3, 3.0])
  correct = np.array([True, True, False, False, True, False])
  ids = np.arange(6) + 100
  groups = interpret.figure_samples(q, correct, ids, np.ones(6, bool), per_group=2)
  shown = np.concatenate(list(groups.values()))
  assert len(shown) == len(set(shown.tolist()))
  assert groups['highest Q'].tolist() == [100, 101]
  assert groups['lowest Q'].tolist() == [102, 103]
  assert groups['misclassified'].tolist() == [105]  # 102 and 103 are already shown


def test_an_empty_heatmap_is_not_counted_as_no_discriminative_feature():
  per_image = {'core_iou': np.array([0.5, 0.0, 0.0]), 'spurious_iou': np.array([0.1, 0.0, 0.0]),
               'core_defined': np.array([True, False, False]),
               'spurious_defined': np.array([True, False, False]),
               'has_target': np.array([True, False, False]),
               'num_targets': np.array([2, 0, 3]), 'correct': np.array([True, True, False])}
  row = saliency.summarize_ious(per_image)['all']
  assert row['no_discriminative_feature'] == 1 and row['empty_heatmap'] == 1
  json.dumps(row, allow_nan=False)


def test_heatmap_rows_have_a_colour_bar_caption_and_the_row_titles(tmp_path):
  rows = [{'title': 'lowest Q, #7\nQ=0.123\ntrue ring\npred. star', 'image': np.zeros((8, 8, 3)),
           'heatmap': np.linspace(0, 1, 64).reshape(8, 8), 'core_mask': np.zeros((8, 8)),
           'spurious_mask': np.ones((8, 8))}]
  kept = []
  original = report.Figure.savefig

  def grab(fig, *args, **kwargs):
    kept.append(fig)
    return original(fig, *args, **kwargs)
  report.Figure.savefig = grab
  try:
    config = dataclasses.asdict(interpret.InterpretConfig(stage='layer2'))
    report.plot_heatmap_rows(rows, tmp_path / 'h.png', caption=interpret.heatmap_caption(config))
  finally:
    report.Figure.savefig = original
  fig = kept[0]
  assert fig.axes[0].get_ylabel() == rows[0]['title']
  colour_bar = fig.axes[-1]
  assert colour_bar.get_ylabel() == 'heatmap / its maximum'
  caption = ' '.join(t.get_text() for t in fig.texts).replace('\n', ' ')
  assert 'white contour outlines the binarised region (heatmap >= 0.6 of its maximum)' in caption


def test_report_records_the_probe_milestones_it_ran(tmp_path):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 300)
  h = rng.random((300, 16)).astype(np.float32)
  h[np.arange(300), y] += 0.4  # separable enough to learn, not to be always right
  config = analysis.AnalysisConfig(
      eps=1.0, probe=ProbeConfig(epochs=30, batch_size=64), bootstrap_resamples=50,
      compression=compression.CompressionConfig(fractions_removed=(0.0, 0.4), random_seeds=(0,),
                                                probe=ProbeConfig(epochs=10, batch_size=64)))
  result = analysis.analyze(analysis.Split.from_arrays(h[:200], y[:200], 'train'),
                            analysis.Split.from_arrays(h[200:], y[200:], 'test'), tmp_path,
                            config=config, plots=False)
  assert result['options']['probe']['milestones'] == [18, 24]
  assert result['options']['probe']['milestones_for_100_epochs'] == [60, 80]
  assert result['options']['compression']['probe']['milestones'] == [6, 8]
  assert result['report_version'] == analysis.REPORT_VERSION
  # The console summary begins with the verdicts and shows the same numbers as report.json.
  lines = analysis.summary_lines(result)
  assert lines[0].startswith('What this shows')
  q = result['misclassification']['qscore']
  row = next(line for line in lines if line.startswith('  qscore '))
  assert f"{q['auprc_correct_positive']:.3f} [" in row and f"{q['auprc_error_positive']:.3f} [" in row

"""Figures of an analysis (matplotlib, headless) and the report file.

Each function draws one figure from arrays and returns the written path:
sorted activation frequencies with the D band, Q-Score histograms for correct
vs misclassified samples, precision-recall curves of Q and the baselines, the
compression curve, per-class accuracy against mean Q, and the interpretability
figures (heatmap overlays beside the core and spurious masks; a feature's top images).
"""

from __future__ import annotations

import json
import math
import pathlib
import textwrap
from typing import Any, Mapping

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import precision_recall_curve


def _subplots(*args, **kwargs):
  """A new figure and its axes, outside pyplot: no backend is chosen or changed, so the
  figures are written headless and a notebook's inline plotting is left alone."""
  fig = Figure(figsize=kwargs.pop('figsize', None))
  return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def plot_activation_frequencies(frequencies: np.ndarray, discriminative: np.ndarray,
                                band: tuple[float, float], path: pathlib.Path) -> pathlib.Path:
  """Sorted activation frequencies A_j, members of D highlighted, the band shaded.

  Args:
    frequencies: (d,) float A_j.
    discriminative: (d,) bool membership of D.
    band: ``(lo, hi)`` activation frequencies delimiting D (not drawn when NaN).
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  order = np.argsort(frequencies)
  fig, ax = _subplots(figsize=(7, 4))
  ranks = np.arange(len(order))
  ax.plot(ranks, frequencies[order], color='0.3', lw=1, label='A_j, sorted')
  members = discriminative[order]
  ax.scatter(ranks[members], frequencies[order][members], s=4, color='tab:red',
             label=f'D ({int(members.sum())} features)')
  if all(math.isfinite(b) for b in band):
    ax.axhspan(band[0], band[1], color='tab:red', alpha=0.12, label='band of D')
  ax.set_xlabel('feature (sorted by activation frequency)')
  ax.set_ylabel('A_j: fraction of samples where highly active')
  ax.legend(loc='upper left')
  return _save(fig, path)


def plot_qscore_histograms(q: np.ndarray, correct: np.ndarray, path: pathlib.Path) -> pathlib.Path:
  """Density histograms of Q-Score for correctly classified vs misclassified samples.

  Args:
    q: (N,) Q-Scores.
    correct: (N,) bool, whether each sample is correctly classified.
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  fig, ax = _subplots(figsize=(7, 4))
  bins = np.histogram_bin_edges(q, bins=40)
  for group, name in ((correct, 'correct'), (~correct, 'misclassified')):
    if group.any():
      ax.hist(q[group], bins=bins, alpha=0.6, density=True, label=f'{name} ({int(group.sum())})')
  ax.set_xlabel('Q-Score')
  ax.set_ylabel('density')
  ax.legend()
  return _save(fig, path)


# The two views of one ranking, named the same way in the tables, figures, report.json
# and the console (qscore_jax.metrics).
VIEWS = {'correct_positive': 'correct = positive (the paper\'s view), ranked by the score',
         'error_positive': 'error = positive (finding mistakes), ranked by minus the score'}


def plot_precision_recall(scores: Mapping[str, np.ndarray], correct: np.ndarray,
                          table: Mapping[str, Mapping[str, float]], path: pathlib.Path) -> pathlib.Path:
  """Precision-recall curves of every score in both views, one panel each, chance dashed.

  Left: correct = positive, ranked by the score (legend: ``auprc_correct_positive``);
  right: error = positive, ranked by minus the score (``auprc_error_positive``).

  Args:
    scores: ``{name: (N,) scores}`` (higher = predicted correct).
    correct: (N,) bool, whether each sample is correctly classified.
    table: :func:`qscore_jax.metrics.score_table` of ``scores`` (AUPRC in the legends).
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  fig, axes = _subplots(1, 2, figsize=(11, 5))
  both = 0 < correct.sum() < len(correct)
  for ax, (view, title) in zip(axes, VIEWS.items()):
    positive = correct if view == 'correct_positive' else ~correct
    sign = 1 if view == 'correct_positive' else -1
    if both:
      for name, values in scores.items():
        precision, recall, _ = precision_recall_curve(positive, sign * np.asarray(values))
        ax.plot(recall, precision, lw=1.8 if name == 'qscore' else 1,
                label=f'{name} (AUPRC {table[name][f"auprc_{view}"]:.3f})')
    chance = float(positive.mean())
    ax.axhline(chance, color='0.5', ls='--', lw=1, label=f'chance (AUPRC {chance:.3f})')
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('recall (' + ('correctly classified' if sign > 0 else 'misclassified') + ')')
    ax.set_ylabel('precision')
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
  return _save(fig, path)


def plot_tracking(rows, scores, taus: Mapping[str, Mapping[str, Any]], path: pathlib.Path, *,
                  title: str = '') -> pathlib.Path:
  """Each dataset-level score (one panel each) against the step, with the linear accuracy.

  Args:
    rows: ``[{'step', 'top1', <score>: value}]`` per checkpoint (:func:`qscore_jax.track.track`).
    scores: ``[(key, title)]`` of the panels.
    taus: ``{key: {'tau': ...}}``, Kendall's tau of each score with the accuracy (in the titles).
    path: the PNG file to write.
    title: the figure's title.
  Returns:
    ``path``.
  """
  columns = min(3, len(scores))
  lines = math.ceil(len(scores) / columns)
  fig, axes = _subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
  steps = [r['step'] for r in rows]
  accuracy = [100 * r['top1'] for r in rows]
  for ax, (key, name) in zip(axes.flat, scores):
    ax.plot(steps, [r[key] for r in rows], 'o-', color='C0', lw=1.5)
    ax.set_ylabel(name, color='C0')
    ax.set_xlabel('step')
    other = ax.twinx()
    other.plot(steps, accuracy, 's--', color='C3', lw=1)
    other.set_ylabel('linear top-1 %', color='C3')
    tau = taus[key]['tau']
    ax.set_title(f"{name}: Kendall tau {'–' if tau is None else f'{tau:+.2f}'}", fontsize=9)
  for ax in list(axes.flat)[len(scores):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def plot_study(rows, path: pathlib.Path, *, title: str = '') -> pathlib.Path:
  """AUROC of every score for telling the probe's errors from its correct samples, by source.

  Args:
    rows: ``[{'label', 'score', 'source', 'auroc', 'interval'}]``; one panel per ``label``
      (a dataset and encoder), bars grouped by score and coloured by source (the same
      colour for a source in every panel), chance (0.5) dashed.
    path: the PNG file to write.
    title: the figure's title.
  Returns:
    ``path``.
  """
  labels = list(dict.fromkeys(r['label'] for r in rows))
  names = list(dict.fromkeys(r['score'] for r in rows))
  sources = list(dict.fromkeys(r['source'] for r in rows))
  columns = min(3, len(labels))  # the study's three encoders of a dataset side by side
  lines = math.ceil(len(labels) / columns)
  fig, axes = _subplots(lines, columns, figsize=(5.6 * columns, 3.4 * lines), squeeze=False)
  width = 0.8 / max(len(sources), 1)
  for ax, label in zip(axes.flat, labels):
    for k, source in enumerate(sources):
      cells = {r['score']: r for r in rows if r['label'] == label and r['source'] == source}
      if not cells:  # no error of this source here
        continue
      shown = [n for n in names if n in cells]
      x = [names.index(n) + (k - (len(sources) - 1) / 2) * width for n in shown]
      values = [cells[n]['auroc'] for n in shown]
      bounds = [cells[n]['interval'] or [cells[n]['auroc']] * 2 for n in shown]
      err = [[v - b[0] for v, b in zip(values, bounds)], [b[1] - v for v, b in zip(values, bounds)]]
      ax.bar(x, values, width, yerr=err, capsize=2, color=f'C{k}', label=source)
    ax.axhline(0.5, color='0.4', ls='--', lw=1)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha='right', fontsize=7)
    ax.set_ylabel('AUROC, errors vs correct')
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=7, loc='lower right')
  for ax in list(axes.flat)[len(labels):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def plot_compression(curve: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Linear accuracy vs fraction removed: ranked, random (mean ± std), and only D.

  Args:
    curve: the dict of :func:`qscore_jax.compression.compression_curve`.
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  fig, ax = _subplots(figsize=(7, 4))
  removed = np.asarray(curve['fractions_removed'])
  ax.plot(removed, curve['ranked'], 'o-', color='tab:blue',
          label='kept by discriminativeness (Q\'s order)')
  mean, std = np.asarray(curve['random_mean']), np.asarray(curve['random_std'])
  ax.plot(removed, mean, 's--', color='tab:orange',
          label=f'random subsets (mean ± std, {len(curve["random"][0])} seeds)')
  ax.fill_between(removed, mean - std, mean + std, color='tab:orange', alpha=0.2)
  only = curve['discriminative_only']
  if only['kept'] and math.isfinite(only['accuracy']):
    d = curve['kept'][0]
    ax.plot([1 - only['kept'] / d], [only['accuracy']], 'r*', ms=12,
            label=f'only D ({only["kept"]} features)')
  ax.set_xlabel('fraction of dimensions removed')
  ax.set_ylabel('linear accuracy')
  ax.legend()
  return _save(fig, path)


def class_correlation(mean_q: np.ndarray, accuracy: np.ndarray) -> dict[str, Any] | None:
  """Pearson r between the classes' mean Q and accuracy, with its 95% interval (Fisher z).

  Args:
    mean_q: (C,) mean Q-Score per class.
    accuracy: (C,) linear accuracy per class.
  Returns:
    ``{'r', 'interval', 'classes'}`` (interval None below 4 classes), or None when
    fewer than 3 classes or either quantity is constant.
  """
  if len(mean_q) < 3 or np.std(mean_q) == 0 or np.std(accuracy) == 0:
    return None
  result = stats.pearsonr(mean_q, accuracy)
  interval = None
  if len(mean_q) > 3:
    ci = result.confidence_interval(0.95)
    interval = [float(ci.low), float(ci.high)]
  return {'r': float(result.statistic), 'interval': interval, 'classes': int(len(mean_q))}


def plot_class_accuracy(q: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                        class_names, path: pathlib.Path) -> pathlib.Path:
  """Per-class linear accuracy against the class's mean Q-Score (Pearson r, 95% interval).

  Args:
    q: (N,) Q-Scores.
    labels: (N,) integer labels.
    correct: (N,) bool, whether each sample is correctly classified.
    class_names: names indexed by label, annotated when there are at most 30
      classes; None for none.
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  classes = np.unique(labels)
  mean_q = np.array([q[labels == c].mean() for c in classes])
  accuracy = np.array([correct[labels == c].mean() for c in classes])
  fig, ax = _subplots(figsize=(6, 5))
  ax.scatter(mean_q, accuracy, s=18)
  if len(classes) <= 30 and class_names:
    for c, x, y in zip(classes, mean_q, accuracy):
      # Labels right of the points, or left of those in the right quarter: inside the frame.
      right = x <= mean_q.min() + 0.75 * np.ptp(mean_q)
      ax.annotate(str(class_names[c]), (x, y), fontsize=7, xytext=(3 if right else -3, 2),
                  textcoords='offset points', ha='left' if right else 'right')
  ax.margins(0.08)
  correlation = class_correlation(mean_q, accuracy)
  if correlation:
    interval = correlation['interval']
    ax.set_title(f"per-class accuracy vs mean Q: Pearson r = {correlation['r']:.2f}"
                 + (f' [{interval[0]:.2f}, {interval[1]:.2f}]' if interval else '')
                 + f" over {correlation['classes']} classes", fontsize=9)
  ax.set_xlabel('mean Q-Score of the class')
  ax.set_ylabel('linear accuracy of the class')
  return _save(fig, path)


def _layout_with_colorbar(fig, image, label: str, caption: str | None,
                          caption_inches: float) -> None:
  """Lays the panels out left of a colour bar (of ``image``), ``caption`` under them."""
  bottom = caption_inches / fig.get_figheight() if caption else 0.0
  if caption:
    fig.text(0.01, 0.005, textwrap.fill(caption, width=int(fig.get_figwidth() * 15)),
             fontsize=7, va='bottom', ha='left')
  fig.tight_layout(rect=(0, bottom, 0.9, 1))
  if image is not None:  # the colours at full strength, not at the overlay's transparency
    span = min(0.5, 3.0 / fig.get_figheight())
    centre = bottom + (1 - bottom) / 2
    scale = ScalarMappable(norm=image.norm, cmap=image.get_cmap())
    fig.colorbar(scale, cax=fig.add_axes((0.92, centre - span / 2, 0.018, span)), label=label)


def plot_heatmap_rows(rows, path: pathlib.Path, threshold: float | None = 0.6,
                      caption: str | None = None) -> pathlib.Path:
  """One row per sample: image | heatmap overlay | core mask | spurious mask.

  Each row is a dict with ``title`` (the row's label: the sample, its Q and
  classes), ``image`` (H, W, 3) in [0, 1], ``heatmap`` (H, W) in [0, 1] and
  ``core_mask``/``spurious_mask`` (H, W) in [0, 1]; the heatmap's binarised
  region (>= ``threshold``) is outlined in white on the overlay. A colour bar
  gives the heatmap's scale, ``caption`` is written under the panels.

  Args:
    rows: the rows (a sequence of such dicts).
    path: the PNG file to write.
    threshold: heatmap level outlined on the overlay (default 0.6; None: no
      outline).
    caption: what the panels show, under them (None: no caption).
  Returns:
    ``path``.
  """
  columns = ('image', 'heatmap (white: binarised region)', 'core mask (object)',
             'spurious mask (background)')
  height = 2.1 * max(1, len(rows)) + (0.9 if caption else 0)
  fig, axes = _subplots(max(1, len(rows)), 4, figsize=(8.4, height), squeeze=False)
  shown = None
  for r, row in enumerate(rows):
    panels = (row['image'], row['image'], row['core_mask'], row['spurious_mask'])
    for c, (ax, panel) in enumerate(zip(axes[r], panels)):
      ax.imshow(panel, cmap=None if panel.ndim == 3 else 'gray', vmin=0, vmax=1)
      if c == 1:
        shown = ax.imshow(row['heatmap'], cmap='jet', alpha=0.45, vmin=0, vmax=1)
        if threshold is not None and (row['heatmap'] >= threshold).any():
          ax.contour(row['heatmap'], levels=[threshold], colors='white', linewidths=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(columns[c], fontsize=8)
    axes[r][0].set_ylabel(row['title'], fontsize=7)
  _layout_with_colorbar(fig, shown, 'heatmap / its maximum', caption, 0.9)
  fig.savefig(path, dpi=120)
  return path


def plot_feature_images(images: np.ndarray, heatmaps: np.ndarray, titles, title: str,
                        path: pathlib.Path, caption: str | None = None) -> pathlib.Path:
  """A feature's most activating images (top row) and its heatmaps on them (bottom row).

  Args:
    images: (n, H, W, 3) images in [0, 1].
    heatmaps: (n, H, W) heatmaps in [0, 1].
    titles: n tile titles (the sample's id, its activation and class).
    title: the figure's title (which feature, and why it was chosen).
    path: the PNG file to write.
    caption: what the panels show, under them (None: no caption).
  Returns:
    ``path``.
  """
  n = max(1, len(images))
  height = 3.9 + (0.7 if caption else 0)
  fig, axes = _subplots(2, n, figsize=(max(1.7 * n, 6), height), squeeze=False)
  shown = None
  for i in range(len(images)):
    axes[0][i].imshow(images[i])
    axes[0][i].set_title(titles[i], fontsize=6)
    axes[1][i].imshow(images[i])
    shown = axes[1][i].imshow(heatmaps[i], cmap='jet', alpha=0.45, vmin=0, vmax=1)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 13)), fontsize=9)
  _layout_with_colorbar(fig, shown, 'heatmap / its max', caption, 0.7)
  fig.savefig(path, dpi=120)
  return path


def write_json(report: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Writes a report as indented JSON (NumPy scalars and arrays converted).

  Args:
    report: the JSON-like dict.
    path: the file to write (a ``pathlib.Path``).
  Returns:
    ``path``.
  """
  def default(value):
    if isinstance(value, (np.integer,)):
      return int(value)
    if isinstance(value, (np.floating,)):
      return float(value)
    if isinstance(value, np.ndarray):
      return value.tolist()
    raise TypeError(f'not serialisable: {type(value).__name__}')
  path.write_text(json.dumps(report, indent=2, default=default) + '\n')
  return path

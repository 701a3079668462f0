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
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure
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


def plot_precision_recall(scores: Mapping[str, np.ndarray], correct: np.ndarray,
                          table: Mapping[str, Mapping[str, float]], path: pathlib.Path) -> pathlib.Path:
  """Precision-recall curves (correct = positive) of every score, chance level dashed.

  Args:
    scores: ``{name: (N,) scores}``.
    correct: (N,) bool, whether each sample is correctly classified.
    table: :func:`qscore_jax.metrics.score_table` of ``scores`` (AUPRC in the legend).
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  fig, ax = _subplots(figsize=(6, 5))
  if 0 < correct.sum() < len(correct):
    for name, values in scores.items():
      precision, recall, _ = precision_recall_curve(correct, values)
      ax.plot(recall, precision, lw=1.5 if name == 'qscore' else 1,
              label=f'{name} (AUPRC {table[name]["auprc"]:.3f})')
  ax.axhline(correct.mean(), color='0.5', ls='--', lw=1, label=f'chance ({correct.mean():.3f})')
  ax.set_xlabel('recall (correctly classified)')
  ax.set_ylabel('precision')
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8)
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
  ax.plot(removed, curve['ranked'], 'o-', label='kept by discriminativeness')
  mean, std = np.asarray(curve['random_mean']), np.asarray(curve['random_std'])
  ax.plot(removed, mean, 's--', label=f'random subsets (mean ± std, {len(curve["random"][0])} seeds)')
  ax.fill_between(removed, mean - std, mean + std, alpha=0.2)
  only = curve['discriminative_only']
  if only['kept'] and math.isfinite(only['accuracy']):
    d = curve['kept'][0]
    ax.plot([1 - only['kept'] / d], [only['accuracy']], 'r*', ms=12,
            label=f'only D ({only["kept"]} features)')
  ax.set_xlabel('fraction of dimensions removed')
  ax.set_ylabel('linear accuracy')
  ax.legend()
  return _save(fig, path)


def plot_class_accuracy(q: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                        class_names, path: pathlib.Path) -> pathlib.Path:
  """Per-class linear accuracy against the class's mean Q-Score (with Pearson r).

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
      ax.annotate(str(class_names[c]), (x, y), fontsize=7, xytext=(3, 2),
                  textcoords='offset points')
  if len(classes) > 2 and np.std(mean_q) > 0 and np.std(accuracy) > 0:
    r = np.corrcoef(mean_q, accuracy)[0, 1]
    ax.set_title(f'per-class accuracy vs mean Q (Pearson r = {r:.2f})')
  ax.set_xlabel('mean Q-Score of the class')
  ax.set_ylabel('linear accuracy of the class')
  return _save(fig, path)


def plot_heatmap_rows(rows, path: pathlib.Path, threshold: float | None = 0.6) -> pathlib.Path:
  """One row per sample: image | heatmap overlay | core mask | spurious mask.

  Each row is a dict with ``title``, ``image`` (H, W, 3) in [0, 1], ``heatmap``
  (H, W) in [0, 1] and ``core_mask``/``spurious_mask`` (H, W) in [0, 1]; the
  heatmap's binarised region (>= ``threshold``) is outlined on the overlay.

  Args:
    rows: the rows (a sequence of such dicts).
    path: the PNG file to write.
    threshold: heatmap level outlined on the overlay (default 0.6; None: no
      outline).
  Returns:
    ``path``.
  """
  columns = ('image', 'heatmap', 'core mask', 'spurious mask')
  fig, axes = _subplots(max(1, len(rows)), 4, figsize=(7.2, 1.9 * max(1, len(rows))),
                           squeeze=False)
  for r, row in enumerate(rows):
    panels = (row['image'], row['image'], row['core_mask'], row['spurious_mask'])
    for c, (ax, panel) in enumerate(zip(axes[r], panels)):
      ax.imshow(panel, cmap=None if panel.ndim == 3 else 'gray', vmin=0, vmax=1)
      if c == 1:
        ax.imshow(row['heatmap'], cmap='jet', alpha=0.45, vmin=0, vmax=1)
        if threshold is not None and (row['heatmap'] >= threshold).any():
          ax.contour(row['heatmap'], levels=[threshold], colors='white', linewidths=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(columns[c], fontsize=9)
    axes[r][0].set_ylabel(row['title'], fontsize=7)
  return _save(fig, path)


def plot_feature_images(images: np.ndarray, heatmaps: np.ndarray, ids, feature: int,
                        path: pathlib.Path) -> pathlib.Path:
  """A feature's most activating images (top row) and its heatmaps on them (bottom row).

  Args:
    images: (n, H, W, 3) images in [0, 1].
    heatmaps: (n, H, W) heatmaps in [0, 1].
    ids: n example ids, shown as titles.
    feature: the feature's index (in the figure title).
    path: the PNG file to write.
  Returns:
    ``path``.
  """
  n = max(1, len(images))
  fig, axes = _subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
  for i in range(len(images)):
    axes[0][i].imshow(images[i])
    axes[0][i].set_title(f'#{ids[i]}', fontsize=8)
    axes[1][i].imshow(images[i])
    axes[1][i].imshow(heatmaps[i], cmap='jet', alpha=0.45, vmin=0, vmax=1)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'feature {feature}: its most activating images and heatmaps', fontsize=10)
  return _save(fig, path)


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

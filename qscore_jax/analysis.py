"""The whole analysis of one representation space (``qscore analyze``).

Given the representations of a reference (training) split and an evaluation
split — stores written by :func:`qscore_jax.embed.embed_dataset`, or arrays —
:func:`analyze`:

1. computes A_j and the discriminative set D on the reference split;
2. scores every evaluation sample: Q-Score (default and v1) and label-free
   baselines (L2 norm, Hoyer sparsity);
3. trains the linear probe on the reference split and evaluates it (top-1,
   top-5, per-sample correctness and max softmax), adds k-NN agreement;
4. measures how well each score tells the probe's correct samples from its
   errors — AUPRC with correct = positive and with error = positive, AUROC, their
   chance levels and 95% bootstrap intervals (:mod:`qscore_jax.metrics`) — and
   the dataset-level RankMe and alpha-ReQ;
5. draws the compression curve (kept by discriminativeness vs random);
6. judges the paper's claims on these numbers (:mod:`qscore_jax.findings`);
7. writes ``report.json``, the per-sample scores (``scores.npz``) and the plots.

:func:`analyze_encoder` is the pipeline every driver runs (``demo``,
``interpret``, ``compare``, ``experiment``): it embeds the reference and the
evaluated split with an :class:`~qscore_jax.models.encoder.Encoder` (reusing
stores), runs :func:`analyze` (or reads an identical earlier run back) and
returns an :class:`AnalysisResult`, which the interpretation and the reports
consume. :func:`analyze_stores` is the same from two stores (``qscore analyze``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Mapping, Sequence

import numpy as np

from qscore_jax import (compression, findings, metrics, outputs, report, stats, streaming,
                        validation)
from qscore_jax.data.datasets import dataset_info
from qscore_jax.embed import embed_encoder
from qscore_jax.models.encoder import as_encoder
from qscore_jax.probe import ProbeConfig, evaluate_probe, train_linear_probe
from qscore_jax.store import RUN_FIELDS, RepresentationStore, check_same_model


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Every option of the analysis (defaults: METHOD.md).

  Attributes:
    eps: highly-active threshold in per-sample stds (default 4).
    band: percentiles of the non-zero activation counts delimiting D
      (default 50, 95).
    nonzero_only: take those percentiles over the non-zero counts (default) or
      over all of them.
    probe: the linear probe's :class:`~qscore_jax.probe.ProbeConfig`.
    compression: the compression curve's
      :class:`~qscore_jax.compression.CompressionConfig`; None skips the curve.
    knn_k: neighbours of the k-NN agreement baseline (default 10).
    spectrum_rows: at most this many evaluation rows enter RankMe and alpha-ReQ
      (default 25600).
    chunk_rows: rows per chunk when streaming the statistics over a store.
    bootstrap_resamples: resamples of the AUPRC/AUROC intervals (default 1000; 0:
      no intervals, and the claims cannot be judged).
  """
  eps: float = stats.DEFAULT_EPS
  band: tuple[float, float] = stats.DEFAULT_BAND
  nonzero_only: bool = True
  probe: ProbeConfig = ProbeConfig()
  compression: compression.CompressionConfig | None = compression.CompressionConfig()
  knn_k: int = 10
  spectrum_rows: int = 25600
  chunk_rows: int = streaming.DEFAULT_CHUNK_ROWS
  bootstrap_resamples: int = metrics.DEFAULT_RESAMPLES

  def __post_init__(self):
    validation.band(self.band)
    validation.eps(self.eps)
    validation.check_number(self.knn_k, 'knn_k', minimum=1, integer=True)
    validation.check_number(self.spectrum_rows, 'spectrum_rows', minimum=1, integer=True)
    validation.check_number(self.chunk_rows, 'chunk_rows', minimum=1, integer=True)
    validation.check_number(self.bootstrap_resamples, 'bootstrap_resamples', minimum=0,
                            integer=True)


@dataclasses.dataclass
class Split:
  """Representations (array or memory map), labels and ids of one split.

  Attributes:
    representations: (N, d) float32, a NumPy array, a memory map or a
      row-indexable view of a store too large for one map.
    labels: (N,) integer class labels.
    ids: (N,) example ids (row numbers for :meth:`from_arrays`).
    source: what the streaming statistics read: the
      :class:`~qscore_jax.store.RepresentationStore` or the (N, d) array.
    description: provenance recorded in the report (model, dataset, split,
      split size; or ``{'split': name}``).
  """
  representations: Any
  labels: np.ndarray
  ids: np.ndarray
  source: Any
  description: dict[str, Any]

  @classmethod
  def from_store(cls, path) -> 'Split':
    """The split held in a complete representation store.

    Args:
      path: the store directory (:func:`qscore_jax.embed.embed_dataset`).
    """
    store = RepresentationStore.open(path)
    reps = store.representations() if store.num_rows * store.dim * 4 <= 2 ** 31 else \
        _StoreMatrix(store)
    # What made the rows, in the report: the weights' fingerprint, preprocessing, data version.
    meta = {k: store.metadata.get(k) for k in RUN_FIELDS if k != 'shard_count'}
    return cls(reps, store.labels, store.ids, store, meta)

  @classmethod
  def from_arrays(cls, representations, labels, name: str = 'arrays') -> 'Split':
    """A split from in-memory arrays; ids are the row numbers.

    Args:
      representations: (N, d), converted to float32.
      labels: (N,) integer class labels.
      name: the split's name in the report (default ``'arrays'``).
    """
    representations = np.asarray(representations, np.float32)
    return cls(representations, np.asarray(labels), np.arange(len(representations)),
               representations, {'split': name})


class _StoreMatrix:
  """Row-indexable view of a store larger than 2 GiB (for the probe)."""

  def __init__(self, store: RepresentationStore):
    store.verify()  # once: the probe then reads random rows through memory maps
    self.parts = [np.load(s / 'representations.npy', mmap_mode='r')[:r]
                  for s, r in zip(store.shards, store.shard_rows())]
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
    self.shape = (int(self.offsets[-1]), store.dim)

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, rows):
    if isinstance(rows, tuple):
      rows, columns = rows
      return self[rows][:, columns]
    rows = np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)
    part = np.searchsorted(self.offsets, rows, side='right') - 1
    out = np.empty((len(rows), self.shape[1]), np.float32)
    for p in np.unique(part):
      where = part == p
      local = rows[where] - self.offsets[p]
      order = np.argsort(local)
      block = self.parts[p][local[order]]
      out[np.flatnonzero(where)[order]] = block
    return out


def analyze(train: Split, evaluation: Split, out_dir: str | pathlib.Path, *,
            num_classes: int | None = None, class_names: Sequence[str] | None = None,
            config: AnalysisConfig = AnalysisConfig(), plots: bool = True) -> dict[str, Any]:
  """Runs the analysis and writes ``report.json``, ``scores.npz`` and the plots.

  Args:
    train: the reference split: gives A_j and D and trains the linear probe.
    evaluation: the split that is scored and classified.
    out_dir: output directory (created, or an analysis qscore_jax wrote there, rewritten
      in place; anything else is refused: :mod:`qscore_jax.outputs`).
    num_classes: number of classes (default: the largest label of both
      splits + 1).
    class_names: names for the per-class table and plot (default: the indices).
    config: every option (:class:`AnalysisConfig`).
    plots: also draw the PNG plots (default True).
  Returns:
    The report dict (also in ``<out_dir>/report.json``).
  Raises:
    qscore_jax.outputs.OutputError: ``out_dir`` holds files that are not an analysis.
  """
  _check_pair(train, evaluation)
  out = pathlib.Path(out_dir).expanduser().resolve()
  outputs.prepare_output(out, 'analysis')
  timings: dict[str, float] = {}
  clock = time.perf_counter()

  def lap(name):
    nonlocal clock
    now = time.perf_counter()
    timings[name] = round(now - clock, 3)
    clock = now

  num_classes = num_classes or int(max(train.labels.max(), evaluation.labels.max())) + 1
  feature = streaming.feature_stats(train.source, eps=config.eps, band=config.band,
                                    nonzero_only=config.nonzero_only, chunk_rows=config.chunk_rows)
  lap('feature_stats')
  sample = streaming.sample_scores(evaluation.source, feature, chunk_rows=config.chunk_rows)
  lap('sample_scores')
  probe = train_linear_probe(train.representations, train.labels, num_classes, config.probe)
  result = evaluate_probe(probe, evaluation.representations, evaluation.labels)
  train_accuracy = evaluate_probe(probe, train.representations, train.labels)['top1']
  lap('probe')
  eval_h = np.asarray(evaluation.representations[:]) if len(evaluation.labels) <= 200_000 else None
  knn = (metrics.knn_agreement(eval_h, result['predictions'], config.knn_k)
         if eval_h is not None else None)
  lap('knn')
  correct = result['correct']
  scores = {'qscore': sample['qscore'], 'qscore_v1': sample['qscore_v1'],
            'max_softmax': result['max_softmax'], 'l2_norm': sample['l2_norm'],
            'hoyer_sparsity': sample['hoyer_sparsity']}
  if knn is not None:
    scores['knn_agreement'] = knn
  table = metrics.score_table(scores, correct, resamples=config.bootstrap_resamples)
  spectrum_source = eval_h if eval_h is not None else np.asarray(
      evaluation.representations[np.arange(min(len(evaluation.labels), config.spectrum_rows))])
  dataset_level = {'rankme': metrics.rankme(spectrum_source, max_rows=config.spectrum_rows),
                   'alpha_req': metrics.alpha_req(spectrum_source, max_rows=config.spectrum_rows)}
  lap('metrics')
  curve = None
  if config.compression is not None:
    curve = compression.compression_curve(train.representations, train.labels,
                                          evaluation.representations, evaluation.labels,
                                          num_classes, feature, config.compression)
  lap('compression')

  labels = evaluation.labels
  per_class = [{'class': int(c),
                'name': str(class_names[c]) if class_names is not None and c < len(class_names) else str(c),
                'count': int((labels == c).sum()),
                'accuracy': float(correct[labels == c].mean()),
                'mean_qscore': float(sample['qscore'][labels == c].mean())}
               for c in np.unique(labels)]
  report_dict = {
      'report_version': REPORT_VERSION,
      'train': train.description, 'evaluation': evaluation.description,
      'num_classes': num_classes, 'dim': int(len(feature.counts)),
      'options': {'eps': config.eps, 'band': list(config.band),
                  'nonzero_only': config.nonzero_only,
                  'probe': _probe_options(config.probe), 'knn_k': config.knn_k,
                  'bootstrap_resamples': config.bootstrap_resamples,
                  'compression': ({**dataclasses.asdict(config.compression),
                                   'probe': _probe_options(config.compression.probe)}
                                  if config.compression else None)},
      'feature_stats': feature.to_json(),
      'probe': {'top1': result['top1'], 'top5': result['top5'], 'train_top1': train_accuracy,
                'final_loss': float(probe.losses[-1])},
      'misclassification': table,
      'dataset_level': dataset_level,
      'qscore_summary': {
          'mean': float(sample['qscore'].mean()),
          'mean_correct': float(sample['qscore'][correct].mean()) if correct.any() else None,
          'mean_misclassified': float(sample['qscore'][~correct].mean()) if (~correct).any() else None,
          'zero_fraction': float(np.mean(sample['qscore'] == 0))},
      'sparsity': {
          'hoyer_mean': float(sample['hoyer_sparsity'].mean()),
          'active_features_mean': float(sample['num_active'].mean()),
          'zero_fraction': float(np.mean(eval_h <= 0))
          if eval_h is not None else None},
      'compression': compression.as_table(curve) if curve else None,
      'compression_discriminative_only': curve['discriminative_only'] if curve else None,
      'per_class': per_class,
      'timings_s': timings,
  }
  np.savez_compressed(out / 'scores.npz', ids=evaluation.ids, labels=labels,
                      predictions=result['predictions'], correct=correct,
                      activation_counts=feature.counts, discriminative=feature.discriminative,
                      **{f'score_{k}': v for k, v in scores.items()},
                      num_active=sample['num_active'],
                      num_active_discriminative=sample['num_active_discriminative'])
  if plots:
    figures = {
        'activation_frequencies': report.plot_activation_frequencies(
            feature.frequencies, feature.discriminative, feature.band_frequencies,
            out / 'activation_frequencies.png'),
        'qscore_histograms': report.plot_qscore_histograms(sample['qscore'], correct,
                                                           out / 'qscore_histograms.png'),
        'precision_recall': report.plot_precision_recall(scores, correct, table,
                                                         out / 'precision_recall.png'),
        'class_accuracy_vs_qscore': report.plot_class_accuracy(
            sample['qscore'], labels, correct, class_names, out / 'class_accuracy_vs_qscore.png'),
    }
    if curve:
      figures['compression'] = report.plot_compression(curve, out / 'compression.png')
    report_dict['figures'] = {k: v.name for k, v in figures.items()}
  report_dict['findings'] = findings.analysis_findings(report_dict)
  report.write_json(report_dict, out / 'report.json')
  return report_dict


def _check_pair(train: Split, evaluation: Split) -> None:
  """Refuses splits of two representation spaces (other model, preprocessing or d)."""
  if isinstance(train.source, RepresentationStore) and isinstance(evaluation.source,
                                                                  RepresentationStore):
    check_same_model(train.source, evaluation.source)
  dims = (train.representations.shape[1], evaluation.representations.shape[1])
  if dims[0] != dims[1]:
    raise ValueError(f'the reference split has d={dims[0]} features and the evaluated split '
                     f'd={dims[1]}: they come from different models; embed both splits with '
                     'the same model.')


def _probe_options(probe: ProbeConfig) -> dict[str, Any]:
  """The probe's options as run: the step schedule's milestones rescaled to its epochs."""
  return {**dataclasses.asdict(probe), 'milestones': list(probe.scaled_milestones()),
          'milestones_for_100_epochs': list(probe.milestones)}


def _with_interval(row: Mapping[str, Any], key: str) -> str:
  interval = row.get(f'{key}_interval')
  return f'{row[key]:.3f}' + (f' {findings.format_interval(interval)}' if interval else '')


def misclassification_lines(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The misclassification table as text: both AUPRC views side by side, AUROC, chance.

  Args:
    table: ``report['misclassification']``.
  Returns:
    The lines (a header naming the two views and their chance levels, one row per score).
  """
  q = table['qscore']
  cells = [(name, _with_interval(row, 'auprc_correct_positive'),
            _with_interval(row, 'auprc_error_positive'), _with_interval(row, 'auroc'))
           for name, row in table.items()]
  width = max(len(c[1]) for c in cells) + 2
  lines = [f"{'score':<17}{'AUPRC correct=positive':<{width + 2}}"
           f"{'AUPRC error=positive':<{width + 2}}AUROC",
           f"{'  chance':<17}{q['chance_auprc_correct_positive']:<{width + 2}.3f}"
           f"{q['chance_auprc_error_positive']:<{width + 2}.3f}0.500"]
  for name, correct, error, auroc in cells:
    lines.append(f'  {name:<15}{correct:<{width + 2}}{error:<{width + 2}}{auroc}')
  return lines


def summary_lines(report_dict: dict[str, Any], with_findings: bool = True) -> list[str]:
  """A short human-readable summary of a report: what it shows first, then the numbers.

  Args:
    report_dict: the dict returned by :func:`analyze` (or read from
      ``report.json``).
    with_findings: begin with the judged claims (:mod:`qscore_jax.findings`).
  Returns:
    The lines, without newlines.
  """
  fs = report_dict['feature_stats']
  lines = findings.finding_lines(report_dict.get('findings') or []) if with_findings else []
  lines += [
      f"linear probe   top-1 {100 * report_dict['probe']['top1']:.2f}%  top-5 "
      f"{100 * report_dict['probe']['top5']:.2f}%  (train {100 * report_dict['probe']['train_top1']:.2f}%)",
      f"features       d={fs['dim']}, |D|={fs['num_discriminative']}, never active "
      f"{fs['never_active']}, band A in [{fs['band_frequencies'][0]:.4f}, {fs['band_frequencies'][1]:.4f}]",
      "finding the probe's errors by each score (95% bootstrap intervals):"]
  lines += misclassification_lines(report_dict['misclassification'])
  dl = report_dict['dataset_level']
  lines.append(f"dataset        RankMe {dl['rankme']:.1f}   alpha-ReQ {dl['alpha_req']:.3f}")
  if report_dict.get('compression'):
    table = report_dict['compression']
    row = findings.compression_point(table)
    if row:
      lines.append(f"compression    {100 * row['removed']:.0f}% removed: ranked "
                   f"{100 * row['ranked']:.2f}%, random {100 * row['random_mean']:.2f} ± "
                   f"{100 * row['random_std']:.2f}% (all features {100 * table[0]['ranked']:.2f}%)")
  return lines


# --------------------------------------------------------------------------- the pipeline

SETTINGS_FILE = 'analysis_settings.json'
# The layout of report.json; an analysis of another layout is rerun, never read back.
REPORT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
  """One finished analysis: its report, its per-sample scores and what made them.

  Attributes:
    report: the ``report.json`` content (:func:`analyze`).
    scores: the ``scores.npz`` arrays: ``ids``, ``labels``, ``predictions``,
      ``correct``, ``activation_counts`` (d,), ``discriminative`` (d,),
      ``score_<name>`` per score, ``num_active``, ``num_active_discriminative``
      (all (N,) over the evaluated split unless marked (d,)).
    directory: where ``report.json``, ``scores.npz`` and the plots are.
    stores: the representation stores, ``{'reference': path, 'evaluated': path}``.
    encoder: the encoder that made the stores (None when analysed from stores).
    reference: ``(dataset, split)`` giving D and training the probe.
    evaluated: ``(dataset, split)`` that is scored and classified.
    data_dir: the tfds data directory the splits were read from.
    reused: True when an earlier identical analysis was read back instead of rerun.
  """
  report: dict[str, Any]
  scores: dict[str, np.ndarray]
  directory: pathlib.Path
  stores: dict[str, pathlib.Path]
  encoder: Any = None
  reference: tuple[str, str] | None = None
  evaluated: tuple[str, str] | None = None
  data_dir: str | None = None
  reused: bool = False

  @property
  def discriminative(self) -> np.ndarray:
    """bool (d,), membership of D."""
    return self.scores['discriminative'].astype(bool)

  @property
  def eps(self) -> float:
    """The highly-active threshold the analysis used."""
    return float(self.report['options']['eps'])

  def evaluated_store(self) -> RepresentationStore:
    """The evaluated split's store."""
    return RepresentationStore.open(self.stores['evaluated'])


def _read_result(directory: pathlib.Path, **fields) -> AnalysisResult:
  report_dict = json.loads((directory / 'report.json').read_text())
  with np.load(directory / 'scores.npz') as scores:
    arrays = dict(scores)
  return AnalysisResult(report_dict, arrays, directory, **fields)


def class_names_of(dataset: str | None, data_dir: str | None) -> Sequence[str] | None:
  """The dataset's class names, or None when the dataset cannot be described (names are
  cosmetic: a store can outlive the data it was made from).

  Args:
    dataset: the dataset name (None: no names).
    data_dir: its tfds data directory.
  """
  if not dataset:
    return None
  try:
    return dataset_info(dataset, data_dir).class_names
  except (ValueError, KeyError, OSError):
    return None


def analyze_stores(reference_store: str | pathlib.Path, evaluated_store: str | pathlib.Path,
                   out_dir: str | pathlib.Path, *, config: AnalysisConfig = AnalysisConfig(),
                   data_dir: str | None = None, plots: bool = True,
                   overwrite: bool = False) -> AnalysisResult:
  """:func:`analyze` of two stores (``qscore analyze``); class names from the evaluated dataset.

  The report is written beside ``out_dir`` and renamed into place when complete
  (:func:`qscore_jax.outputs.staged_output`), so ``out_dir`` holds a whole earlier analysis
  or a whole new one, never a mix.

  Args:
    reference_store: store of the reference split (D, the probe).
    evaluated_store: store of the evaluated split.
    out_dir: output directory of ``report.json``, ``scores.npz`` and the plots: new, or
      empty.
    config: every option (:class:`AnalysisConfig`).
    data_dir: tfds data directory, for the class names.
    plots: also draw the PNG plots.
    overwrite: replace an analysis qscore_jax wrote in ``out_dir``.
  Raises:
    qscore_jax.outputs.OutputError: ``out_dir`` holds an analysis and not ``overwrite``, or
      anything else (nothing is deleted).
  """
  out = pathlib.Path(out_dir).expanduser().resolve()
  outputs.check_output(out, 'analysis', overwrite=overwrite, existing='refuse',
                       contents_ok=False)  # before reading the stores; staged_output rechecks
  train = Split.from_store(reference_store)
  evaluation = Split.from_store(evaluated_store)
  for store in (train.source.path, evaluation.source.path):
    if overwrite and store.is_relative_to(out):
      raise ValueError(f'the store {store} is inside {out}, which --overwrite would replace; '
                       'choose another --out.')
  with outputs.staged_output(out, 'analysis', overwrite=overwrite) as staging:
    analyze(train, evaluation, staging, config=config, plots=plots,
            class_names=class_names_of(evaluation.description.get('dataset'), data_dir))
  return _read_result(out, stores={'reference': train.source.path,
                                   'evaluated': evaluation.source.path}, data_dir=data_dir)


def analyze_encoder(encoder, dataset: str, out_dir: str | pathlib.Path, *, split: str = 'test',
                    reference_dataset: str | None = None, reference_split: str = 'train',
                    config: AnalysisConfig = AnalysisConfig(), batch_size: int = 256,
                    data_dir: str | None = None, plots: bool = True, progress: bool = True,
                    store_dirs: Mapping[str, str | pathlib.Path] | None = None,
                    analysis_dir: str | pathlib.Path | None = None) -> AnalysisResult:
  """The analysis pipeline: embed both splits (reusing stores), then D, Q, probe, metrics.

  ``demo``, ``interpret``, ``compare`` and ``experiment`` all run the method
  through this one function. The stores are resumed or reused when they hold
  this encoder's rows (its content fingerprint is in their metadata); the
  analysis is read back instead of rerun when ``<analysis_dir>/analysis_settings.json``
  records the same encoder, splits and options.

  Args:
    encoder: the :class:`~qscore_jax.models.encoder.Encoder`.
    dataset: the evaluated dataset.
    out_dir: output directory.
    split: the evaluated split (default ``'test'``).
    reference_dataset: dataset of the reference split (default ``dataset``).
    reference_split: the split giving D and training the probe (default ``'train'``).
    config: analysis options (:class:`AnalysisConfig`; its ``compression`` None skips
      the curve).
    batch_size: global embedding batch, a multiple of the device count.
    data_dir: tfds data directory.
    plots: draw the analysis plots.
    progress: progress bars while embedding.
    store_dirs: ``{'reference': dir, 'evaluated': dir}`` (default
      ``<out>/store_reference``, ``<out>/store_evaluated``).
    analysis_dir: where the report goes (default ``<out>/analysis``): new, or an analysis
      qscore_jax wrote (anything else is refused before embedding).
  Returns:
    The :class:`AnalysisResult`.
  Raises:
    qscore_jax.outputs.OutputError: the analysis directory or a store directory holds
      something qscore_jax did not write there.
  """
  out = pathlib.Path(out_dir).expanduser().resolve()
  reference = (reference_dataset or dataset, reference_split)
  evaluated = (dataset, split)
  store_dirs = {name: pathlib.Path(path).expanduser().resolve() for name, path in (
      store_dirs or {'reference': out / 'store_reference',
                     'evaluated': out / 'store_evaluated'}).items()}
  directory = pathlib.Path(analysis_dir).expanduser().resolve() if analysis_dir else out / 'analysis'
  outputs.prepare_output(directory, 'analysis')  # before the embedding
  stores = {name: embed_encoder(encoder, ds, sp, store_dirs[name], batch_size=batch_size,
                                data_dir=data_dir, progress=progress)
            for name, (ds, sp) in (('reference', reference), ('evaluated', evaluated))}
  fields = dict(stores=stores, encoder=encoder, reference=reference, evaluated=evaluated,
                data_dir=data_dir)
  # Reused only if made from the same weights, splits and options.
  settings = json.loads(json.dumps({
      'model_fingerprint': encoder.fingerprint, 'compute_dtype': encoder.compute_dtype,
      'reference': list(reference),
      'evaluated': list(evaluated), 'config': dataclasses.asdict(config), 'plots': plots,
      'report_version': REPORT_VERSION}))
  settings_path = directory / SETTINGS_FILE
  if (settings_path.is_file() and (directory / 'report.json').is_file()
      and (directory / 'scores.npz').is_file()
      and json.loads(settings_path.read_text()) == settings):
    return _read_result(directory, reused=True, **fields)
  settings_path.unlink(missing_ok=True)  # a rerun that dies midway leaves no stale match
  analyze(Split.from_store(stores['reference']), Split.from_store(stores['evaluated']),
          directory, config=config, plots=plots, class_names=class_names_of(dataset, data_dir))
  settings_path.write_text(json.dumps(settings))
  return _read_result(directory, **fields)


def compare_models(encoders: Sequence[Any], dataset: str, out_dir: str | pathlib.Path, *,
                   labels: Sequence[str] | None = None, train_split: str = 'train',
                   eval_split: str = 'test', batch_size: int = 256,
                   data_dir: str | None = None, config: AnalysisConfig | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
  """Embeds and analyses several encoders on the same data (``qscore compare``).

  Each encoder goes through :func:`analyze_encoder`; its stores and report go
  to ``<out_dir>/<i>-<label>/`` (stores reused when present).

  Args:
    encoders: the :class:`~qscore_jax.models.encoder.Encoder` s, in order (a model
      reference is loaded once, with a deprecation warning).
    dataset: dataset name (``qscore datasets``).
    out_dir: output directory.
    labels: one name per encoder in the table and the folder names (default:
      each encoder's directory name, its workdir's for a finetune ``model/``).
    train_split: split giving D and training the probe (default ``'train'``).
    eval_split: split that is scored and classified (default ``'test'``).
    batch_size: global embedding batch (default 256).
    data_dir: tfds data directory (default: the usual one).
    config: analysis options (default: :class:`AnalysisConfig` without the
      compression curve).
    progress: show progress bars while embedding (default True).
  Returns:
    One report dict per model, in order, each with ``model_ref`` (its label).
  """
  encoders = [as_encoder(e, caller='compare_models') for e in encoders]
  labels = list(labels) if labels is not None else [_label(e) for e in encoders]
  if len(labels) != len(encoders):
    raise ValueError(f'compare_models: {len(labels)} labels for {len(encoders)} encoders.')
  config = config or AnalysisConfig(compression=None)
  out = pathlib.Path(out_dir).expanduser().resolve()
  reports = []
  for index, (encoder, label) in enumerate(zip(encoders, labels)):
    folder = out / f'{index}-{pathlib.Path(label).name}'
    result = analyze_encoder(
        encoder, dataset, folder, split=eval_split, reference_split=train_split, config=config,
        batch_size=batch_size, data_dir=data_dir, plots=False, progress=progress,
        store_dirs={'reference': folder / f'store_{train_split}',
                    'evaluated': folder / f'store_{eval_split}'}, analysis_dir=folder)
    reports.append({**result.report, 'model_ref': str(label)})
  return reports


def _label(encoder) -> str:
  """An encoder's short name: its directory's (a finetune workdir's for its ``model/``)."""
  if encoder.directory is None:
    return encoder.name
  directory = pathlib.Path(encoder.directory)
  return directory.parent.name if directory.name == 'model' else directory.name


def comparison_lines(reports: Sequence[dict[str, Any]]) -> list[str]:
  """The side-by-side table of :func:`compare_models`.

  Args:
    reports: the report dicts returned by :func:`compare_models` (each with
      ``model_ref``).
  Returns:
    The table's lines, one row per quantity and one column per model.
  """
  rows = [('model', lambda r: pathlib.Path(r['model_ref']).name),
          ('linear top-1 %', lambda r: f"{100 * r['probe']['top1']:.2f}"),
          ('linear top-5 %', lambda r: f"{100 * r['probe']['top5']:.2f}"),
          ('AUPRC of Q, correct=positive',
           lambda r: f"{r['misclassification']['qscore']['auprc_correct_positive']:.3f}"),
          ('  chance', lambda r:
           f"{r['misclassification']['qscore']['chance_auprc_correct_positive']:.3f}"),
          ('AUPRC of Q, error=positive',
           lambda r: f"{r['misclassification']['qscore']['auprc_error_positive']:.3f}"),
          ('  chance', lambda r:
           f"{r['misclassification']['qscore']['chance_auprc_error_positive']:.3f}"),
          ('AUROC of Q', lambda r: f"{r['misclassification']['qscore']['auroc']:.3f}"),
          ('mean Q', lambda r: f"{r['qscore_summary']['mean']:.4f}"),
          ('|D| / d', lambda r: f"{r['feature_stats']['num_discriminative']} / {r['dim']}"),
          ('RankMe', lambda r: f"{r['dataset_level']['rankme']:.1f}")]
  width = max(len(label) for label, _ in rows)
  cells = [[fn(r) for r in reports] for _, fn in rows]
  col = max(12, *(len(c) for row in cells for c in row))
  return [f'{label:<{width}}  ' + '  '.join(f'{c:>{col}}' for c in row)
          for (label, _), row in zip(rows, cells)]

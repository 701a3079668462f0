r"""``qscore demo``: the whole paper on the built-in synthetic shapes, in minutes on a CPU.

    qscore demo                      # writes qscore_demo/report.md and prints its path

1. Loads the small SimCLR encoder shipped with the package
   (``demo-simclr-r18w025``: ResNet-18 at width 0.25, 128-d representations,
   pre-trained by ``qscore finetune --config demo``; ``checkpoints/README.md``).
2. Embeds the train and test splits of ``synthetic_shapes/fixed_colours_small``
   (generated on first use: 2,000 + 500 images of 32 px, 10 shape classes,
   with ground-truth object and background masks).
3. Finds the discriminative features D on the train split, scores every test
   sample's Q-Score, trains a linear probe, measures how well a low Q finds the
   probe's mistakes (AUPRC) and draws the compression curve (features removed
   in Q's order vs at random).
4. Draws Grad-CAM heatmaps of each sample's discriminative features and their
   IoU with the object (core) and background (spurious) masks.
5. Judges the paper's three claims on these numbers (:mod:`qscore_jax.findings`:
   supported, not supported or inconclusive, with 95% intervals) and writes
   ``<out>/report.md`` — the verdicts first, then every figure with its numbers
   and the commands that reproduce each part — and ``<out>/report.json`` (the
   verdicts and where the full analysis and interpretation are).

Everything goes through the same functions as ``qscore embed / analyze /
interpret``: the analysis pipeline (:func:`qscore_jax.analysis.analyze_encoder`)
and the interpretation of its result (:func:`qscore_jax.interpret.interpret`);
this module only chooses the inputs and writes the report.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable, Mapping

from qscore_jax import _version, analysis, compression, findings, interpret, outputs, report
from qscore_jax.models.encoder import Encoder, as_encoder
from qscore_jax.probe import ProbeConfig

DEMO_MODEL = 'demo-simclr-r18w025'
DEMO_DATASET = 'synthetic_shapes/fixed_colours_small'
DEMO_EPS = 2.0


def run_demo(out_dir: str | pathlib.Path = 'qscore_demo', *,
             model: Encoder | str | os.PathLike = DEMO_MODEL,
             dataset: str = DEMO_DATASET, data_dir: str | None = None,
             stage: str | None = 'layer2', eps: float = DEMO_EPS, probe_epochs: int = 100,
             batch_size: int = 250, progress: bool = True,
             log: Callable[[str], Any] = print, model_label: str | None = None) -> pathlib.Path:
  """Runs the demo and writes its report.

  Args:
    out_dir: output directory (stores, analysis, figures, ``report.md``); a
      rerun reuses its stores and analysis.
    model: the encoder (:func:`qscore_jax.load_encoder`), or a reference loaded once
      here: the shipped demo model by default; any saved model directory,
      ``qscore finetune`` workdir or converted id works.
    dataset: a dataset with core/spurious masks (``synthetic_shapes/*`` or
      ``salient_imagenet``); it needs a ``train`` and a ``test`` split.
    data_dir: tfds data directory (default ``$QSCORE_JAX_DATA_DIR`` or tfds').
    stage: Grad-CAM stage of the heatmaps (default ``layer2``, 8x8 on 32-px images:
      a ResNet's default ``layer4`` is 1x1 there); ``None``: the model's default.
    eps: the highly-active threshold of L_i, in standard deviations (default 2: the
      paper's 4 was set for 2048-d ImageNet encoders; on the demo's 128-d encoder it
      leaves almost every image without a highly active discriminative feature).
    probe_epochs: epochs of the linear probe.
    batch_size: global batch of the embedding and heatmap passes.
    progress: progress bars.
    log: where the step-by-step messages go (``print``; ``lambda _: None`` for none).
    model_label: how the user named the model, for the report (default: the
      reference given, or the encoder's name).

  Returns:
    The path of ``report.md``.
  """
  start = time.perf_counter()
  out = pathlib.Path(out_dir).expanduser().resolve()
  encoder = as_encoder(model)
  label = model_label or (encoder.name if isinstance(model, Encoder) else str(model))
  log(f'model        {label} ({encoder.directory or encoder.name})')
  log(f'data         {dataset}: embedding train and test, finding D, Q-Scores, linear probe, '
      'compression curve, heatmaps')
  config = interpret.check_inputs(encoder, dataset, interpret.InterpretConfig(stage=stage, eps=eps),
                                  data_dir=data_dir)
  outputs.prepare_output(out, 'interpretation')  # refused before the embedding, not after
  for name in ('report.md', 'report.json'):  # a run stopped midway leaves no stale report
    (out / name).unlink(missing_ok=True)
  curve = compression.CompressionConfig(
      fractions_removed=(0.0, 0.25, 0.4, 0.5, 0.75, 0.9), random_seeds=(0, 1, 2),
      probe=ProbeConfig(epochs=30))
  result = analysis.analyze_encoder(
      encoder, dataset, out, split='test', reference_split='train',
      config=analysis.AnalysisConfig(eps=eps, compression=curve,
                                     probe=ProbeConfig(epochs=probe_epochs)),
      batch_size=batch_size, data_dir=data_dir, plots=True, progress=progress)
  interpretation = interpret.interpret(result, out, config=config, batch_size=batch_size,
                                       progress=progress)
  analysis_report = result.report
  seconds = time.perf_counter() - start
  text = report_markdown(analysis_report, interpretation, encoder.metadata, model=label,
                         dataset=dataset, seconds=seconds, data_dir=data_dir)
  found = all_findings(analysis_report, interpretation)
  report.write_json({
      'report_version': analysis.REPORT_VERSION, 'made_by': 'qscore demo',
      'qscore_jax_version': _version.__version__, 'model': label,
      'model_fingerprint': encoder.fingerprint, 'compute_dtype': encoder.compute_dtype,
      'dataset': dataset, 'seconds': round(seconds, 1),
      'findings': found,
      'misclassification': {k: v for k, v in analysis_report['misclassification'].items()
                            if k in ('qscore', 'max_softmax')},
      'analysis': 'analysis/report.json', 'interpretation': 'interpret.json'},
      out / 'report.json')
  path = out / 'report.md'
  path.write_text(text)  # last: a report.md is there only when everything it cites is
  for line in (findings.finding_lines(found)
               + analysis.summary_lines(analysis_report, with_findings=False)
               + interpret.summary_lines(interpretation, with_findings=False)[1:]):
    log(line)
  log(f'took         {seconds:.0f} s')
  log(f'report       {path}')
  return path


def all_findings(analysis_report: Mapping[str, Any],
                 interpretation: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The three judged claims of a demo run, figure paths relative to its output directory.

  Args:
    analysis_report: the analysis' ``report.json`` content (claims 1 and 2).
    interpretation: the ``interpret.json`` content (claim 3).
  Returns:
    The finding dicts (:mod:`qscore_jax.findings`).
  """
  found = [{**f, 'figure': f'analysis/{f["figure"]}' if f.get('figure') else None}
           for f in analysis_report.get('findings') or []]
  return found + list(interpretation.get('findings') or [])


def _pct(value: float | None) -> str:
  return 'n/a' if value is None else f'{100 * value:.1f}%'


def _num(value: float | None, digits: int = 3) -> str:
  return 'n/a' if value is None else f'{value:.{digits}f}'


def _interval(values) -> str:
  return f' {findings.format_interval(values)}' if values else ''


def _iou_cell(row: Mapping[str, Any], name: str) -> str:
  stat, base = row.get(name), row.get(f'{name}_baseline')
  if not stat or stat['mean'] is None:
    return 'n/a'
  return f"{stat['mean']:.3f}{_interval(stat.get('interval'))} ({_num(base['mean'] if base else None)})"


def _area_cell(row: Mapping[str, Any], key: str) -> str:
  return f"{_num(row[key])}{_interval(row.get(f'{key}_interval'))}"


def _figure(title: str, path: str) -> str:
  return f'![{title}]({path})'


def report_markdown(analysis_report: Mapping[str, Any], interpretation: Mapping[str, Any],
                    metadata: Mapping[str, Any], *, model: str, dataset: str,
                    seconds: float, data_dir: str | None = None) -> str:
  """The demo's Markdown report.

  Args:
    analysis_report: the analysis' ``report.json`` content (with the
      compression curve and the ``figures`` it drew under ``analysis/``).
    interpretation: the ``interpret.json`` content of the same run.
    metadata: the model's ``metadata.json`` content.
    model: how the user named the model.
    dataset: the dataset name.
    seconds: the run's wall time.
    data_dir: the tfds data directory of the run (for the reproducing commands).

  Returns:
    Markdown whose image links are relative to the output directory.
  """
  fs = analysis_report['feature_stats']
  probe = analysis_report['probe']
  mis = analysis_report['misclassification']
  qs = analysis_report['qscore_summary']
  sparsity = analysis_report['sparsity']
  options = analysis_report['options']
  figures = {k: f'analysis/{v}' for k, v in analysis_report.get('figures', {}).items()}
  config = interpretation['config']
  data = f' --data-dir {data_dir}' if data_dir else ''
  provenance = metadata.get('provenance', {})
  trained = (f"{metadata.get('method') or 'unknown method'}, {provenance.get('steps', '?')} steps "
             f"of `{provenance.get('trained_by', '?')}`" if provenance else 'no provenance recorded')
  arch = metadata['arch'] + ''.join(f', {k}={v}' for k, v in metadata['arch_options'].items())
  lines = [
      '# Q-Score demo report', '',
      f'Model **{model}** ({arch}; {trained}) on **{dataset}**: '
      f"{analysis_report['train'].get('split_size') or '?'} reference (train) and "
      f"{analysis_report['evaluation'].get('split_size') or '?'} evaluated (test) images, "
      f"{analysis_report['num_classes']} classes. Made by `qscore demo` in {seconds:.0f} s.", '',
      '## What this shows', '',
      'Each claim of the paper, judged on this run\'s numbers by the rules in '
      '`qscore_jax/findings.py`: *supported* when the 95% interval of the effect excludes no '
      'effect and the effect reaches the smallest size that matters, *not supported* when the '
      'interval excludes an effect of that size, *inconclusive* otherwise or with fewer than '
      f'{findings.MIN_COUNT} samples in a group. Intervals are in brackets.', '']
  lines += findings.finding_lines(all_findings(analysis_report, interpretation), markdown=True)
  lines += [
      '## 1. Discriminative features', '',
      f"Feature j is *highly active* on sample i (j in L_i) when h_ij > mu_i + {options['eps']:g} "
      'sigma_i, with mu_i and sigma_i the mean and std of that sample\'s own representation. '
      'It is *discriminative* (in D) when its activation frequency A_j over the train split lies '
      f"between the {options['band'][0]:g}th and {options['band'][1]:g}th percentiles of the "
      f"non-zero frequencies: [{fs['band_frequencies'][0]:.4f}, {fs['band_frequencies'][1]:.4f}]."
      + ('' if options['eps'] == 4 else
         f" (ε = {options['eps']:g} here; the paper's 4 was set for 2048-d ImageNet encoders, and "
         'on a small encoder it leaves most images with no highly active discriminative '
         'feature: `--eps 4` shows it.)'),
      '',
      '| representation dim | size of D | never highly active | mean highly active features | '
      'Hoyer sparsity | zeros |', '|---|---|---|---|---|---|',
      f"| {fs['dim']} | {fs['num_discriminative']} | {fs['never_active']} | "
      f"{_num(sparsity['active_features_mean'], 1)} | {_num(sparsity['hoyer_mean'])} | "
      f"{_pct(sparsity['zero_fraction'])} |", '']
  if 'activation_frequencies' in figures:
    lines += [_figure('activation frequencies', figures['activation_frequencies']), '']
  lines += [
      '## 2. Q-Score and the linear probe\'s mistakes', '',
      'Q_i = mean over j in L_i ∩ D of (h_ij - mu_i), 0 when the sample has no highly active '
      'discriminative feature: how strongly its few discriminative features fire. A low Q '
      'should flag a sample whose representation the linear probe gets wrong.', '',
      f"Linear probe (trained on the train split): top-1 **{_pct(probe['top1'])}** on test "
      f"(train {_pct(probe['train_top1'])}). Mean Q: {_num(qs['mean'])} overall, "
      f"{_num(qs['mean_correct'])} on correctly and {_num(qs['mean_misclassified'])} on "
      'wrongly classified samples.', '',
      'How well each score tells the probe\'s correct samples from its errors, in the two '
      'views of one ranking: *correct = positive* (the paper\'s: correct samples are the '
      'positives, ranked by the score; chance AUPRC = the accuracy) and *error = positive* '
      '(finding mistakes: errors are the positives, ranked by minus the score, low first; '
      'chance AUPRC = the error rate). AUROC is the same in both views. 95% bootstrap '
      'intervals over the test samples in brackets; max_softmax uses the probe (and so the '
      'labels), the others are label-free.', '',
      '| score | AUPRC, correct = positive | AUPRC, error = positive | AUROC |',
      '|---|---|---|---|',
      f"| *chance* | {_num(mis['qscore']['chance_auprc_correct_positive'])} | "
      f"{_num(mis['qscore']['chance_auprc_error_positive'])} | 0.500 |"]
  for name, row in mis.items():
    lines.append(f"| {name} | {_area_cell(row, 'auprc_correct_positive')} | "
                 f"{_area_cell(row, 'auprc_error_positive')} | {_area_cell(row, 'auroc')} |")
  lines.append('')
  captions = {
      'qscore_histograms': 'Q-Score histograms of the correctly and wrongly classified test '
                           'samples (densities; counts in the legend).',
      'precision_recall': 'Precision-recall curves of every score in both views (left: correct '
                          '= positive; right: error = positive); the legend gives the AUPRC of '
                          'the same table row, the dashed line chance.',
      'class_accuracy_vs_qscore': 'Each class\'s linear accuracy against its mean Q; Pearson r '
                                  'with its 95% interval (Fisher z) over the classes.'}
  for key, title in (('qscore_histograms', 'Q-Score histograms'),
                     ('precision_recall', 'precision-recall'),
                     ('class_accuracy_vs_qscore', 'class accuracy vs Q')):
    if key in figures:
      lines += [_figure(title, figures[key]), '', f'*{captions[key]}*', '']
  if analysis_report.get('compression'):
    compression_epochs = ((options.get('compression') or {}).get('probe') or {}).get('epochs', '?')
    lines += [
        '## 3. Compression', '',
        'Linear accuracy when a fraction of the features is removed, least discriminative '
        'first (Q\'s ranking) vs at random (mean ± std over seeds). These probes train for '
        f'{compression_epochs} epochs, so the 0% row can differ from the main probe.', '',
        '| removed | kept | ranked (Q\'s order) | random (mean ± std) |', '|---|---|---|---|']
    for row in analysis_report['compression']:
      lines.append(f"| {100 * row['removed']:.0f}% | {row['kept']} | {_pct(row['ranked'])} | "
                   f"{_pct(row['random_mean'])} ± {100 * row['random_std']:.1f} |")
    d_only = analysis_report.get('compression_discriminative_only')
    if d_only:
      lines += ['', f"D alone ({d_only['kept']} features): {_pct(d_only['accuracy'])}."]
    if 'compression' in figures:
      lines += ['', _figure('compression curve', figures['compression'])]
    lines.append('')
  lines += [
      '## 4. Where the discriminative features look', '',
      f"{config['method']} heatmaps at `{config['stage']}` of each sample's discriminative "
      f"activations, binarised at {config['heatmap_threshold']:g} "
      f"({config['threshold_mode']}); IoU with the object (core) and background (spurious) "
      'masks, 95% bootstrap interval over the images in brackets; in parentheses, chance: the '
      'same regions against the masks rotated by 180°. *No discriminative feature*: no '
      'feature of D is highly active on the image (Q = 0); *empty heatmap*: some are, but '
      'their heatmap is zero everywhere. Neither has an IoU.', '',
      '| samples | images | no discriminative feature | empty heatmap | core mIoU (chance) | '
      'spurious mIoU (chance) |', '|---|---|---|---|---|---|']
  for group, row in interpretation['summary'].items():
    lines.append(f"| {group} | {row['images']} | {row['no_discriminative_feature']} | "
                 f"{row.get('empty_heatmap', 0)} | {_iou_cell(row, 'core')} | "
                 f"{_iou_cell(row, 'spurious')} |")
  lines.append('')
  feature = interpretation.get('feature') or {}
  captions = {
      'samples': 'Test images with the highest Q, the lowest Q and misclassified ones with the '
                 'lowest Q (each image once), with their Q, true and predicted class. '
                 + interpret.heatmap_caption(config),
      'feature': f"Feature {feature.get('index')}: {feature.get('why', '')}. Its most "
                 'activating test images (top) and the heatmap of that feature alone (bottom).'}
  for key, name in interpretation.get('figures', {}).items():
    lines += [_figure(f'heatmaps: {key}', name), '', f'*{captions.get(key, "")}*', '']
  lines += [
      '',
      '## Reproduce and go further', '',
      '```bash',
      f'qscore embed {model} --dataset {dataset} --split train --out demo/train{data}',
      f'qscore embed {model} --dataset {dataset} --split test --out demo/test{data}',
      f"qscore analyze --train demo/train --eval demo/test --out demo/analysis --eps {options['eps']:g}",
      f"qscore interpret {model} --dataset {dataset} --out demo/interpret --eps {options['eps']:g} "
      f"--stage {config['stage']}{data}",
      'qscore finetune --config demo --init random --workdir runs/demo   # retrain this encoder',
      'qscore experiment --config experiment --workdir runs/experiment   # the paper\'s experiment',
      '```', '']
  return '\n'.join(lines)


__all__ = ['DEMO_DATASET', 'DEMO_MODEL', 'all_findings', 'report_markdown', 'run_demo']

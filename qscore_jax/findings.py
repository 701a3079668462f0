"""What a run shows: each claim of the paper judged on this run's numbers.

The paper makes three claims a run here can test (METHOD.md):

1. **Q-Score finds the linear probe's mistakes**: a low Q marks a sample the
   probe misclassifies. Effect: the AUROC of Q (one number for the correct =
   positive and the error = positive view) above chance, 0.5; interval:
   bootstrap over the evaluated samples (:func:`qscore_jax.metrics.bootstrap_areas`).
2. **Dropping the features outside D costs no accuracy**: removing up to 40% of
   the dimensions, least discriminative first, keeps the probe's accuracy.
   Effect: the loss of accuracy at the largest removed fraction of the curve up
   to 40%; interval: a normal interval whose variance adds the paired sampling
   variance of the loss over the evaluated samples (both probes classify the same
   samples) and the variance of the random-subset probes at that fraction, which
   stands in for how much a probe's accuracy moves with the features it is given
   (so the interval is conservative).
3. **Discriminative features sit on the object**: their heatmaps overlap the
   core (object) mask more than chance. Effect: the mean over images of core IoU
   minus its chance level (the same heatmap against the mask rotated by 180°);
   interval: bootstrap over the images.

Each claim is judged by one rule on its effect, the effect's 95% interval and a
*margin*, the smallest effect that matters:

- a claim that something is there (1, 3): **supported** when the interval lies
  above no effect and the estimate reaches the margin; **not supported** when the
  whole interval lies below the margin (no useful effect, or the reverse one);
  **inconclusive** otherwise (the interval is too wide to tell);
- the claim that nothing is lost (2): **supported** when the whole interval of
  the loss lies below the margin; **not supported** when the interval lies above
  no loss and the estimate reaches the margin; **inconclusive** otherwise;
- fewer than :data:`MIN_COUNT` samples in a group that the effect needs
  (errors, correct samples, evaluated samples, images) is **inconclusive**
  whatever the interval says.

The functions take the plain dicts of ``report.json`` / ``interpret.json`` and
return JSON-ready dicts: ``claim``, ``verdict``, ``statistic``, ``estimate``,
``interval``, ``margin``, ``evidence`` (the numbers, in words), ``reason`` (why
this verdict) and ``figure``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = 'supported', 'not supported', 'inconclusive'
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
# Fewer samples than this in a group an effect needs: no verdict either way.
MIN_COUNT = 20
# Smallest AUROC above 0.5 that counts as finding the probe's mistakes.
AUROC_MARGIN = 0.05
# Largest loss of linear accuracy (a fraction) that counts as no loss.
COMPRESSION_MARGIN = 0.02
# The claim covers removing up to this fraction of the dimensions.
COMPRESSION_UP_TO = 0.4
# Smallest mean IoU above chance that counts as sitting on the object.
IOU_MARGIN = 0.02
CONFIDENCE = 0.95

CLAIMS = {
    'misclassification': "Q-Score finds the linear probe's mistakes (a low Q marks an error)",
    'compression': 'Removing up to 40% of the features, least discriminative first, costs no '
                   'linear accuracy',
    'localisation': 'Discriminative features sit on the object (core mask) more than chance',
}


def effect_verdict(estimate: float | None, interval: Sequence[float] | None, margin: float,
                   *, enough: bool = True) -> str:
  """The verdict on a claim that an effect is there (effect 0 = none).

  Args:
    estimate: the effect's estimate (e.g. AUROC - 0.5).
    interval: its ``(lo, hi)`` interval; None when it could not be computed.
    margin: the smallest effect that matters (> 0).
    enough: False when a group the effect needs has too few samples.
  Returns:
    :data:`SUPPORTED` (interval above 0 and estimate >= margin), :data:`NOT_SUPPORTED`
    (whole interval below the margin) or :data:`INCONCLUSIVE`.
  """
  if not enough or estimate is None or interval is None or not all(
      math.isfinite(v) for v in (estimate, *interval)):
    return INCONCLUSIVE
  lo, hi = interval
  if lo > 0 and estimate >= margin:
    return SUPPORTED
  if hi < margin:
    return NOT_SUPPORTED
  return INCONCLUSIVE


def no_loss_verdict(loss: float | None, interval: Sequence[float] | None, margin: float,
                    *, enough: bool = True) -> str:
  """The verdict on a claim that nothing is lost (loss 0 = none).

  Args:
    loss: the loss's estimate.
    interval: its ``(lo, hi)`` interval; None when it could not be computed.
    margin: the largest loss that still counts as none (> 0).
    enough: False when a group the loss needs has too few samples.
  Returns:
    :data:`SUPPORTED` (whole interval below the margin), :data:`NOT_SUPPORTED`
    (interval above 0 and loss >= margin) or :data:`INCONCLUSIVE`.
  """
  # The mirror image of the effect rule: a loss that is there refutes the claim, a loss
  # shown negligible supports it.
  return {SUPPORTED: NOT_SUPPORTED, NOT_SUPPORTED: SUPPORTED, INCONCLUSIVE: INCONCLUSIVE}[
      effect_verdict(loss, interval, margin, enough=enough)]


def format_interval(values: Sequence[float] | None, digits: int = 3, scale: float = 1) -> str:
  """``[lo, hi]`` as text, e.g. ``[0.476, 0.585]``; ``[n/a]`` for None.

  Args:
    values: the interval, or None.
    digits: decimals.
    scale: multiplies both ends first (100 for percentage points).
  """
  if values is None:
    return '[n/a]'
  return '[' + ', '.join(f'{scale * v:.{digits}f}' for v in values) + ']'


_interval = format_interval


def compression_point(table: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The row of a compression table the claim is judged at: the largest removed fraction
  in (0, :data:`COMPRESSION_UP_TO`]; None when the curve has no such point.

  Args:
    table: ``report['compression']`` rows.
  """
  within = [r for r in table if 0 < r['removed'] <= COMPRESSION_UP_TO + 1e-9]
  return max(within, key=lambda r: r['removed']) if within else None


def _shift(values: Sequence[float] | None, by: float) -> list[float] | None:
  return None if values is None else [v - by for v in values]


def misclassification_finding(table: Mapping[str, Mapping[str, Any]],
                              figure: str | None = None) -> dict[str, Any]:
  """Claim 1 from the misclassification table of an analysis.

  Args:
    table: ``report['misclassification']`` (:func:`qscore_jax.metrics.score_table`
      with intervals): the ``qscore`` row is judged, ``max_softmax`` (when present)
      is quoted beside it.
    figure: the precision-recall figure's path, for the reader.
  Returns:
    The finding dict (module docstring).
  """
  row = table['qscore']
  auroc, interval = row['auroc'], row.get('auroc_interval')
  counts = {'errors': row['num_errors'], 'correct samples': row['num_correct']}
  short = [f'{n} {name}' for name, n in counts.items() if n < MIN_COUNT]
  verdict = effect_verdict(auroc - 0.5, _shift(interval, 0.5), AUROC_MARGIN, enough=not short)
  evidence = (
      f"AUROC of Q {auroc:.3f} {_interval(interval)} (chance 0.5); AUPRC with correct = "
      f"positive {row['auprc_correct_positive']:.3f} "
      f"{_interval(row.get('auprc_correct_positive_interval'))} (chance "
      f"{row['chance_auprc_correct_positive']:.3f}), with error = positive "
      f"{row['auprc_error_positive']:.3f} {_interval(row.get('auprc_error_positive_interval'))} "
      f"(chance {row['chance_auprc_error_positive']:.3f}); {row['num_errors']} errors among "
      f"{row['num_errors'] + row['num_correct']} samples.")
  softmax = table.get('max_softmax')
  if softmax and math.isfinite(softmax['auroc']):
    evidence += (f" For comparison, the probe's max softmax (which uses the labels) has AUROC "
                 f"{softmax['auroc']:.3f} {_interval(softmax.get('auroc_interval'))}.")
  useful = 0.5 + AUROC_MARGIN
  reason = {
      SUPPORTED: f'the interval lies above chance and the AUROC reaches {useful:.2f}',
      NOT_SUPPORTED: f'the whole interval lies below {useful:.2f}: Q ranks the errors '
                     'no better than negligibly above chance' + (
                         ' (it ranks them the wrong way)' if interval and interval[1] < 0.5
                         else ''),
      INCONCLUSIVE: (f'too few samples ({", ".join(short)}; at least {MIN_COUNT} each needed)'
                     if short else f'the interval holds both chance (0.5) and AUROC {useful:.2f}'),
  }[verdict]
  return {'claim': CLAIMS['misclassification'], 'key': 'misclassification', 'verdict': verdict,
          'statistic': 'AUROC of Q-Score', 'estimate': auroc, 'interval': interval,
          'no_effect': 0.5, 'margin': AUROC_MARGIN, 'evidence': evidence, 'reason': reason,
          'figure': figure}


def compression_finding(table: Sequence[Mapping[str, Any]], num_evaluated: int,
                        figure: str | None = None) -> dict[str, Any] | None:
  """Claim 2 from the compression table of an analysis.

  Args:
    table: ``report['compression']`` rows (``removed``, ``kept``, ``ranked``,
      ``random_mean``, ``random_std``; accuracies as fractions), the first with
      nothing removed.
    num_evaluated: evaluated samples behind each accuracy.
    figure: the compression figure's path.
  Returns:
    The finding dict, or None without a compression curve.
  """
  if not table:
    return None
  full = next((r for r in table if r['removed'] == 0), None)
  row = compression_point(table)
  base = {'claim': CLAIMS['compression'], 'key': 'compression',
          'statistic': 'loss of linear accuracy', 'margin': COMPRESSION_MARGIN,
          'no_effect': 0.0, 'figure': figure}
  if full is None or row is None:
    return {**base, 'verdict': INCONCLUSIVE, 'estimate': None, 'interval': None,
            'evidence': 'the compression curve has no point with nothing removed and one '
                        f'between 0 and {100 * COMPRESSION_UP_TO:.0f}% removed.',
            'reason': 'nothing to compare'}
  p0, p1 = full['ranked'], row['ranked']
  loss = p0 - p1
  n = max(num_evaluated, 1)
  spread = row.get('random_std') or 0.0
  sampling = row.get('ranked_loss_se')
  if sampling is None or not math.isfinite(sampling):  # unpaired (an older table): wider
    sampling = math.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)
  se = math.sqrt(sampling ** 2 + spread ** 2)
  z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
  interval = [loss - z * se, loss + z * se]
  enough = num_evaluated >= MIN_COUNT
  verdict = no_loss_verdict(loss, interval, COMPRESSION_MARGIN, enough=enough)
  evidence = (
      f"removing {100 * row['removed']:.0f}% of the dimensions ({row['kept']} kept) in Q's "
      f"order: {100 * p0:.1f}% -> {100 * p1:.1f}% top-1, a loss of {100 * loss:.1f} points "
      f"{_interval(interval, 1, 100)}; random subsets of the same size: "
      f"{100 * row['random_mean']:.1f} ± {100 * spread:.1f}%.")
  # Beside the verdict: where Q's order does worse or better than random subsets by more
  # than their spread and a point (the claim does not need it, a reader does).
  for word, side in (('less', -1), ('more', 1)):
    rows = [r for r in table if r['removed'] > 0 and r.get('random_std') is not None
            and side * (r['ranked'] - r['random_mean']) > max(r['random_std'], 0.01)]
    if rows:
      evidence += (f" Q's order keeps {word} accuracy than random subsets (by more than their "
                   'std and a point) at ' + ', '.join(
                       f"{100 * r['removed']:.0f}% removed ({100 * r['ranked']:.1f}% vs "
                       f"{100 * r['random_mean']:.1f} ± {100 * r['random_std']:.1f})"
                       for r in rows) + '.')
  margin = f'{100 * COMPRESSION_MARGIN:.0f} points'
  reason = {
      SUPPORTED: f'the whole interval of the loss lies below {margin}',
      NOT_SUPPORTED: f'the interval lies above no loss and the loss reaches {margin}',
      INCONCLUSIVE: (f'too few evaluated samples ({num_evaluated}; at least {MIN_COUNT} needed)'
                     if not enough else f'the interval holds both no loss and {margin}'),
  }[verdict]
  return {**base, 'verdict': verdict, 'estimate': loss, 'interval': interval,
          'removed': row['removed'], 'evidence': evidence, 'reason': reason}


def localisation_finding(summary: Mapping[str, Any], figure: str | None = None
                         ) -> dict[str, Any] | None:
  """Claim 3 from the ``all`` row of an interpretation's IoU summary.

  Args:
    summary: ``interpret['summary']['all']`` (:func:`qscore_jax.saliency.summarize_ious`),
      with ``core_over_chance`` and ``spurious_over_chance``.
    figure: the heatmap figure's path.
  Returns:
    The finding dict, or None when the summary has no chance levels.
  """
  core = summary.get('core_over_chance')
  if core is None:
    return None
  spurious = summary.get('spurious_over_chance') or {}
  count = core['count']
  enough = count >= MIN_COUNT
  verdict = effect_verdict(core['mean'], core.get('interval'), IOU_MARGIN, enough=enough)

  def part(name, over):
    stat, chance = summary[name], summary.get(f'{name}_baseline') or {}
    if over.get('mean') is None:
      return f'{name} IoU n/a'
    return (f"{name} IoU {stat['mean']:.3f} {_interval(stat.get('interval'))} vs chance "
            f"{chance.get('mean', float('nan')):.3f}: {over['mean']:+.3f} "
            f"{_interval(over.get('interval'))} ({over['count']} images)")
  evidence = part('core', core) + '; ' + part('spurious', spurious) + '.'
  if (spurious.get('interval') and spurious['interval'][0] > 0
      and core.get('interval') and core['interval'][1] < spurious['interval'][0]):
    evidence += ' The heatmaps overlap the background (spurious mask) beyond chance, more than ' \
                'the object.'
  reason = {
      SUPPORTED: f'the interval lies above chance and the excess reaches {IOU_MARGIN:.2f}',
      NOT_SUPPORTED: f'the whole interval lies below chance + {IOU_MARGIN:.2f}' + (
          ' (below chance itself)' if core.get('interval') and core['interval'][1] < 0 else ''),
      INCONCLUSIVE: (f'too few images with a defined IoU ({count}; at least {MIN_COUNT} needed)'
                     if not enough else
                     f'the interval holds both chance and chance + {IOU_MARGIN:.2f}'),
  }[verdict]
  return {'claim': CLAIMS['localisation'], 'key': 'localisation', 'verdict': verdict,
          'statistic': 'mean core IoU minus its chance level', 'estimate': core['mean'],
          'interval': core.get('interval'), 'no_effect': 0.0, 'margin': IOU_MARGIN,
          'evidence': evidence, 'reason': reason, 'figure': figure}


def analysis_findings(report: Mapping[str, Any], figure_dir: str = '') -> list[dict[str, Any]]:
  """Claims 1 and 2 (2 only with a compression curve) of an analysis report.

  Args:
    report: the ``report.json`` content of :func:`qscore_jax.analysis.analyze`.
    figure_dir: prefix of the figures' paths (e.g. ``'analysis/'``).
  Returns:
    The finding dicts, in claim order.
  """
  figures = report.get('figures') or {}

  def path(key):
    return f'{figure_dir}{figures[key]}' if key in figures else None
  found = [misclassification_finding(report['misclassification'], path('precision_recall'))]
  evaluated = report['misclassification']['qscore']
  compressed = compression_finding(report.get('compression') or [],
                                   evaluated['num_correct'] + evaluated['num_errors'],
                                   path('compression'))
  if compressed:
    found.append(compressed)
  return found


def finding_lines(found: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> list[str]:
  """The findings as text: a heading, then one paragraph per claim.

  Args:
    found: finding dicts.
    markdown: Markdown (bold verdicts, bullets) rather than console text.
  Returns:
    The lines, without newlines.
  """
  head = ('What this shows: each claim of the paper judged on this run (95% intervals in '
          'brackets; the rules are in qscore_jax/findings.py)')
  lines = [head] if not markdown else []
  for f in found:
    verdict = f['verdict'].upper()
    if markdown:
      figure = f" (figure: [{f['figure']}]({f['figure']}))" if f.get('figure') else ''
      lines += [f"- **{f['claim']}: {f['verdict']}**, {f['reason']}. {f['evidence']}{figure}", '']
    else:
      lines.append(f"  {verdict:<14}{f['claim']}: {f['reason']}.")
      lines.append(f"  {'':<14}{f['evidence']}")
  return lines


__all__ = ['AUROC_MARGIN', 'CLAIMS', 'COMPRESSION_MARGIN', 'COMPRESSION_UP_TO', 'INCONCLUSIVE',
           'IOU_MARGIN', 'MIN_COUNT', 'NOT_SUPPORTED', 'SUPPORTED', 'VERDICTS',
           'analysis_findings', 'compression_finding', 'compression_point', 'effect_verdict',
           'finding_lines', 'format_interval',
           'localisation_finding', 'misclassification_finding', 'no_loss_verdict']

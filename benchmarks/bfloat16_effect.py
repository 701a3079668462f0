r"""What computing in bfloat16 changes, measured against float32 on the same weights and images.

    python benchmarks/bfloat16_effect.py --out benchmarks/results/bfloat16_effect.json

Three models, each run twice (``dtype`` float32 and bfloat16; parameters, pooling and every
statistic stay float32):

* the shipped demo encoder (``demo-simclr-r18w025``) through the whole analysis on
  ``synthetic_shapes/fixed_colours_small`` (eps 2, as ``qscore demo``): representations,
  D, Q-Scores, the linear probe's predictions, AUPRC in both views;
* ResNet-50 and ViT-S/16 as the converters build them (``mocov3-r50-100ep``'s and
  ``dino-vits16``'s architectures) with random weights, on generated 224-px images: the
  representations, D and Q-Scores (eps 2) of the reference half applied to the other half.

Columns: the largest absolute difference of a representation entry over the largest
entry (max relative error) and the median per-sample relative L2 error; Spearman's rank
correlation of Q; the Jaccard index of the two D; the fraction of probe predictions that
agree; the AUPRC differences; and the forward pass's images/s in each dtype (fresh jitted
calls, median of 3 after compiling) — on a CPU, XLA runs most bfloat16 work through float32,
which is why ``auto`` means float32 there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
from scipy import stats as sp_stats

from qscore_jax import analysis, stats, streaming
from qscore_jax.models import build_model, init_variables, load_encoder, registry
from qscore_jax.models.variables import embed
from qscore_jax.summary import generated_images

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)


def _representation_errors(low: np.ndarray, high: np.ndarray) -> dict[str, float]:
  low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
  rows = np.linalg.norm(low - high, axis=1) / np.maximum(np.linalg.norm(high, axis=1), 1e-30)
  return {'max_relative_error': float(np.abs(low - high).max() / np.abs(high).max()),
          'median_row_relative_l2': float(np.median(rows))}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  union = np.sum(a | b)
  return float(np.sum(a & b) / union) if union else 1.0


def _throughput(module, variables, images: np.ndarray) -> float:
  fn = jax.jit(lambda v, x: embed(module, v, x))
  fn(variables, images).block_until_ready()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    fn(variables, images).block_until_ready()
    times.append(time.perf_counter() - start)
  return len(images) / statistics.median(times)


def demo_model(data_dir: str | None) -> dict:
  """The shipped encoder through the analysis, float32 vs bfloat16."""
  dataset = 'synthetic_shapes/fixed_colours_small'
  results = {}
  with tempfile.TemporaryDirectory() as work:
    for dtype in ('float32', 'bfloat16'):
      encoder = load_encoder('demo-simclr-r18w025', dtype=dtype)
      result = analysis.analyze_encoder(
          encoder, dataset, pathlib.Path(work) / dtype, config=analysis.AnalysisConfig(
              eps=2.0, compression=None), batch_size=250, data_dir=data_dir, plots=False,
          progress=False)
      images = np.random.default_rng(0).random((250, 32, 32, 3)).astype(np.float32)
      results[dtype] = {'h': result.evaluated_store().representations(),
                        'scores': result.scores, 'report': result.report,
                        'images_per_second': _throughput(encoder.module, encoder.variables,
                                                         images)}
  low, high = results['bfloat16'], results['float32']
  q_low, q_high = low['scores']['score_qscore'], high['scores']['score_qscore']
  row = {'model': 'demo-simclr-r18w025 (fixed_colours_small, 500 test images)',
         **_representation_errors(low['h'], high['h']),
         'qscore_spearman': float(sp_stats.spearmanr(q_low, q_high).statistic),
         'discriminative_jaccard': _jaccard(low['scores']['discriminative'].astype(bool),
                                            high['scores']['discriminative'].astype(bool)),
         'size_of_D': int(high['scores']['discriminative'].sum()),
         'nonzero_q': int(np.sum(q_high != 0)),
         'probe_agreement': float(np.mean(low['scores']['predictions']
                                          == high['scores']['predictions']))}
  for view in ('auprc_correct_positive', 'auprc_error_positive'):
    row[f'{view}_difference'] = float(low['report']['misclassification']['qscore'][view]
                                      - high['report']['misclassification']['qscore'][view])
  row['images_per_second'] = {k: v['images_per_second'] for k, v in results.items()}
  return row


def random_model(model_id: str, num_images: int) -> dict:
  """A registry architecture with random weights on generated images, float32 vs bfloat16."""
  spec = registry.get_model_spec(model_id)
  images = generated_images(num_images, 224, 224, seed=0)
  pre = spec.preprocessing
  images = (images - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
  out = {}
  variables = None
  for dtype in ('float32', 'bfloat16'):
    module = spec.build(dtype=jax.numpy.float32 if dtype == 'float32' else jax.numpy.bfloat16)
    if variables is None:
      variables = init_variables(module, jax.random.key(0), (1, 224, 224, 3))
    fn = jax.jit(lambda v, x, m=module: embed(m, v, x))
    h = np.concatenate([np.asarray(fn(variables, images[i:i + 32]))
                        for i in range(0, num_images, 32)])
    out[dtype] = {'h': h, 'images_per_second': _throughput(module, variables, images[:32])}
  half = num_images // 2
  summary = {}
  for dtype, row in out.items():  # eps 2: at 4 random weights leave almost every Q at 0
    feature = streaming.feature_stats(row['h'][:half], eps=2.0)
    summary[dtype] = {'D': np.asarray(feature.discriminative),
                      'q': np.asarray(stats.qscore(row['h'][half:], feature.discriminative, 2.0))}
  return {'model': f'{model_id} architecture, random weights ({num_images} generated images)',
          **_representation_errors(out['bfloat16']['h'], out['float32']['h']),
          'qscore_spearman': float(sp_stats.spearmanr(summary['bfloat16']['q'],
                                                      summary['float32']['q']).statistic),
          'discriminative_jaccard': _jaccard(summary['bfloat16']['D'], summary['float32']['D']),
          'size_of_D': int(summary['float32']['D'].sum()),
          'nonzero_q': int(np.sum(summary['float32']['q'] != 0)),
          'probe_agreement': None, 'auprc_correct_positive_difference': None,
          'auprc_error_positive_difference': None,
          'images_per_second': {k: v['images_per_second'] for k, v in out.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=256,
                      help='generated images for the random-weight models (default 256)')
  parser.add_argument('--data-dir', help='tfds data directory of the demo dataset')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  rows = [demo_model(args.data_dir), random_model('mocov3-r50-100ep', args.images),
          random_model('dino-vits16', args.images)]
  summary = {'cpu': _common.cpu_name(), 'backend': jax.default_backend(), 'jax': jax.__version__,
             'date': time.strftime('%Y-%m-%d'), 'rows': rows}
  print(json.dumps(summary, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=2) + '\n')


if __name__ == '__main__':
  main()

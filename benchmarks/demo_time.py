r"""Wall time of `qscore demo` as a newcomer runs it: a fresh process, an empty data directory.

    python benchmarks/demo_time.py --rounds 3 --out benchmarks/results/demo_time.json

Each round runs the installed ``qscore demo`` command in a new process with a new, empty tfds
data directory (so the synthetic dataset is generated, as on a fresh machine) and a new output
directory, and times it from process start to exit; nothing is cached between rounds (no JAX
compilation cache is configured). It also reads the report the demo wrote and keeps its
headline numbers, so the table shows that every round computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _common  # benchmarks/_common.py (the scripts run from benchmarks/)


def _qscore() -> str:
  """The ``qscore`` command of the Python running this script (its environment need not be
  activated), else the one on PATH."""
  beside = pathlib.Path(sys.executable).with_name('qscore')
  return str(beside) if beside.exists() else shutil.which('qscore') or 'qscore'


def one_round(work: pathlib.Path) -> dict:
  """Runs ``qscore demo`` once in ``work``; its wall time and headline numbers."""
  env = dict(os.environ, QSCORE_JAX_DATA_DIR=str(work / 'tfds'))
  start = time.perf_counter()
  result = subprocess.run([_qscore(), 'demo', '--out',
                           str(work / 'demo'), '--no-progress'], env=env, capture_output=True,
                          text=True, check=False)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f'qscore demo failed:\n{result.stderr[-3000:]}')
  report = (work / 'demo' / 'report.md').read_text()
  analysis = json.loads((work / 'demo' / 'analysis' / 'report.json').read_text())
  verdicts = json.loads((work / 'demo' / 'report.json').read_text())['findings']
  return {'seconds': round(seconds, 1),
          'top1': analysis['probe']['top1'],
          'auprc_q': analysis['misclassification']['qscore']['auprc_error_positive'],
          'verdicts': ' / '.join(f['verdict'] for f in verdicts),
          'num_discriminative': analysis['feature_stats']['num_discriminative'],
          'figures': len(re.findall(r'!\[', report))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=3, help='fresh runs (default 3)')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args()
  rounds = []
  for index in range(args.rounds):
    with tempfile.TemporaryDirectory() as work:
      rounds.append(one_round(pathlib.Path(work)))
    print(f"round {index + 1}: {rounds[-1]['seconds']:.1f} s, top-1 {rounds[-1]['top1']:.3f}, "
          f"AUPRC of Q {rounds[-1]['auprc_q']:.3f}, |D| {rounds[-1]['num_discriminative']}, "
          f"{rounds[-1]['figures']} figures, verdicts {rounds[-1]['verdicts']}", flush=True)
  summary = {'rounds': rounds, 'median_seconds': statistics.median(r['seconds'] for r in rounds),
             'max_seconds': max(r['seconds'] for r in rounds), 'cpus': os.cpu_count(),
             'processor': _common.cpu_name(),
             'date': time.strftime('%Y-%m-%d')}
  print(f"median {summary['median_seconds']:.1f} s, max {summary['max_seconds']:.1f} s")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=2) + '\n')


if __name__ == '__main__':
  main()

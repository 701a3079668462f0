"""Streaming statistics over a 1,000,000 x 2048 float32 store on disk (8.2 GB).

Writes the store (pooled-ReLU-like random features), then measures on this machine:

  * the disk's sequential read bandwidth, cold (the file's pages evicted from the page cache
    with posix_fadvise(DONTNEED) first), and the memory copy bandwidth;
  * pass 1, :func:`qscore_jax.streaming.feature_stats` (activation counts, A_j, D), cold;
  * pass 2, :func:`qscore_jax.streaming.sample_scores` (Q-Score, v1, baselines per row), cold;
  * rows/s and GB/s of each pass, the ratio to the bandwidth bound (the fastest of a bare
    buffered read, a bare O_DIRECT read and the passes' own reader alone, measured before
    each cold round), and the peak resident memory of the process (the store is generated
    in a child process, so its buffers do not count);
  * both passes again with the store in the page cache (the cost of the computation).

Run (needs ~9 GB of free disk; about 10 minutes):

    python benchmarks/streaming_stats.py --dir /tmp/qscore_bench --out benchmarks/results/streaming_stats.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

import _common


def _evict(path: pathlib.Path) -> None:
  """Drops a file's pages from the page cache (the next read comes from disk)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def _read_bandwidth(path: pathlib.Path, direct: bool = False, block: int = 64 << 20) -> float:
  """GB/s of a bare sequential read of ``path`` from the disk (cold).

  Buffered (through the page cache, which costs CPU) or ``direct`` (O_DIRECT: disk to
  memory, as the streaming passes read a chunk that is not in the page cache).
  """
  _evict(path)
  buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
  view = memoryview(buffer)
  fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
  total, start = 0, time.perf_counter()
  try:
    while (n := os.preadv(fd, [view], total)):
      total += n
  finally:
    os.close(fd)
  seconds = time.perf_counter() - start
  view.release()
  buffer.close()
  return total / seconds / 1e9


def _reader_alone(store) -> float:
  """Seconds of one cold pass of the streaming passes' own reader, verifying, with no kernel:
  the fastest this code reads the store (two O_DIRECT threads can beat one bare read)."""
  from qscore_jax import streaming  # pylint: disable=import-outside-toplevel
  data = store.shards[0] / 'representations.npy'
  _evict(data)
  start = time.perf_counter()
  for *_, release in streaming._prefetched(store, 16384, store.dim):  # pylint: disable=protected-access
    release()
  return time.perf_counter() - start


def _warm(path: pathlib.Path, block: int = 64 << 20) -> None:
  """Reads a file once so that its pages are in the page cache."""
  buffer = bytearray(block)
  with open(path, 'rb', buffering=0) as f:
    while f.readinto(buffer):
      pass


def _memory_bandwidth(size: int = 1 << 30) -> float:
  source = np.ones(size // 4, np.float32)
  target = np.empty_like(source)
  np.copyto(target, source)
  start = time.perf_counter()
  for _ in range(3):
    np.copyto(target, source)
  return 3 * 2 * source.nbytes / (time.perf_counter() - start) / 1e9  # read + write


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def make_store(directory: pathlib.Path, rows: int, dim: int, seed: int = 0) -> pathlib.Path:
  from qscore_jax.store import ShardWriter  # pylint: disable=import-outside-toplevel
  with ShardWriter(directory, shard_index=0, shard_count=1, rows=rows, dim=dim, first_id=0,
                   metadata={'model': 'benchmark', 'dataset': 'random', 'split': 'train',
                             'split_size': rows}) as writer:
    rng = np.random.default_rng(seed)
    scale = rng.gamma(1.0, 1.0, dim).astype(np.float32)
    block = 65536
    for start in range(writer.done, rows, block):
      n = min(block, rows - start)
      values = rng.standard_normal((n, dim), dtype=np.float32) * scale
      np.maximum(values, 0, out=values)
      np.square(values, out=values)
      writer.append(values, np.zeros(n, np.int32), np.arange(start, start + n))
  return directory


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--dir', required=True, help='scratch directory for the store (~9 GB)')
  parser.add_argument('--rows', type=int, default=1_000_000)
  parser.add_argument('--dim', type=int, default=2048)
  parser.add_argument('--chunk-rows', type=int, default=16384)
  parser.add_argument('--rounds', type=int, default=5,
                      help='rounds of the passes, verified and not, cold and warm '
                      '(medians reported)')
  parser.add_argument('--keep', action='store_true', help='keep the store afterwards')
  parser.add_argument('--out', help='write the results as JSON here')
  parser.add_argument('--write-only', action='store_true',
                      help='only write the store (run in a child process, so that the peak '
                           'memory of generating the data is not counted against the passes)')
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from qscore_jax import streaming  # pylint: disable=import-outside-toplevel
  from qscore_jax.store import RepresentationStore  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(args.dir).expanduser().resolve() / 'store'
  if args.write_only:
    if not (root / 'metadata.json').exists() or not RepresentationStore.open(
        root, require_complete=False).num_rows == args.rows:
      make_store(root, args.rows, args.dim)
    print(json.dumps({'memory_copy_gb_s': _memory_bandwidth()}))
    return
  start = time.perf_counter()
  child = subprocess.run([sys.executable, __file__, '--dir', args.dir, '--rows', str(args.rows),
                          '--dim', str(args.dim), '--write-only'], check=True,
                         capture_output=True, text=True)
  memory = json.loads(child.stdout.strip().splitlines()[-1])['memory_copy_gb_s']
  write_s = time.perf_counter() - start
  data = root / 'shard-00000-of-00001' / 'representations.npy'
  size_gb = data.stat().st_size / 1e9
  rss_before = _peak_rss_gb()

  disk = _read_bandwidth(data)
  disk_direct = _read_bandwidth(data, direct=True)
  start = time.perf_counter()
  store = RepresentationStore.open(root)  # sizes, headers, labels and ids verified
  open_s = time.perf_counter() - start
  unverified = RepresentationStore.open(root, verify_checksums=False)
  _evict(data)
  start = time.perf_counter()
  store.verify()
  verify_s = time.perf_counter() - start

  # Each pass cold, with and without checksum verification, interleaved: the medians of
  # `--rounds` rounds give the cost of verifying as a ratio measured side by side.
  # The order alternates from round to round, so that neither variant always runs first.
  # The disk of a VM delivers 0.5-2.5 GB/s from one minute to the next: each cold round
  # measures its own bound (the faster bare read, direct or buffered, just before it), and
  # the passes are compared with the bound of their round.
  bounds, read_rounds = [], []

  def timed_rounds(cold: bool):
    times = {(p, v): [] for p in (1, 2) for v in (True, False)}
    for round_ in range(args.rounds):
      if cold:
        reads = {'direct': size_gb / _read_bandwidth(data, direct=True),
                 'buffered': size_gb / _read_bandwidth(data), 'reader': _reader_alone(store)}
        read_rounds.append(reads)
        bounds.append(min(reads.values()))
      for verified in ((True, False) if round_ % 2 == 0 else (False, True)):
        source = store if verified else unverified
        if cold:
          _evict(data)
        start = time.perf_counter()
        feature = streaming.feature_stats(source, chunk_rows=args.chunk_rows)
        times[1, verified].append(time.perf_counter() - start)
        if cold:
          _evict(data)
        start = time.perf_counter()
        scores = streaming.sample_scores(source, feature, chunk_rows=args.chunk_rows)
        times[2, verified].append(time.perf_counter() - start)
    return times, feature, scores

  times, feature, scores = timed_rounds(cold=True)
  median = {key: float(np.median(value)) for key, value in times.items()}
  pass1, pass2 = median[1, True], median[2, True]
  bound_s = float(np.median(bounds))
  ratio = {p: float(np.median([t / b for t, b in zip(times[p, True], bounds)])) for p in (1, 2)}
  peak = _peak_rss_gb()
  # The same passes with the store in the page cache (a second read): what the
  # computation, and the checksums' hashing, cost when the disk is out of the way.
  _warm(data)
  warm_times, _, _ = timed_rounds(cold=False)
  warm_median = {key: float(np.median(value)) for key, value in warm_times.items()}
  warm1, warm2 = warm_median[1, True], warm_median[2, True]
  result = {
      'rows': args.rows, 'dim': args.dim, 'store_gb': size_gb, 'write_s': write_s,
      'cpu': _common.cpu_name(), 'cpu_flags': _common.cpu_flag_summary(),
      'disk_read_gb_s': disk, 'disk_read_direct_gb_s': disk_direct,
      'memory_copy_gb_s': memory, 'bandwidth_bound_s': bound_s,
      'bandwidth_bound_rounds_s': bounds, 'bare_reads_rounds_s': read_rounds,
      'pass1_feature_stats_s': pass1, 'pass2_sample_scores_s': pass2,
      'pass1_rows_per_s': args.rows / pass1, 'pass2_rows_per_s': args.rows / pass2,
      'pass1_gb_s': size_gb / pass1, 'pass2_gb_s': size_gb / pass2,
      'pass1_vs_bound': ratio[1], 'pass2_vs_bound': ratio[2],
      'pass1_warm_s': warm1, 'pass2_warm_s': warm2,
      'open_s': open_s, 'verify_s': verify_s, 'verify_vs_bound': verify_s / bound_s,
      'pass1_unverified_s': median[1, False], 'pass2_unverified_s': median[2, False],
      'pass1_verify_cost': pass1 / median[1, False] - 1,
      'pass2_verify_cost': pass2 / median[2, False] - 1,
      'pass1_warm_unverified_s': warm_median[1, False],
      'pass2_warm_unverified_s': warm_median[2, False],
      'rounds': {f'pass{p}_{"verified" if v else "unverified"}': t for (p, v), t in times.items()},
      'warm_rounds': {f'pass{p}_{"verified" if v else "unverified"}': t
                      for (p, v), t in warm_times.items()},
      'peak_rss_gb': peak, 'rss_before_passes_gb': rss_before,
      'num_discriminative': feature.num_discriminative,
      'mean_qscore': float(scores['qscore'].mean()),
      'chunk_rows': args.chunk_rows, 'devices': jax.device_count(), 'cpu_cores': os.cpu_count(),
  }
  print('| quantity | value |\n|---|---|')
  print(f"| store | {args.rows:,} x {args.dim} float32, {size_gb:.2f} GB |")
  print(f"| CPU | {result['cpu']} ({result['cpu_flags']}) |")
  print(f"| disk read bandwidth (cold, sequential), buffered / O_DIRECT | {disk:.2f} / "
        f"{disk_direct:.2f} GB/s |")
  print(f"| memory copy bandwidth | {memory:.2f} GB/s |")
  print(f"| bandwidth bound of one pass (the fastest read, each round) | median "
        f"{bound_s:.1f} s (rounds {', '.join(f'{b:.1f}' for b in bounds)}) |")
  for kind, label in (('direct', 'bare O_DIRECT read'), ('buffered', 'bare buffered read'),
                      ('reader', "the passes' reader alone (2 threads, verifying, no kernel)")):
    print(f"| {label}, each round | {', '.join(f'{r[kind]:.1f}' for r in read_rounds)} s |")
  for p, name, seconds in ((1, 'pass 1: counts, A_j, D', pass1),
                           (2, 'pass 2: Q-Score and baselines', pass2)):
    print(f"| {name} | {seconds:.1f} s, {args.rows / seconds:,.0f} rows/s, "
          f"{size_gb / seconds:.2f} GB/s, **{ratio[p]:.2f}x** the bound of its round (rounds "
          f"{', '.join(f'{t:.1f}' for t in times[p, True])} s) |")
  print(f"| same passes, store in the page cache | pass 1 {warm1:.1f} s "
        f"({args.rows / warm1:,.0f} rows/s), pass 2 {warm2:.1f} s ({args.rows / warm2:,.0f} rows/s) |")
  print(f"| opening the store (sizes, headers; labels and ids verified) | {open_s:.2f} s |")
  print(f"| `verify()`: every checksum, one cold pass | {verify_s:.1f} s, {verify_s / bound_s:.2f}x the bound |")
  for p in (1, 2):
    print(f"| pass {p} cold, checksums verified / not verified (medians of {args.rounds}) | "
          f"{median[p, True]:.2f} s / {median[p, False]:.2f} s: "
          f"{100 * (median[p, True] / median[p, False] - 1):+.1f}% |")
  for p in (1, 2):
    print(f"| pass {p} in the page cache, verified / not verified (medians of {args.rounds}) | "
          f"{warm_median[p, True]:.2f} s / {warm_median[p, False]:.2f} s: "
          f"{100 * (warm_median[p, True] / warm_median[p, False] - 1):+.1f}% |")
  print(f"| peak resident memory | {peak:.2f} GB ({100 * peak / size_gb:.1f}% of the store) |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  if not args.keep:
    shutil.rmtree(root)


if __name__ == '__main__':
  main()

"""What every benchmark needs: the machine it ran on (lscpu's fields), a median timing, a
JSON result file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable


def lscpu() -> dict[str, str]:
  """``lscpu``'s fields (``{'Model name': ..., 'CPU family': ..., ...}``); empty if it fails."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return {}
  return {key.strip(): value.strip() for key, _, value in
          (line.partition(':') for line in out.splitlines()) if value}


def cpu_name() -> str:
  """The CPU's model name with its family and model numbers (e.g. ``AMD EPYC (family 25
  model 1)``): a benchmark table names the CPU its ratios were measured on."""
  fields = lscpu()
  name = fields.get('Model name') or platform.processor() or platform.machine() or 'unknown'
  if 'CPU family' in fields and 'Model' in fields:
    name += f" (family {fields['CPU family']} model {fields['Model']})"
  return name


# The instruction-set features that change what the tables measure (vector width,
# bfloat16 arithmetic, matrix units), in the order a table names them.
NOTED_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16',
               'amx_int8')


def cpu_flag_summary() -> str:
  """The cores and :data:`NOTED_FLAGS` of this CPU, e.g. ``2 cores; avx2, fma, avx512f``."""
  flags = set(lscpu().get('Flags', '').split())
  present = [flag for flag in NOTED_FLAGS if flag in flags]
  return f"{os.cpu_count()} cores; {', '.join(present) or 'none of ' + ', '.join(NOTED_FLAGS)}"


def median_seconds(fn: Callable[[], object], rounds: int, warmup: int = 0) -> float:
  """The median wall time of ``rounds`` calls of ``fn`` after ``warmup`` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def write_json(path: str, result: object) -> None:
  """Writes a benchmark's ``result`` to ``path`` (its folder created), indented."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)

#!/usr/bin/env bash
# Reruns every benchmark of benchmarks/README.md on this machine, one after another, into a
# new folder benchmarks/results/runs/<date>-<time>-<cpu>/ (one JSON and one log per script,
# lscpu and the package versions beside them), so that two machines compare table by table.
#
#   bash benchmarks/all.sh            # about 80 minutes on 2 cores; ~9 GB of scratch disk
#
# Run it on an otherwise idle machine (the tables are ratios measured side by side, but a
# second job skews them). QSCORE_BENCH_SCRATCH sets the scratch folder (default: a new
# temporary folder, removed afterwards); QSCORE_BENCH_ONLY="name name" runs only those.
# It refuses to write into an existing run folder, and deletes only its own scratch folder.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python}
cpu=$(lscpu | sed -n 's/^Model name: *//p' | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
out="results/runs/$(date +%Y-%m-%d-%H%M%S)-${cpu:-unknown-cpu}"
if [ -e "$out" ]; then echo "all.sh: $out already exists; not overwriting it" >&2; exit 2; fi
mkdir -p "$out"
if [ -n "${QSCORE_BENCH_SCRATCH:-}" ]; then
  scratch=$QSCORE_BENCH_SCRATCH; mkdir -p "$scratch"
else
  scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
fi
lscpu > "$out/lscpu.txt"
"$python" -m pip freeze > "$out/versions.txt" 2>/dev/null || true

run() {  # run NAME SCRIPT [ARGS...]: writes $out/NAME.json and $out/NAME.log
  local name=$1; shift
  if [ -n "${QSCORE_BENCH_ONLY:-}" ] && [[ " $QSCORE_BENCH_ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$python" "$@" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
  echo "$name $((SECONDS - start)) s" | tee -a "$out/durations.txt"
}

run demo_time demo_time.py --rounds 3                              # ~3 min
run embedding_throughput embedding_throughput.py                   # ~10 min
run input_pipeline input_pipeline.py                               # ~6 min
# A new folder of its own: streaming_stats.py removes the store it writes there.
run streaming_stats streaming_stats.py --dir "$(mktemp -d "$scratch/streaming_stats.XXXXXX")" --rounds 3  # ~8 min
run train_step train_step.py                                       # ~12 min
run bfloat16_effect bfloat16_effect.py                             # ~5 min
run bfloat16_cpu bfloat16_cpu.py                                   # ~10 min
run bfloat16_cpu_vit bfloat16_cpu.py --archs vit_small             # ~8 min
run cpu_conv_layers cpu_conv_layers.py                             # ~2 min
run conv_gradients conv_gradients.py                               # ~1 min
run step_overlap step_overlap.py                                   # ~2 min
run accelerator accelerator.py                                     # ~2 min on a CPU
echo "all.sh: results in benchmarks/$out"

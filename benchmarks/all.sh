#!/usr/bin/env bash
# Reruns every benchmark of benchmarks/README.md on this machine, one after another, into a
# new folder benchmarks/results/all/<date>-<time>-<cpu>/ (one JSON and one log per script,
# lscpu and the package versions beside them), so that two machines compare table by table.
#
#   bash benchmarks/all.sh            # 31 minutes on the 2-core Xeon of the README; ~9 GB of scratch disk
#
# Run it on an otherwise idle machine (the tables are ratios measured side by side, but a
# second job skews them). QSCORE_BENCH_SCRATCH sets the scratch folder (default: a new
# temporary folder, removed afterwards); QSCORE_BENCH_ONLY="name name" runs only those.
# It refuses to write into an existing run folder, and deletes only its own scratch folder.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python}
cpu=$(lscpu | sed -n 's/^Model name: *//p' | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
out="results/all/$(date +%Y-%m-%d-%H%M%S)-${cpu:-unknown-cpu}"
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
  local start=$SECONDS status=0
  "$python" "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1 || status=$?
  tail -n 25 "$out/$name.log"
  if [ "$status" -ne 0 ]; then failed+=("$name"); fi
  echo "$name $((SECONDS - start)) s, exit status $status" | tee -a "$out/durations.txt"
}
failed=()

run demo_time demo_time.py --rounds 3  # 120 s
run embedding_throughput embedding_throughput.py  # 461 s
run input_pipeline input_pipeline.py  # 262 s
# A new folder of its own: streaming_stats.py removes the store it writes there.
run streaming_stats streaming_stats.py --dir "$(mktemp -d "$scratch/streaming_stats.XXXXXX")" --rounds 3  # 274 s
run train_step train_step.py  # 200 s
run bfloat16_effect bfloat16_effect.py  # 102 s
run bfloat16_cpu bfloat16_cpu.py  # 106 s
run bfloat16_cpu_vit bfloat16_cpu.py --archs vit_small  # 81 s
run cpu_conv_layers cpu_conv_layers.py  # 17 s
run conv_gradients conv_gradients.py  # 55 s
run step_overlap step_overlap.py  # 151 s
run accelerator accelerator.py  # 85 s
echo "all.sh: results in benchmarks/$out ($((SECONDS / 60)) minutes)"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "all.sh: these benchmarks failed (their logs say why): ${failed[*]}" >&2
  exit 1
fi

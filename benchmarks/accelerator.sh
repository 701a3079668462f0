#!/usr/bin/env bash
# The device run of issue 19: every figure of benchmarks/accelerator.py on this backend (under 8 minutes on one GPU).
cd "$(dirname "$0")" && python accelerator.py --out "results/accelerator_$(python -c "import jax; print(jax.devices()[0].platform)").json" "$@"

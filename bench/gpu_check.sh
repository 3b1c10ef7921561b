#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, build vsd_ext._C with every core, run the CUDA
# tests and the CUDA benchmarks, and print one table. Sized to finish in under 8 minutes on an
# H200. Uses the python3 that already holds torch there (no installs; nothing is downloaded).
#
#   bash bench/gpu_check.sh            # writes build.log, tests.log, bench.json, summary.txt to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} VSD_EXT_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }

status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "build (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if ! timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -cE "^\[[0-9]+/[0-9]+\]" "$OUT/build.log" | sed 's/^/compile steps: /'
$PY -c "import json, vsd_ext; print(json.dumps(vsd_ext.build_info()))" || exit 1

step "CUDA tests"
timeout 240 $PY -m pytest tests -q -x -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "CUDA benchmarks"
timeout 200 $PY -m pytest bench --benchmark-only -q -k cuda -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-max-time=0.2 --benchmark-min-rounds=5 \
  > "$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; status=1; }

step "summary"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
[ -f "$OUT/bench.json" ] && $PY bench/summary.py "$OUT/bench.json" | tee "$OUT/summary.txt"
exit $status

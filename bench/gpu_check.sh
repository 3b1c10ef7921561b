#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (sized for an H200 with 16 cores), build
# vsd_ext._C, run each op's CUDA tests in its own process, a compute-sanitizer pass (memcheck and
# racecheck) on tiny shapes, and the CUDA benchmarks; print the benchmark table with each
# kernel's time as a % of its H200 floor, and end with one line: GPU CHECK: PASS or FAIL.
#
#   bash bench/gpu_check.sh              # results in $OUT (default bench/results/gpu)
#   GPU_CHECK_SO=PATH bash bench/gpu_check.sh
#                                        # reuse the _C*.so (or .so.gz) a previous run left in
#                                        # $OUT: no build
#   bash bench/gpu_check.sh --budget     # print the sum of the step timeouts and exit
#
# Preflight (before any build, seconds): nvidia-smi, a CUDA device torch can see, nvcc, pytest and
# pytest-benchmark; without a GPU it exits 1 at once, naming what is missing. After the build:
# build_info() must say with_cuda and list sm_90 (9.0). Every step runs under its own timeout;
# they add up to at most 540 s (a device run gets 600 s per command). Tests run with --maxfail
# and a per-test timeout (pytest-timeout when installed; else the step's timeout per process).
# Uses the python3 that holds torch there (no installs; nothing is downloaded).
#
# $OUT gets five files (a device run returns at most 8): gpu_check.log (this output), the built
# _C*.so (debug info stripped; gzipped if still over 15 MB), summary.txt, bench.json (every
# benchmark) and logs.tar.gz (the build, test, sanitizer and benchmark logs). To reuse the build
# on a fresh machine: copy the .so into a folder of the repository that git ignores, carry that
# folder along, and set GPU_CHECK_SO to the file.
set -uo pipefail
cd "$(dirname "$0")/.."

# Step timeouts in seconds; budget() is their sum.
T_SMI=5 T_PREFLIGHT=20 T_BUILD=150 T_IMPORT=10 T_TESTS=40 T_SANITIZE=35 T_BENCH=50 T_SUMMARY=10
OPS=(tree_attention verify_tree weighted_ce)
budget() {
  echo $((T_SMI + T_PREFLIGHT + T_BUILD + T_IMPORT + ${#OPS[@]} * (T_TESTS + T_BENCH) \
          + 2 * T_SANITIZE + T_SUMMARY))
}
if [ "${1:-}" = "--budget" ]; then budget; exit 0; fi

OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} VSD_EXT_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }

failed=()
step() { echo; echo "=== $1 ($(date +%T))"; }
fail() { echo "FAIL: $1"; failed+=("$1"); }
why() { [ "$1" -eq 124 ] && echo "rc $1: timeout" || echo "rc $1"; }
finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2> /dev/null && rm -rf "$LOGS"
  echo
  if [ ${#failed[@]} -eq 0 ]; then echo "GPU CHECK: PASS"; exit 0; fi
  echo "GPU CHECK: FAIL (${failed[*]})"
  exit 1
}
abort() { echo "gpu_check: $1"; fail "$2"; finish; }

# ---- preflight: seconds, before any build ---------------------------------------------------
step "preflight"
command -v nvidia-smi > /dev/null \
  || abort "no NVIDIA GPU on this machine (nvidia-smi not found); this check needs a CUDA GPU" \
           "preflight: no GPU"
timeout "$T_SMI" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || abort "no NVIDIA GPU answers (nvidia-smi failed); this check needs a CUDA GPU" \
           "preflight: no GPU"
timeout "$T_PREFLIGHT" "$PY" - <<'EOF' || abort "preflight failed (above)" "preflight"
import importlib.util, sys
try:
    import torch
except ImportError:
    sys.exit("no torch for this python")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available())")
missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing python packages: {', '.join(missing)}")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
      f"pytest-timeout: {importlib.util.find_spec('pytest_timeout') is not None}")
EOF
if [ -z "${GPU_CHECK_SO:-}" ] && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] \
   && ! command -v nvcc > /dev/null; then
  abort "no nvcc (set CUDA_HOME) to build the CUDA kernels" "preflight: no nvcc"
fi

# ---- build (or reuse), then check what was built ----------------------------------------------
if [ -n "${GPU_CHECK_SO:-}" ]; then
  step "reuse $GPU_CHECK_SO (no build)"
  name=$(basename "${GPU_CHECK_SO%.gz}")
  if [[ $GPU_CHECK_SO == *.gz ]]; then gunzip -c "$GPU_CHECK_SO" > "vsd_ext/$name"
  else cp "$GPU_CHECK_SO" "vsd_ext/$name"; fi || abort "cannot use $GPU_CHECK_SO" "reuse"
else
  step "build (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
  if ! timeout "$T_BUILD" "$PY" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log"; abort "the build failed or ran past ${T_BUILD}s" "build"
  fi
  grep -cE "^\[[0-9]+/[0-9]+\]" "$LOGS/build.log" | sed 's/^/compile steps: /'
  for so in vsd_ext/_C*.so; do  # for a rerun; a device run returns files up to 16 MB
    dst="$OUT/$(basename "$so")"
    strip --strip-debug -o "$dst" "$so" 2> /dev/null || cp "$so" "$dst"
    [ "$(stat -c %s "$dst")" -le 15000000 ] || gzip -f "$dst"
  done
  ls -l "$OUT"/_C*
fi
timeout "$T_IMPORT" "$PY" - <<'EOF' || abort "the extension is not a CUDA build for sm_90" "build info"
import json, sys
import vsd_ext
info = vsd_ext.build_info()
print(json.dumps(info))
if not info["with_cuda"] or "9.0" not in info["cuda_archs"]:
    sys.exit(f"with_cuda = {info['with_cuda']}, cuda_archs = {info['cuda_archs']}: want sm_90")
EOF

# ---- each op's CUDA tests, one process per op (a kernel fault cannot poison the others) -------
per_test=()
"$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=$((T_TESTS / 2)))
for op in "${OPS[@]}"; do
  step "CUDA tests: $op"
  timeout "$T_TESTS" "$PY" -m pytest "tests/test_$op.py" --cuda-only -q -p no:cacheprovider \
    --maxfail=5 "${per_test[@]}" > "$LOGS/tests_$op.log" 2>&1
  rc=$?
  tail -15 "$LOGS/tests_$op.log"
  [ $rc -eq 0 ] || fail "tests $op ($(why $rc))"
done

# ---- compute-sanitizer on tiny shapes (no caching allocator: every buffer its own allocation) -
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  if [ ! -x "$sanitizer" ]; then fail "sanitizer: compute-sanitizer not found"; continue; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$T_SANITIZE" "$sanitizer" --tool "$tool" \
    --error-exitcode 3 "$PY" bench/sanitize_ops.py > "$LOGS/sanitize_$tool.log" 2>&1
  rc=$?
  tail -8 "$LOGS/sanitize_$tool.log"
  [ $rc -eq 0 ] || fail "sanitizer $tool ($(why $rc))"
done

# ---- CUDA benchmarks, one process per op; the table as % of the H200 floor --------------------
for op in "${OPS[@]}"; do
  step "CUDA benchmarks: $op"
  timeout "$T_BENCH" "$PY" -m pytest "bench/bench_$op.py" --benchmark-only -q -k cuda \
    -p no:cacheprovider --benchmark-json="$LOGS/bench_$op.json" > "$LOGS/bench_$op.log" 2>&1
  rc=$?
  tail -3 "$LOGS/bench_$op.log"
  [ $rc -eq 0 ] || fail "bench $op ($(why $rc))"
done
step "summary"
jsons=("$LOGS"/bench_*.json)
if [ -s "${jsons[0]}" ]; then
  timeout "$T_SUMMARY" "$PY" bench/summary.py "${jsons[@]}" --merged "$OUT/bench.json" \
    | tee "$OUT/summary.txt"
else
  fail "no benchmark results"
fi
finish

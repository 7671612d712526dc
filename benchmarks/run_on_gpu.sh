#!/usr/bin/env bash
# The GPU checks as one resumable script: CUDA tests, then gpu_bench.py point by point.
#
#   bash benchmarks/run_on_gpu.sh                 # on a machine with a CUDA GPU and this repo's deps
#   BENCH_SECONDS=400 ARCHS=llava,saisa COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/run_on_gpu.sh
#   SKIP_CUDA_TESTS=1 bash benchmarks/run_on_gpu.sh --eager    # extra arguments go to gpu_bench.py
#
# Every benchmark point is saved when done (results/gpu/<device>/points/, the sweep's point store), and
# gpu_bench.py --resume keeps the points this code finished on this device with the same settings, so when
# the time limit stops it, running the script again (with the results folder carried over) continues where
# it stopped. A copy without .git names its code with COMMIT=<sha> (points of another commit are measured
# again). When $OUT is set (the device tool's output folder), the test log and the results folder are
# copied there.
set -uo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1 || python -m pip install -q -e . --no-deps
log_dir=${OUT:-results/gpu}
mkdir -p "$log_dir"

if [ -z "${SKIP_CUDA_TESTS:-}" ]; then  # set it on a second run, once the tests have passed
  python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25 | tee "$log_dir/cuda_tests.log"
fi

args=(--resume)
if [ -n "${ARCHS:-}" ]; then args+=(--archs "$ARCHS"); fi
if [ -n "${VISUAL_TOKENS:-}" ]; then args+=(--visual-tokens "$VISUAL_TOKENS"); fi
if [ -n "${COMMIT:-}" ]; then args+=(--commit "$COMMIT"); fi
timeout "${BENCH_SECONDS:-480}" python benchmarks/gpu_bench.py "${args[@]}" "$@"
status=$?
if [ "$status" -eq 124 ]; then echo "gpu_bench stopped by the time limit: run again to continue"; fi

if [ -n "${OUT:-}" ]; then cp -r results/gpu "$OUT/"; fi
exit "$status"

#!/usr/bin/env bash
# One device call: install, build, check against float64, benchmark (see NOTES/perf-marlin.md).
#   bash benchmarks/marlin/run_h100.sh    (writes logs under $OUT; any Hopper GPU)
# A quantized stories260K checkpoint in .cache/s260k (carried) is explained at the end.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/marlin-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export GPTQ_MARLIN_BUILD_DIR=$PWD/.marlin_build  # the build_dir option's fallback
step() { echo "=== $* ($(date +%T))"; }
step install
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends -e backend_marlin -e conformance_tests 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader
step build
python3 -m gptq_backend_marlin.build 2>&1 | tail -20
gptq backends list > "$OUT/backends_list.txt" 2>&1; grep -E "^marlin|^triton" "$OUT/backends_list.txt"
step check
timeout ${CHECK_TIMEOUT:-300} python3 benchmarks/marlin/h200_check.py --parts sweep,capture,timing,overhead,extras --build-dir "$GPTQ_MARLIN_BUILD_DIR" --out "$OUT" > "$OUT/check.log" 2>&1; rc=$?; echo "rc=$rc"; tail -40 "$OUT/check.log"
step bench
(cd benchmarks/marlin && timeout ${BENCH_TIMEOUT:-150} python3 bench_marlin.py --out "$OUT" --triton-budget 30 > "$OUT/bench.log" 2>&1; echo "rc=$?")
grep -vE "^ *(4096x11008|11008x4096|14336x4096|28672x8192)" "$OUT/bench.log" | grep -E "M=(1|16|64|128|256|1024|4096) |marlin vs|shape|x[0-9]+ +[0-9.]+ \[|speedup|^#" | cut -c1-230 | tail -60
step conformance
timeout ${CONF_TIMEOUT:-60} python3 -m pytest -q -x -p no:cacheprovider --pyargs gptq_conformance --gptq-backend=marlin > "$OUT/conformance.log" 2>&1; echo "rc=$?"; tail -6 "$OUT/conformance.log"
step explain stories260K
timeout 30 gptq backends explain .cache/s260k > "$OUT/explain.txt" 2>&1; echo "rc=$?"; head -12 "$OUT/explain.txt"
step done

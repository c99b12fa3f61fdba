#!/usr/bin/env bash
# One device call: install, build, check against float64, benchmark (see NOTES/perf-marlin.md).
#   bash backend_marlin/benchmarks/run_h100.sh [--quick]    (writes logs under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/marlin-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export GPTQ_MARLIN_BUILD_DIR=$PWD/.marlin_build
step() { echo "=== $* ($(date +%T))"; }
step install
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends -e backend_marlin -e conformance_tests 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
step build
python3 -m gptq_backend_marlin.build 2>&1 | tail -20
gptq backends list 2>&1 | tee "$OUT/backends_list.txt"
step check
timeout ${CHECK_TIMEOUT:-120} python3 backend_marlin/benchmarks/h100_check.py ${CHECK_ARGS:-} 2>&1 | tee "$OUT/check.log" | tail -70
step bench
(cd backend_marlin/benchmarks && timeout ${BENCH_TIMEOUT:-170} python3 bench_marlin.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -80)
step conformance
timeout ${CONF_TIMEOUT:-45} python3 -m pytest -q -x -p no:cacheprovider --pyargs gptq_conformance --gptq-backend=marlin 2>&1 | tail -25 | tee "$OUT/conformance.log"
step stories260K
timeout ${S260_TIMEOUT:-40} bash -c 'gptq quantize gptq_core/data/stories260K /tmp/s260k --calibration gptq_core/data/text/tinystories-sample.txt --nsamples 8 --seqlen 128 --device cuda --overwrite >/dev/null 2>&1 && gptq backends explain /tmp/s260k' 2>&1 | tail -40 | tee "$OUT/explain.txt"
step done

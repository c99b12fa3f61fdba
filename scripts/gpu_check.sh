#!/usr/bin/env bash
# GPU check: install every distribution, run the conformance suite for each GPU backend, then
# `gptq bench` (4-bit g128 on every shape; 2/3/8-bit and act-order on fewer), leaving logs,
# CSV files and the plot in one folder: $GPU_CHECK_DIR, else $OUT (the device machine's
# output folder), else ./gpu_check_out. At most 8 files are written there:
#   summary.txt        what ran, exit codes, and every benchmark table
#   log.txt            full output of every step
#   bench-4bit.csv/.json/.png   the main benchmark (4-bit g128 sym, fp16)
#   bench-more.csv     2/3/8-bit and act-order
#   triton-tuned.json  the triton backend's tuned configurations for this GPU
#
# Knobs (environment):
#   GPU_CHECK_ONLY=triton,torch   load only these backends (others hidden via GPTQ_DISABLED_BACKENDS)
#   GPU_CHECK_CONFORMANCE=a,b     backends to run the conformance suite on (default: every
#                                 backend usable on this GPU except the torch reference)
#   GPU_CHECK_QUICK=1             the conformance suite's quick case set
#   GPU_CHECK_STEPS="install build precompile marlincheck tests models conformance bench4 benchmore"  (run in the
#                                 order given; a subset runs only those steps)
#   GPU_CHECK_WORKERS=8           pytest-xdist workers / compile processes
#   GPU_CHECK_SHAPES_MORE, GPU_CHECK_M_MORE   shapes and M values of the smaller benchmarks
#   GPU_CHECK_BENCH_ARGS="--seconds 0.02"     extra arguments for every `gptq bench`
#   GPU_CHECK_TIMEOUT_<STEP>=seconds          per-step limits, e.g. GPU_CHECK_TIMEOUT_BENCH4
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
WORKERS=${GPU_CHECK_WORKERS:-8}
STEPS=${GPU_CHECK_STEPS:-install build precompile marlincheck tests models conformance bench4 benchmore}
SHAPES_MORE=${GPU_CHECK_SHAPES_MORE:-4096x4096,8192x28672}
M_MORE=${GPU_CHECK_M_MORE:-1,16,64,256,4096}
export PYTHONUNBUFFERED=1
# Scratch (per-run CSVs and tables, tuner cache) stays outside $DIR: only 8 files come back.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export GPTQ_TRITON_CACHE_DIR="$SCRATCH/tune"
SUMMARY="$DIR/summary.txt"
LOG="$DIR/log.txt"
: >"$SUMMARY"
: >"$LOG"
FAILED=0

say() { echo "== $(date +%T) $*" | tee -a "$SUMMARY" | tee -a "$LOG"; }

# step NAME DEFAULT_TIMEOUT CMD...: run with a time limit, full output to log.txt
step() {
    local name=$1 limit=$2
    shift 2
    local var="GPU_CHECK_TIMEOUT_${name^^}"
    var=${var//-/_}
    limit=${!var:-$limit}
    say "$name: $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    say "$name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || FAILED=1
    return "$rc"
}


say "gpu_check in $DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    >>"$SUMMARY" 2>&1 || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    >>"$SUMMARY" 2>&1 || true





# bench NAME CSV TABLE EXTRA-ARGS...: the table (stdout) to TABLE, progress (stderr) to log.txt
bench() {
    local name=$1 csv=$2 table=$3
    shift 3
    local var="GPU_CHECK_TIMEOUT_${name^^}"
    var=${var//-/_}
    local limit=${!var:-900}
    say "$name: gptq bench $* (limit ${limit}s)"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    timeout "$limit" $PY -m gptq_core bench --csv "$csv" "$@" ${GPU_CHECK_BENCH_ARGS:-} \
        >"$table" 2>>"$LOG"
    local rc=$?
    say "$name: exit $rc after $((SECONDS - t0))s"
    { echo; cat "$table"; } | tee -a "$LOG" >>"$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
    save_tuned
}

# the triton backend's tuned configurations, kept after every benchmark (a later step may be cut)
save_tuned() {
    local tuned
    tuned=$(ls "$GPTQ_TRITON_CACHE_DIR"/*.json 2>/dev/null | head -n 1)
    [ -n "$tuned" ] && cp "$tuned" "$DIR/triton-tuned.json"
    return 0
}


do_install() {
    local dists
    dists=$(grep -v '^\s*#' scripts/distributions.txt | sed '/^\s*$/d')
    if [ -d conformance_tests ] && ! grep -qx 'conformance_tests' scripts/distributions.txt; then
        dists="$dists conformance_tests"
    fi
    # shellcheck disable=SC2046
    step install 300 $PY -m pip install -q --no-deps --no-build-isolation $(printf -- '-e %s ' $dists)
}

do_precompile() {
    $PY -c "import triton" 2>/dev/null || { say "precompile: no triton, skipped"; return 0; }
    step precompile 300 $PY benchmarks/triton_precompile.py --bits 4,2,3,8 --act-order both \
        --workers "$WORKERS"
}

# Marlin's CUDA extension, built ahead so no benchmark or test pays for the JIT build.
do_build() {
    $PY -c "import gptq_backend_marlin" 2>/dev/null || { say "build: no marlin, skipped"; return 0; }
    export GPTQ_MARLIN_BUILD_DIR=${GPTQ_MARLIN_BUILD_DIR:-$PWD/.cache/marlin_build}
    step build 300 $PY -m gptq_backend_marlin.build
}

# Marlin's own float64 sweep (bits from GPU_CHECK_MARLIN_BITS, default "4 8").
do_marlincheck() {
    $PY -c "import gptq_backend_marlin" 2>/dev/null || { say "marlincheck: no marlin, skipped"; return 0; }
    local b
    for b in ${GPU_CHECK_MARLIN_BITS:-4 8}; do
        step "marlincheck-$b" 300 $PY backend_marlin/benchmarks/h100_check.py --bits "$b" --quick
    done
}

# The real stories260K model on the GPU: quantize (4-bit g32, and 8-bit g32 act-order), then
# say which backend serves each layer, generate, and score text on every usable backend.
do_models() {
    local data=gptq_core/data text=gptq_core/data/text/tinystories-sample.txt spec name dir be
    for spec in "w4g32:--bits 4 --group-size 32" "w8g32act:--bits 8 --group-size 32 --desc-act"; do
        name=${spec%%:*}
        dir=$SCRATCH/s260k-$name
        # shellcheck disable=SC2086
        step "quantize-$name" 120 $PY -m gptq_core quantize "$data/stories260K" "$dir" \
            --calibration "$text" ${spec#*:} --nsamples 32 --seqlen 256 --device "${GPU_CHECK_DEVICE:-cuda}" --no-progress \
            || continue
        say "explain-$name: layers per backend"
        $PY -m gptq_core backends explain "$dir" --json 2>>"$LOG" | $PY -c '
import collections, json, re, sys
rows = json.load(sys.stdin)
shape = lambda spec: re.search(r"K=\d+ N=\d+", spec).group(0)
for (b, s), n in sorted(collections.Counter((r["backend"], shape(r["spec"])) for r in rows).items()):
    print(f"  {n:3d} layers {s:12s} -> {b}")' | tee -a "$LOG" >>"$SUMMARY"
        step "generate-$name" 60 $PY -m gptq_core generate "$dir" --prompt "Once upon a time" \
            --max-new-tokens 32 --device "${GPU_CHECK_DEVICE:-cuda}"
        tail -n 2 "$LOG" | head -n 1 | sed 's/^/  /' >>"$SUMMARY"
        for be in auto torch; do
            step "eval-$name-$be" 60 $PY -m gptq_core eval "$dir" --text "$text" \
                --max-tokens 8192 --backend "$be" --device "${GPU_CHECK_DEVICE:-cuda}"
            tail -n 2 "$LOG" | head -n 1 | sed "s/^/  backend $be: /" >>"$SUMMARY"
        done
    done
}

do_tests() {
    GPTQ_TRITON_AUTOTUNE=0 step tests 600 $PY -m pytest -q -n "$WORKERS" -p no:cacheprovider \
        tests/test_triton_backend.py
}

do_conformance() {
    local names quick="" name
    if [ -n "${GPU_CHECK_CONFORMANCE:-}" ]; then
        names=${GPU_CHECK_CONFORMANCE//,/ }
    else  # every backend usable here, except the torch reference
        names=$($PY -c '
import json, subprocess, sys
out = subprocess.run([sys.executable, "-m", "gptq_core", "backends", "list", "--json"],
                     capture_output=True, text=True).stdout
print(" ".join(r["name"] for r in json.loads(out)
               if r["status"] == "available" and r["name"] != "torch"))')
    fi
    [ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick="--gptq-quick"
    for name in $names; do
        GPTQ_TRITON_AUTOTUNE=0 step "conformance-$name" 900 $PY -m pytest -q -n "$WORKERS" \
            -p no:cacheprovider --pyargs gptq_conformance --gptq-backend="$name" $quick
    done
}

do_bench4() {
    bench bench4 "$DIR/bench-4bit.csv" "$SCRATCH/4bit.txt" --bits 4 --group-size 128 \
        --json "$DIR/bench-4bit.json" --plot "$DIR/bench-4bit.png"
}

do_benchmore() {
    local b f first=1
    bench bench-act "$SCRATCH/act.csv" "$SCRATCH/act.txt" --bits 4 --act-order \
        --shapes "$SHAPES_MORE" --m "$M_MORE"
    for b in 2 3 8; do
        bench "bench-${b}bit" "$SCRATCH/b$b.csv" "$SCRATCH/b$b.txt" --bits "$b" \
            --shapes "$SHAPES_MORE" --m "$M_MORE"
    done
    # one CSV: the first file's header, then every file's rows
    for f in "$SCRATCH"/act.csv "$SCRATCH"/b2.csv "$SCRATCH"/b3.csv "$SCRATCH"/b8.csv; do
        [ -f "$f" ] || continue
        if [ $first = 1 ]; then cat "$f"; first=0; else tail -n +2 "$f"; fi
    done >"$DIR/bench-more.csv"
}

# After installing: hide every backend not in GPU_CHECK_ONLY, then list what is left.
setup_backends() {
    if [ -n "${GPU_CHECK_ONLY:-}" ]; then
        GPTQ_DISABLED_BACKENDS=$($PY -c '
import sys
from importlib.metadata import entry_points
keep = set(sys.argv[1].split(","))
print(",".join(sorted(e.name for e in entry_points(group="gptq.backends") if e.name not in keep)))
' "$GPU_CHECK_ONLY")
        export GPTQ_DISABLED_BACKENDS
        say "backends hidden: ${GPTQ_DISABLED_BACKENDS:-none}"
    fi
    $PY -m gptq_core backends list >>"$SUMMARY" 2>&1
}

[[ " $STEPS " == *" install "* ]] || setup_backends
for s in $STEPS; do
    if declare -F "do_$s" >/dev/null; then "do_$s"; else say "unknown step '$s'"; FAILED=1; fi
    [ "$s" = install ] && setup_backends
done
say "gpu_check done: $([ $FAILED = 0 ] && echo all steps passed || echo SOME STEPS FAILED)"
exit $FAILED

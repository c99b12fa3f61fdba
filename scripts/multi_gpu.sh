#!/usr/bin/env bash
# Multi-GPU check on an NVIDIA machine of several GPUs (issue 18): install every distribution
# editable, build the marlin extension, then the steps named on the command line, each under
# its own time limit (scripts/lib_steps.sh).
#
#   bash scripts/multi_gpu.sh STEP...        e.g.  decode quantize
#
# Steps (each prints a short table; the full output goes to log.txt):
#   decode    gptq bench generate --synthetic llama-3-70b-layers --layers $DECODE_LAYERS (default
#             16: Llama-3-70B's layer shapes, fewer layers, so the float model fits one GPU for
#             the comparison) --device-map auto, first on every GPU (decode-all.json),
#             then on GPU 0 alone (CUDA_VISIBLE_DEVICES=0, decode-gpu0.json; the pair reused); then
#             each model x mode x batch: ms/step on all GPUs against one GPU, and against the
#             single-GPU per-layer time sum (the target: within 10%, i.e. <= 1.10x).
#             decode-all / decode-one run one half (for two short calls on one warm machine: the
#             JSON files are kept in $WORK too, and the call that finds both compares them)
#   quantize  benchmarks/quantize_parallel.py --layers 4 --devices cuda:0,...,cuda:N-1 (quantizer
#             speed on one device against all of them; quantize-parallel.json)
# Knobs: DECODE_LAYERS, DECODE_BATCH (1,8), DECODE_MODES (eager,fast), DECODE_NEW_TOKENS (64),
# LIMIT_<STEP>=S (e.g. LIMIT_DECODE_ALL=300), SKIP_INSTALL=1 / SKIP_BUILD=1 (a machine already set
# up), WORK (where the synthetic pair is built and reused; default /dev/shm/gptq-multi-gpu).
# Results land in $OUT (the device machine's output folder), else ./multi_gpu_out: summary.txt,
# log.txt and the JSON files the steps write.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_steps.sh
steps_init

GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DEVICES=$( [ "$GPUS" -gt 0 ] && seq -s, -f "cuda:%g" 0 $((GPUS - 1)) )
nvidia-smi --query-gpu=index,name,memory.total --format=csv >>"$SUMMARY" 2>&1
say "$GPUS GPU(s): $DEVICES"
[ "${SKIP_INSTALL:-0}" = 1 ] || install_distributions
export GPTQ_MARLIN_BUILD_DIR=${GPTQ_MARLIN_BUILD_DIR:-/tmp/gptq-marlin-build}
[ "${SKIP_BUILD:-0}" = 1 ] || step build 240 $PY -m gptq_backend_marlin.build
WORK=${WORK:-/dev/shm/gptq-multi-gpu}

# decode_bench NAME JSON_NAME [ENV=VALUE...]: bench generate of the 70B-shaped pair, device map auto
decode_bench() {
    local name=$1 json=$2
    shift 2
    step "$name" 300 env "$@" $PY -m gptq_core bench generate --synthetic llama-3-70b-layers \
        --layers "${DECODE_LAYERS:-16}" --device-map auto --batch "${DECODE_BATCH:-1,8}" \
        --modes "${DECODE_MODES:-eager,fast}" --new-tokens "${DECODE_NEW_TOKENS:-64}" --prompt-len 32 \
        --work-dir "$WORK" --json "$OUT/$json"
    [ -f "$OUT/$json" ] && cp "$OUT/$json" "$WORK/$json"  # kept for a later call's comparison
}

# compare_decode ALL_JSON ONE_JSON: ms/step on every GPU against GPU 0 alone and the layer sum
compare_decode() {
    $PY - "$1" "$2" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
rows = [{(r["model"], r["mode"], r["batch"]): r for r in json.load(open(p))["rows"]} for p in sys.argv[1:]]
print("model      mode   batch  all GPUs ms/step  GPU 0 ms/step  all/one  all/layer sum (target <= 1.10)")
for key, r in rows[0].items():
    one = rows[1].get(key, {}).get("ms_per_step")
    ratio = r["ms_per_step"] / one if r.get("ms_per_step") and one else None
    fmt = lambda v, width: "-".rjust(width) if v is None else format(v, f"{width}.2f")
    print(f"{key[0]:<10} {key[1]:<6} {key[2]:>5}  {fmt(r.get('ms_per_step'), 16)}  {fmt(one, 13)}"
          f"  {fmt(ratio, 7)}  {fmt(r.get('layer_sum_ratio'), 13)}")
PYEOF
}

for name in "$@"; do
    case $name in
        decode|decode-all|decode-one)
            [ "$name" = decode-one ] || decode_bench decode-all decode-all.json
            [ "$name" = decode-all ] || decode_bench decode-one decode-gpu0.json CUDA_VISIBLE_DEVICES=0
            if [ -f "$WORK/decode-all.json" ] && [ -f "$WORK/decode-gpu0.json" ]; then
                compare_decode "$WORK/decode-all.json" "$WORK/decode-gpu0.json" || status=1
            elif [ "$name" = decode ]; then
                say "decode: a JSON file is missing, nothing to compare"; status=1
            fi ;;
        quantize)
            if [ -f benchmarks/quantize_parallel.py ]; then
                step quantize 300 $PY benchmarks/quantize_parallel.py --layers 4 --devices "$DEVICES" \
                    --json "$OUT/quantize-parallel.json"
            else
                say "quantize: benchmarks/quantize_parallel.py is not in this tree"; status=1
            fi ;;
        *) say "unknown step '$name'"; status=1 ;;
    esac
done
steps_end

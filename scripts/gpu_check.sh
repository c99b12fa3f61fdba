#!/usr/bin/env bash
# GPU check on an NVIDIA machine: install every distribution editable, build the marlin
# extension (timed), then the steps named on the command line, each under its own time limit,
# so that one call of a lent GPU (10 minutes at most) does a planned set of checks.
#
#   bash scripts/gpu_check.sh STEP...        e.g.  kernels bench  |  generate fusion explain
#
# Steps (each prints a short table; the full output goes to log.txt):
#   marlin      benchmarks/marlin/h200_check.py: a timed fresh build, float64 sweep of every
#               reachable kernel kind, CUDA-graph capture, kernel time against fp16,
#               QuantLinear eager overhead
#   triton      benchmarks/triton_h200_check.py: the same for the triton and torch backends
#   bench       gptq bench 4-bit g128 on 4096x4096 and 8192x28672 at M = 1, 16, 64, 256, 4096
#   conformance the conformance suite's quick set (capture cases included) for marlin, triton
#   fusion      benchmarks/fusion_h200_check.py: fused q/k/v and gate/up against unfused
#   explain     tests/test_cli_explain.py's GPU case (7B-wide layers served by GPU backends)
#   training    the conformance suite's backward and opcheck cases (gradients against float64
#               through gptq_core/training.py) for marlin and triton, quick set
#   cuda        the cuda backend: build, the conformance suite (quick)
#   exllama     the exllama backend: build, the conformance suite (quick)
#   kernels     gptq bench of cuda, exllama, marlin and triton at 4/3/2/8 bits (KERNEL_BITS),
#               4096x4096 and 8192x28672, M = 1, 8, 16, 64
#   decode-shapes  gptq bench 4-bit g128 of exllama and marlin (the M <= 8 leaders) on the linears of
#               Llama-2-7B (q/k/v and gate/up fused) and Llama-3-8B at M = 1, 8, 16, 32
#   hopper      benchmarks/hopper_check.py: the sm_90a wgmma kernel against float64, then timed
#               against marlin and fp16 cuBLAS at M = 16..4096 (HOPPER_ARGS=--quick: 13 cases, M 16-128)
#   hopper-conformance  the conformance suite's quick set for marlin on layers the Hopper copy can hold
#               (--gptq-shapes 512x256,1024x384): with the defaults, then every kernel call up to the
#               copy's bound (160 rows on these sizes) forced onto it (hopper_cache_mb, hopper_threshold=0)
#   hopper-bench  gptq bench of marlin without and with Hopper copies (HOPPER_MB, default 1e9 MiB; HOPPER_THRESHOLD
#               and HOPPER_MAX_ROWS set those options) on the Llama-2-7B linears (fused) and 8192x28672, 4096x14336 at M = 16..256
#               (BENCH_SHAPES, BENCH_M)
#   prefill     gptq bench of marlin's policy against its kernels forced up to 4096 rows (dequant_threshold=4096)
#               at M = 128..4096 on the same shapes (BENCH_SHAPES, PREFILL_M), PREFILL_BITS (default 4) bits
#   hopper-gen  gptq bench generate --synthetic llama-2-7b --modes fast, batch GEN_BATCH (default 32,64),
#               marlin without and with Hopper copies
#   gen-backends  gptq bench generate --synthetic GEN_SHAPE (default llama-2-7b) --modes fast --compare-backends
#               (GEN_BACKENDS, default marlin,exllama), batch GEN_BATCH (default 1)
#   act-order   gptq bench 4-bit g128 --act-order (desc_act) of exllama, cuda, marlin, triton at M = 1, 8
#   greedy      benchmarks/backend_greedy_check.py: greedy tokens of marlin, cuda and exllama compared
#               (stories260K and the synthetic 7B 4-bit checkpoints)
#   quantize    benchmarks/quantize_synthetic.py: `gptq quantize` wall time of a synthetic
#               Llama-2-7B shape (QUANTIZE_LAYERS layers, extrapolated to 32), plain and default
#               methods; needs CALIBRATION (default .cache/wikitext2-raw-test.txt, carried)
#   lora        benchmarks/lora_step.py: LoRA step of a Llama-2-7B-shaped 4-bit model against fp16
#   gen-fast    gptq bench generate --synthetic llama-2-7b, batch GEN_BATCH (default 1,8), modes
#               GEN_MODES (default eager,fast); the fast rows carry the replayed step's breakdown
#   gen-static  the same model, batch GEN_STATIC_BATCH (default 1), transformers' static cache + compile
#   rounding    benchmarks/gpu_generate_check.py --rounding-only: greedy tokens of the fast path compiled with
#               inductor's own rounding (eager_rounding=False) against eager, and the step time of it and of
#               the default (emulate_precision_casts)
#   generate    benchmarks/gpu_generate.sh check llama2 (fast path correctness, bench generate)
#   llama3      benchmarks/gpu_generate.sh llama3
# Results land in $OUT (the device machine's output folder), else ./gpu_check_out: summary.txt,
# log.txt and the JSON files the steps write (at most 8 files come back from a lent GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_steps.sh  # say, step (LIMIT_GEN_FAST=200 shortens the gen-fast step), steps_end
steps_init
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$SUMMARY" 2>&1
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >>"$SUMMARY" 2>&1
install_distributions
# One build folder for every step (the marlin option build_dir's environment fallback): the
# marlin step times a fresh build into it, later steps load it.
export GPTQ_MARLIN_BUILD_DIR=${GPTQ_MARLIN_BUILD_DIR:-/tmp/gptq-marlin-build}
WORK=${WORK:-/dev/shm/gptq-gen}
# the Llama-2-7B linears (q/k/v and gate/up fused), 8192x28672 and 4096x14336: hopper-bench and prefill
BENCH_SHAPES=${BENCH_SHAPES:-4096x12288,4096x4096,4096x22016,11008x4096,8192x28672,4096x14336}
case " $* " in *" marlin "*) ;; *) step build 240 $PY -m gptq_backend_marlin.build ;; esac

for name in "$@"; do
    case $name in
        marlin) step marlin 240 $PY benchmarks/marlin/h200_check.py --parts "${MARLIN_PARTS:-build,sweep,timing,overhead,capture}" \
                    --build-dir "$GPTQ_MARLIN_BUILD_DIR" --out "$OUT" ;;
        triton) step triton 200 $PY benchmarks/triton_h200_check.py --out "$OUT" ;;
        bench) step bench 180 $PY -m gptq_core bench --shapes 4096x4096,8192x28672 \
                   --m 1,16,64,256,4096 --bits 4 --group-size 128 --backends marlin,triton \
                   --json "$OUT/bench.json" --quiet ;;
        conformance)
            step conformance-marlin 200 $PY -m pytest -q -x -n 4 --pyargs gptq_conformance --gptq-backend=marlin --gptq-quick
            step conformance-triton 240 $PY -m pytest -q -x -n 4 --pyargs gptq_conformance --gptq-backend=triton --gptq-quick ;;
        fusion) step fusion 180 $PY benchmarks/fusion_h200_check.py --backends marlin,triton ;;
        explain) step explain 150 $PY -m pytest -q -s tests/test_cli_explain.py -k gpu ;;
        training)
            step training-marlin 120 $PY -m pytest -q -x -n 4 --pyargs gptq_conformance --gptq-backend=marlin --gptq-quick --gptq-partial -k "backward or opcheck"
            step training-triton 150 $PY -m pytest -q -x -n 4 --pyargs gptq_conformance --gptq-backend=triton --gptq-quick --gptq-partial -k "backward or opcheck" ;;
        cuda)
            step cuda-build 240 $PY -m gptq_backend_cuda.build
            step conformance-cuda 200 $PY -m pytest -q --maxfail=10 -n 4 --pyargs gptq_conformance --gptq-backend=cuda --gptq-quick ;;
        exllama)
            step exllama-build 180 $PY -m gptq_backend_exllama.build
            step conformance-exllama 150 $PY -m pytest -q --maxfail=10 -n 4 --pyargs gptq_conformance --gptq-backend=exllama --gptq-quick ;;
        kernels)
            for b in ${KERNEL_BITS:-4 3 2 8}; do
                step bench-b$b 100 $PY -m gptq_core bench --shapes 4096x4096,8192x28672 --m 1,8,16,64 \
                    --bits $b --group-size 128 --backends cuda,exllama,marlin,triton --json "$OUT/bench-b$b.json" --quiet
            done ;;
        decode-shapes)
            step exllama-build 180 $PY -m gptq_backend_exllama.build
            step decode-shapes 200 $PY -m gptq_core bench --m 1,8,16,32 --bits 4 --group-size 128 \
                --shapes 4096x12288,4096x4096,4096x22016,11008x4096,4096x6144,4096x28672,14336x4096 \
                --backends exllama,marlin --json "$OUT/bench-decode-shapes.json" --quiet ;;
        hopper) step hopper 300 $PY benchmarks/hopper_check.py ${HOPPER_ARGS:-} --out "$OUT/hopper.txt" ;;
        hopper-conformance)
            step conformance-marlin-wide 200 $PY -m pytest -q --maxfail=10 -n 4 --pyargs gptq_conformance \
                --gptq-backend=marlin --gptq-quick --gptq-shapes 512x256,1024x384
            step hopper-conformance 200 $PY -m pytest -q --maxfail=10 -n 4 --pyargs gptq_conformance \
                --gptq-backend=marlin --gptq-quick --gptq-shapes 512x256,1024x384 \
                --gptq-backend-option hopper_cache_mb=1e9 --gptq-backend-option hopper_threshold=0 ;;
        hopper-bench)
            # without copies, then with them (HOPPER_THRESHOLD=0: every kernel row up to the bound on the copy)
            for mb in 0 "${HOPPER_MB:-1e9}"; do
                step hopper-bench-$mb 150 $PY -m gptq_core bench --m "${BENCH_M:-16,32,48,64,96,128,192,256}" --bits 4 --group-size 128 \
                    --shapes "$BENCH_SHAPES" --backends marlin \
                    --backend-option marlin.hopper_cache_mb=$mb ${HOPPER_THRESHOLD:+--backend-option marlin.hopper_threshold=$HOPPER_THRESHOLD} \
                    ${HOPPER_MAX_ROWS:+--backend-option marlin.hopper_max_rows=$HOPPER_MAX_ROWS} \
                    --json "$OUT/bench-hopper-$mb.json" --quiet
            done ;;
        prefill)
            # marlin's policy (dequantize + cuBLAS above its threshold) against its kernels forced up to 4096 rows
            for t in default 4096; do
                step prefill-$t 150 $PY -m gptq_core bench --m "${PREFILL_M:-128,192,256,384,512,1024,4096}" --bits "${PREFILL_BITS:-4}" --group-size 128 \
                    --shapes "$BENCH_SHAPES" --backends marlin \
                    $([ $t = default ] || echo --backend-option marlin.dequant_threshold=$t) --json "$OUT/bench-prefill-${PREFILL_BITS:-4}bit-$t.json" --quiet
            done ;;
        hopper-gen)
            for mb in 0 "${HOPPER_MB:-1e9}"; do
                step hopper-gen-$mb 330 $PY -m gptq_core bench generate --synthetic llama-2-7b --batch "${GEN_BATCH:-32,64}" \
                    --modes fast --new-tokens 64 --prompt-len 32 --work-dir "$WORK" --backend marlin \
                    --backend-option marlin.hopper_cache_mb=$mb --json "$OUT/gen-hopper-$mb.json"
            done ;;
        gen-backends) step gen-backends 330 $PY -m gptq_core bench generate --synthetic "${GEN_SHAPE:-llama-2-7b}" --batch "${GEN_BATCH:-1}" \
                          --modes fast --compare-backends "${GEN_BACKENDS:-marlin,exllama}" --new-tokens 64 --prompt-len 32 \
                          --work-dir "$WORK" --json "$OUT/gen-backends.json" ;;
        act-order) step act-order 100 $PY -m gptq_core bench --shapes 4096x4096,8192x28672 --m 1,8 --bits 4 \
                       --group-size 128 --act-order --backends exllama,cuda,marlin,triton --json "$OUT/bench-b4-act.json" --quiet ;;
        greedy) step greedy 240 $PY benchmarks/backend_greedy_check.py --backends "${GREEDY_BACKENDS:-auto,cuda,exllama}" \
                    --work-dir "$WORK" --json "$OUT/greedy.json" ;;
        quantize) step quantize 300 $PY benchmarks/quantize_synthetic.py --calibration "${CALIBRATION:-.cache/wikitext2-raw-test.txt}" \
                      --layers "${QUANTIZE_LAYERS:-4}" --methods "${QUANTIZE_METHODS:-plain,default}" --work "$WORK" --json "$OUT/quantize.json" ;;
        lora) step lora 200 $PY benchmarks/lora_step.py --backends marlin,triton --cache-mb "${LORA_CACHE_MB:-0}" --json "$OUT/lora.json" ${LORA_ARGS:-} ;;
        gen-fast) step gen-fast 270 $PY -m gptq_core bench generate --synthetic llama-2-7b --batch "${GEN_BATCH:-1,8}" \
                      --modes "${GEN_MODES:-eager,fast}" --new-tokens 64 --prompt-len 32 --work-dir "$WORK" --json "$OUT/gen-fast.json" ;;
        gen-static) step gen-static 200 $PY -m gptq_core bench generate --synthetic llama-2-7b --batch "${GEN_STATIC_BATCH:-1}" \
                        --modes static --new-tokens 64 --prompt-len 32 --work-dir "$WORK" --json "$OUT/gen-static.json" ;;
        rounding) step rounding 300 $PY benchmarks/gpu_generate_check.py --rounding-only --work-dir "$WORK" --json "$OUT/rounding.json" ;;
        generate) step generate 480 bash benchmarks/gpu_generate.sh check llama2 ;;
        llama3) step llama3 300 bash benchmarks/gpu_generate.sh llama3 ;;
        *) say "unknown step '$name'"; status=1 ;;
    esac
done
steps_end

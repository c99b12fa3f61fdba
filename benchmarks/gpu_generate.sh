#!/usr/bin/env bash
# GPU checks of the fast decode path and `gptq bench generate` (docs/DESIGN.md §9, §11).
#
#   benchmarks/gpu_generate.sh [check|llama2|llama3|all]     (default: all)
#
#   check   fast-path correctness on the GPU: compiled and CUDA graph used, greedy ==
#           transformers eager (64 tokens) on stories260K (float, 4-bit) and the synthetic 7B
#           4-bit, graph replay == eager step, padded batch == rows alone, sampling reproducible,
#           eos. Mostly torch.compile time: ~3-5 min (CHECK_ARGS=--skip-7b: stories only, ~2 min)
#   llama2  gptq bench generate --synthetic llama-2-7b --batch 1,8,32 --new-tokens 128 --prompt-len 32
#   llama3  the same for the llama-3-8b shape at batch 1,8
#
# Prints short tables; details go to $OUT (default ./gpu-generate-out): check.json, gen-*.json,
# *.log. The synthetic models are built once in $WORK (default: /dev/shm when it has room, else
# $TMPDIR) and reused by later stages on the same machine. Run the stages as separate commands:
# each compiles the decode step of each model twice (batch 1, then once for all larger batches)
# for the fast path and again for transformers' static cache, about a minute per compile for a
# 7B shape; llama2 is expected at 5-8 min, llama3 at 4-6 min. BENCH_ARGS is appended to both
# bench commands (e.g. BENCH_ARGS=--no-fast-compile to see what compiling the fast path gains).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-generate-out}
mkdir -p "$OUT"
if [[ -z "${WORK:-}" ]]; then
  shm_free_gb=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc '0-9' || echo 0)
  if [[ "${shm_free_gb:-0}" -ge 40 ]]; then WORK=/dev/shm/gptq-gen; else WORK=${TMPDIR:-/tmp}/gptq-gen; fi
fi
mkdir -p "$WORK"
stage=${1:-all}
py=${PYTHON:-python3}

status=0
timed() {  # name, command...: run, keep stderr in $OUT/name.log, print the wall time and status
  local name=$1; shift
  local start=$SECONDS rc=0
  echo "== $name: $*"
  "$@" 2> >(tee "$OUT/$name.log" >&2) || rc=$?
  echo "== $name: $((SECONDS - start)) s, exit status $rc"
  [[ $rc -eq 0 ]] || status=$rc
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
case $stage in
  check|all)
    timed check "$py" benchmarks/gpu_generate_check.py --work-dir "$WORK" --json "$OUT/check.json" ${CHECK_ARGS:-} ;;&
  llama2|all)
    timed gen-llama2 "$py" -m gptq_core bench generate --synthetic llama-2-7b --batch 1,8,32 \
      --new-tokens 128 --prompt-len 32 --work-dir "$WORK" --json "$OUT/gen-llama2.json" ${BENCH_ARGS:-} ;;&
  llama3|all)
    rm -rf "$WORK"/llama-2-7b-*  # room for the 22 GB llama-3-8b pair
    timed gen-llama3 "$py" -m gptq_core bench generate --synthetic llama-3-8b --batch 1,8 \
      --new-tokens 128 --prompt-len 32 --work-dir "$WORK" --json "$OUT/gen-llama3.json" ${BENCH_ARGS:-} ;;
  check|llama2) ;;
  *) echo "unknown stage '$stage': use check, llama2, llama3 or all" >&2; exit 2 ;;
esac
exit $status

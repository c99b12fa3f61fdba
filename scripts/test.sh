#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: unit tests, then the conformance suite
# against each CPU-runnable backend (triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONDONTWRITEBYTECODE=1
# One torch thread per pytest worker: two workers on two cores, no oversubscription.
export OMP_NUM_THREADS=1
python -m pytest -q -n 2 tests
# The portable backends' own tests (torch reference, triton through its interpreter).
python -m pytest -q -n 2 backends/tests
# The Marlin backend's CPU-side tests: tile repack, policy, options, and an nvcc build of its
# CUDA sources with SASS checks.
python -m pytest -q -n 2 backend_marlin/tests
# The cuda backend's CPU-side tests: fragment layout, a bit-level model of the kernel against the
# float64 reference, policy, options, probe, and nvcc builds for sm_75..sm_90 with SASS checks.
python -m pytest -q -n 2 backend_cuda/tests
# The ExLlama-style backend's CPU-side tests: its kernel model against float64, probe, and an
# nvcc build of its CUDA sources for sm_75..sm_90 with SASS checks.
python -m pytest -q -n 2 backend_exllama/tests
# The AMD backend: its probe, the hipified cuda/exllama sources through Debian's hipcc (installed
# here when running as root; its tests skip naming the apt command otherwise), and the triton
# backend's kernels compiled for gfx90a and gfx942 through Triton's AMD backend, no GPU needed.
if ! command -v hipcc >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc >/dev/null) \
        || echo "hipcc could not be installed: the HIP compile tests will skip"
fi
python -m pytest -q backend_rocm/tests
# The Gaudi backend's CPU-side tests: its layout through a model of convert_from_uint4 against
# float64, probe and selector fallback (the one device test skips without an HPU).
python -m pytest -q backend_hpu/tests
# The conformance suite's own tests (its case plans, its meta checks).
python -m pytest -q -n 2 conformance_tests/tests
# The conformance suite (gptq-conformance) against each backend that runs on this CPU:
# the torch reference, and the example third-party backend through its own test file.
python -m pytest -q -n 2 --pyargs gptq_conformance --gptq-backend=torch
# The cpu backend's C++ kernels (built on first use into its cache folder, ~30-50 s).
python -m pytest -q -n 2 --pyargs gptq_conformance --gptq-backend=cpu
python -m pytest -q -n 2 examples/third_party_backend/tests
# Triton's kernels on the CPU through its interpreter: the quick case set (the interpreter is slow).
TRITON_INTERPRET=1 python -m pytest -q -n 2 --pyargs gptq_conformance --gptq-backend=triton --gptq-quick

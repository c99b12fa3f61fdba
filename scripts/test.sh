#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: unit tests, then the conformance suite
# against each CPU-runnable backend (triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONDONTWRITEBYTECODE=1
python -m pytest -q -n 2 tests

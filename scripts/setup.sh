#!/usr/bin/env bash
# Create .venv and install every distribution of this repository in editable mode (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# The CPU build of torch first, pinned: an unpinned torch pulls several GB of CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
# Every distribution of the repository, editable, without build isolation (offline-safe); the
# list holds ./ paths, so pip never looks a bare name up on the index.
python -m pip install -q --no-build-isolation --no-deps $(grep -v '^#' scripts/distributions.txt | sed 's/^/-e /')

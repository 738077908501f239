#!/usr/bin/env bash
# The whole test suite: C engine tests (ctest, no torch) then torch-level tests (pytest).
# Sets everything up first (ci/bootstrap.sh). Every test is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
PY=${PYTHON:-python3}

echo "== ctest"
ctest --test-dir build --output-on-failure --timeout 300

echo "== pytest"
# run from outside the source tree so `import mooncake` is the installed package
cd tests/python && $PY -m pytest -q -p no:cacheprovider "$@"

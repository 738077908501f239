#!/usr/bin/env bash
# Full sweep of torch's suite: one junit XML per (backend, world size) under $OUT (default
# /tmp/torch-suite). Usage: sweep.sh "gloo mooncake" "2 4". Long (tens of minutes per run).
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/torch-suite}
mkdir -p "$OUT"
for ws in ${2:-2}; do
  for be in ${1:-gloo mooncake}; do
    echo "== $be world $ws ($(date +%T))"
    BACKEND=$be WORLD_SIZE=$ws timeout 7200 $PY -m pytest -q -p no:cacheprovider run_suite.py \
      --junitxml="$OUT/$be-$ws.xml" -o junit_logging=no "${@:3}" >"$OUT/$be-$ws.log" 2>&1
    tail -1 "$OUT/$be-$ws.log"
  done
done

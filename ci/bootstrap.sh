#!/usr/bin/env bash
# Installs what the build, the demo and the tests need, then builds and installs the package.
# Idempotent: installed packages are skipped; the build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(build-essential cmake ninja-build pkg-config libfabric-dev libfabric-bin
              libibverbs-dev iproute2 git)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
echo "== pip: torch and test tools (pinned in ci/constraints.txt; expecttest: torch's own test suite; matplotlib: bench --plot)"
$PY -m pip install -q -c ci/constraints.txt torch numpy pytest expecttest scikit-build-core ninja matplotlib

echo "== build: C engine and tests (build/)"
cmake -S . -B build -G Ninja -DMC_BUILD_TESTS=ON >/dev/null
cmake --build build

echo "== pip: mooncake (built against the installed torch)"
$PY -m pip install -q --no-build-isolation -c ci/constraints.txt .

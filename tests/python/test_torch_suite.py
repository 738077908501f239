"""A bounded subset of PyTorch's own distributed suite (DistributedTest._DistTestBase, run by
tests/torch_suite/run_suite.py) on mooncake with 2 ranks. Every test named in
tests/torch_suite/passlist.txt (and passlist-extended.txt with MC_TORCH_SUITE_EXTENDED=1) must
pass (a skip fails too). The full sweep, per test, for gloo
and mooncake: docs/torch-suite.md."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torch_suite")


def _names(fname):
    with open(os.path.join(SUITE, fname)) as f:
        return [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]


PASS_LIST = _names("passlist.txt")
if os.environ.get("MC_TORCH_SUITE_EXTENDED") == "1":  # every test that passes (~10 minutes on 2 cores)
    PASS_LIST += _names("passlist-extended.txt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("expecttest", reason="torch's suite needs expecttest (ci/bootstrap.sh)")
    xml = tmp_path_factory.mktemp("suite") / "mooncake-2.xml"
    env = dict(os.environ, BACKEND="mooncake", WORLD_SIZE="2", OMP_NUM_THREADS="1",
               DISTRIBUTED_TESTS_DEFAULT_TIMEOUT="90",
               MC_LOG_LEVEL=os.environ.get("MC_LOG_LEVEL", "info"))
    # junit_logging=all: a failure keeps what the ranks printed (engine log, native backtrace)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
           "junit_logging=all", f"--junitxml={xml}"]
    cmd += [f"run_suite.py::TestDistBackendWithSpawn::{n}" for n in PASS_LIST]
    proc = subprocess.run(cmd, cwd=SUITE, env=env, capture_output=True, text=True, timeout=1800)
    assert xml.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = next((case.find(t) for t in ("failure", "error", "skipped")
                    if case.find(t) is not None), None)
        if bad is None:
            out[case.get("name")] = "pass"
            continue
        logs = "".join(f"\n--- {t} (tail) ---\n{(case.find(t).text or '')[-4000:]}"
                       for t in ("system-out", "system-err") if case.find(t) is not None)
        out[case.get("name")] = f"{bad.tag}: {(bad.text or bad.get('message') or '')[-6000:]}{logs}"
    return out


@pytest.mark.parametrize("name", PASS_LIST)
def test_suite(results, name):
    assert results.get(name) == "pass", results.get(name, "did not run")

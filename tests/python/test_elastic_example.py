"""examples/elastic_ddp.py: one rank SIGKILLed mid-training; the survivors must shrink,
rebuild DDP and finish with identical parameters."""

import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "elastic_ddp.py")


def test_elastic_ddp_survives_a_kill():
    out = subprocess.run(
        [sys.executable, EXAMPLE, "--ranks", "4", "--steps", "40", "--kill-rank", "1",
         "--kill-step", "15"],
        capture_output=True, text=True, timeout=300)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert "killed rank 1 at step 15" in out.stdout
    assert out.stdout.count("recovered: now rank") == 3, out.stdout
    assert out.stdout.count("parameters identical on all survivors: True") == 3, out.stdout

"""`python -m mooncake.bench` runs, prints the nccl-tests columns with Gloo side by side, and
every row of every op has #wrong 0. Tiny sizes, no timing is checked."""

import json
import os
import subprocess
import sys
import tempfile

COLUMNS = ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
           "memcpy", "bus/mc", "gloo time", "gloo busbw", "speedup"]
OPS = ["allreduce", "allgather", "reduce_scatter", "broadcast", "alltoall", "sendrecv"]


def _bench(tmp, *extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "mooncake.bench", "--op", "all", "--ranks", "3", "--compare",
           "gloo", "--min-bytes", "96", "--max-bytes", "96K", "--step", "32", "--iters", "2",
           "--repeats", "1", "--json", os.path.join(tmp, "rows.json"), *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)


def test_bench_columns_and_no_wrong():
    try:
        import matplotlib  # noqa: F401
        plot = True
    except ImportError:
        plot = False
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "plot.png")
        p = _bench(tmp, *(["--plot", png] if plot else []))
        assert p.returncode == 0, p.stdout + p.stderr
        with open(os.path.join(tmp, "rows.json")) as f:
            rows = json.load(f)
        if plot:
            with open(png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = p.stdout
    headers = [line for line in out.splitlines() if line.startswith("#") and "busbw" in line]
    assert len(headers) == len(OPS), out
    for h in headers:
        pos = [h.find(c) for c in COLUMNS]
        assert all(i >= 0 for i in pos) and pos == sorted(pos), h
    data = [line.split() for line in out.splitlines() if line and not line.startswith("#")]
    assert len(data) == len(rows) and rows, out
    assert {r["op"] for r in rows} == set(OPS)
    for fields, r in zip(data, rows):
        assert len(fields) == len(COLUMNS), fields
        assert fields[8] == "0" and r["wrong"] == 0, (r, out)
        assert r["time_us"] > 0 and r["gloo_time_us"] > 0 and r["memcpy"] > 0, r
        assert int(fields[0]) == r["size"] and fields[2] == "float", fields


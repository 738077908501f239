"""Run a function on N spawned ranks with a hard deadline (no test can hang).

Each rank gets (rank, world, store_path, *args), must return something picklable, and its
result (or the traceback of what it raised) comes back through a queue. Ranks still alive at
the deadline are killed and the run fails.
"""

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback


def _entry(fn, rank, world, store_path, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        # "<lab>:<N>": rank r on host r % N, or r * N // world with MC_TEST_NETNS_LAYOUT=block
        hosts = os.environ.get("MC_TEST_NETNS")
        if hosts:
            from mooncake.bench import _enter_netns

            lab, n = hosts.rsplit(":", 1)
            block = os.environ.get("MC_TEST_NETNS_LAYOUT") == "block"
            _enter_netns(f"{lab}-r{rank * int(n) // world if block else rank % int(n)}")
        import torch

        torch.set_num_threads(1)  # up to 4 ranks share 2 cores
        results.put((rank, True, fn(rank, world, store_path, *args)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world, timeout, *args, may_die=()):
    """Returns [result of rank 0, ..., rank world-1]; raises AssertionError on failure/timeout.
    Ranks in ``may_die`` are killed on purpose: their result is None if they never report."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store_path, args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        got = {}
        try:
            def pending():  # ranks still expected to report
                return [r for r in range(world)
                        if r not in got and (r not in may_die or procs[r].is_alive())]

            while pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, ok, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    if all(not p.is_alive() for r, p in enumerate(procs)
                           if r not in got) and results.empty():
                        break  # a rank died without reporting (crash)
                    continue
                got[rank] = (ok, value)
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(10.0, deadline + 10 - time.monotonic())))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
    missing = [r for r in range(world) if r not in got and r not in may_die]
    exitcodes = [p.exitcode for r, p in enumerate(procs) if r not in may_die]
    assert not missing, f"ranks {missing} did not finish within {timeout}s (exit codes {exitcodes})"
    errors = {r: v for r, (ok, v) in got.items() if not ok}
    assert not errors, "\n".join(f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items()))
    assert all(c == 0 for c in exitcodes), f"rank exit codes {exitcodes}"
    return [got[r][1] if r in got else None for r in range(world)]

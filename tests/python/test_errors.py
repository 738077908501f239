"""Failures that involve more than one rank: they must end in DistBackendError, not a hang."""

import _workers
from _harness import run_ranks

TIMEOUT_S = 10


def test_mismatched_sizes_and_wait_timeout():
    results = run_ranks(_workers.mismatch, 2, 3 * TIMEOUT_S + 60, TIMEOUT_S)
    for rank, res in enumerate(results):
        assert res["counts"].get("mismatch", 0) >= 3, res
        assert res["counts"].get("wait_timeout", 0) >= 1, res
        failures = sum(res["failures"].values(), [])
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)

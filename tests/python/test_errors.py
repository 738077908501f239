"""Failures that involve more than one rank: they must end in DistBackendError, not a hang."""

import pytest

import _workers
from _harness import run_ranks

TIMEOUT_S = 10


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_sizes_and_wait_timeout(world):
    results = run_ranks(_workers.mismatch, world, 3 * TIMEOUT_S + 60, TIMEOUT_S)
    for rank, res in enumerate(results):
        assert res["counts"].get("mismatch", 0) >= 3, res
        assert res["counts"].get("wait_timeout", 0) >= 1, res
        failures = sum(res["failures"].values(), [])
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_mismatch_message_is_whole():
    """The engine's mismatch text reaches Python whole: rank, op, group and both sizes (it used
    to be cut off inside nested fixed-size buffers)."""
    for world in (2, 4):
        results = run_ranks(_workers.mismatch_text, world, 120)
        for rank, res in enumerate(results):
            name = res["group_name"]
            assert len(name) >= 32, name  # a hashed name: the long-prefix case
            for gname, comm in (("default", "0"), ("long", name)):
                got = res["got"]
                prefix = f"mooncake rank {rank}/{world} "
                if rank == 1:
                    msg = got[f"{gname}/recv"]
                    assert msg and msg.startswith(prefix), msg
                    assert msg.endswith(f"recv failed: rank 1: recv #0 on {comm}: rank 0 sent 400 "
                                        "bytes (100 x float32), this rank expected 40 bytes "
                                        "(10 x float32)"), msg
                msg = got[f"{gname}/allreduce"]
                assert msg and msg.startswith(prefix), msg
                assert f"allreduce failed: rank {rank}: allreduce #" in msg, msg
                assert f" on {comm}: rank " in msg, msg
                mine = f"allreduce of {10 + 10 * rank} x float32 (sum)"
                assert msg.endswith(f"but this rank called {mine}") or msg.endswith(
                    "reported that the ranks called this operation with different arguments"), msg
                if rank == 0:
                    msg = got[f"{gname}/gather"]
                    assert msg and msg.startswith(prefix), msg
                    # the first rank whose chunk arrives is reported: any of 1..world-1
                    assert any(msg.endswith(
                        f"gather #{msg.split('gather #')[1].split(' ')[0]} on {comm}: rank {r} "
                        f"called gather of {3 + r} x float32 to root 0 but this rank called "
                        "gather of 3 x float32 to root 0") for r in range(1, world)), msg
                msg = got[f"{gname}/alltoall"]
                assert msg and msg.startswith(prefix) and "all_to_all" in msg, msg
                assert f"rank {rank}: alltoall" in msg, msg

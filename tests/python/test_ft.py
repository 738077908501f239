"""Fault tolerance through torch.distributed: real SIGKILL/SIGSTOP of ranks, survivors shrink
and go on with bit-exact results (reference: a plain computation over the survivors)."""

import socket

import pytest

import _ft_workers
from _harness import run_ranks

TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victims,how,use_async", [
    ((2,), "agree", True),        # mooncake.shrink(): survivors need not know who died
    ((0,), "agree", False),       # rank 0, the store host, dies
    ((1,), "explicit", False),    # dist.shrink_group (torch's; it needs the store alive)
    ((1, 3), "agree", False),     # two at once
])
def test_kill_and_shrink(victims, how, use_async):
    world = 4
    results = run_ranks(_ft_workers.kill_and_shrink, world, TIMEOUT_S, free_port(), victims,
                        how, use_async, may_die=victims)
    for rank, res in enumerate(results):
        if rank in victims:
            assert res is None
            continue
        print(f"rank {rank}: shrink {res['shrink_ms']:.0f} ms, failure -> correct allreduce "
              f"{res['fail_to_ok_ms']:.0f} ms; error: {res['message'][:160]}")
        assert "DistBackendError" not in res["message"] or "failed" in res["message"]


def test_stopped_rank_is_excluded():
    world = 4
    results = run_ranks(_ft_workers.stop_and_exclude, world, TIMEOUT_S, free_port(),
                        may_die=(world - 1,))
    assert results[world - 1] is not None, "the stopped rank did not report after SIGCONT"
    for res in results[:-1]:
        assert "no heartbeat" in res["message"]

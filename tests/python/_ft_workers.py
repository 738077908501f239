"""Rank bodies for the fault-tolerance tests: ranks are killed or stopped for real; survivors
must get DistBackendError naming the failed rank, shrink, and compute bit-exact results."""

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist

import mooncake

N = 4099  # not a power of two: exercises uneven ring chunks after a shrink


def init(rank, world, port, timeout_s=60):
    # rank 0 hosts the store: killing rank 0 also kills the store, which must not matter
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s))
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return store


def value(orig_rank, it):
    return torch.arange(N, dtype=torch.float64) * (orig_rank + 1) + it


def expected(survivors, it):
    return sum(value(r, it) for r in survivors)


def check_group(orig_rank, survivors, it):
    """Collectives on the current default group, against a plain computation."""
    assert dist.get_world_size() == len(survivors), (dist.get_world_size(), survivors)
    assert dist.get_rank() == survivors.index(orig_rank), (dist.get_rank(), survivors)
    y = value(orig_rank, it)
    dist.all_reduce(y)
    assert torch.equal(y, expected(survivors, it)), "allreduce after shrink differs"
    out = [torch.empty(3, dtype=torch.int64) for _ in survivors]
    dist.all_gather(out, torch.tensor([orig_rank, it, 7]))
    assert [int(t[0]) for t in out] == survivors, "allgather after shrink differs"
    b = torch.tensor([orig_rank * 10.0])
    dist.broadcast(b, src=dist.get_world_size() - 1)
    assert b.item() == survivors[-1] * 10.0


def run_until_failure(rank, victims, die_at, use_async):
    for it in range(10_000):
        if rank in victims and it == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        y = value(rank, it)
        try:
            if use_async:
                work = dist.all_reduce(y, async_op=True)
                work.wait()
            else:
                dist.all_reduce(y)
        except dist.DistBackendError as err:
            return str(err), time.monotonic()
        assert torch.equal(y, expected(range(dist.get_world_size()), it))
    raise AssertionError("no failure was reported")


def kill_and_shrink(rank, world, store_path, port, victims, how, use_async):
    """Victims SIGKILL themselves mid-loop; survivors catch, shrink (agreed or explicit), go on."""
    init(rank, world, port)
    msg, t_fail = run_until_failure(rank, victims, 3, use_async)
    assert any(f"rank {v} failed" in msg for v in victims), msg
    t0 = time.monotonic()
    survivors = [r for r in range(world) if r not in victims]
    for attempt in range(3):  # a second victim may be noticed only after the first shrink
        if how == "agree":
            mooncake.shrink()
        else:
            dist.shrink_group(sorted(victims) if attempt == 0 else mooncake.failed_ranks())
        if dist.get_world_size() == len(survivors):
            break
    t_shrunk = time.monotonic()
    check_group(rank, survivors, 5)
    t_ok = time.monotonic()
    dist.destroy_process_group()
    return {"message": msg, "shrink_ms": (t_shrunk - t0) * 1e3,
            "fail_to_ok_ms": (t_ok - t_fail) * 1e3}


def stop_and_exclude(rank, world, store_path, port):
    """The last rank stops (SIGSTOP); the others detect it by silence, shrink and resume it;
    it must learn that it was excluded instead of carrying on alone."""
    store = init(rank, world, port)
    victim = world - 1
    store.set(f"pid/{rank}", str(os.getpid()))
    y = value(rank, 0)
    dist.all_reduce(y)
    if rank == victim:
        os.kill(os.getpid(), signal.SIGSTOP)
        # resumed by rank 0 after the others shrank
        try:
            dist.all_reduce(value(rank, 1))
            raise AssertionError("an excluded rank completed an allreduce")
        except dist.DistBackendError as err:
            first = str(err)
        try:
            mooncake.shrink()
            raise AssertionError("an excluded rank could shrink")
        except dist.DistBackendError as err:
            assert "declared this rank failed" in str(err), str(err)
        return {"resumed_error": first}
    msg, _ = run_until_failure(rank, (), -1, False)
    assert f"rank {victim} failed" in msg and "no heartbeat" in msg, msg
    pid = int(store.get(f"pid/{victim}"))
    mooncake.shrink()
    survivors = list(range(world - 1))
    check_group(rank, survivors, 2)
    dist.barrier()
    if rank == 0:
        os.kill(pid, signal.SIGCONT)
    dist.destroy_process_group()
    return {"message": msg}

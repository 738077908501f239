"""One rank of a fault-harness trial: a training-like loop of collectives over "mooncake".

Started by the harness (``python -m mooncake.fault.worker``) with the usual torch variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True: the harness
hosts the store) and MCF_* settings. Every iteration runs one collective on integer-valued
float64 data and checks it bit-exactly against a plain computation over the current members.
When an operation raises DistBackendError the rank records the time, calls
``mooncake.shrink()`` (again if another failure shows up), agrees with the other survivors on
the members and the iteration to resume from, and runs a few more checked iterations.

The result goes to $MCF_DIR/result.<rank>.json; times are time.monotonic() (CLOCK_MONOTONIC,
comparable between processes of one machine, network namespaces included).
"""

import json
import os
import signal
import sys
import time

from . import note

OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "alltoall")


def _env_int(name, default):
    return int(os.environ.get(name, default))


def value(torch, orig, it, n):
    """Rank `orig`'s input at iteration `it`: integers, exact in float64 sums."""
    return torch.arange(n, dtype=torch.float64) * (orig + 1) + (it % 1000) * 7


def run_op(torch, dist, op, it, members, me, n, corrupt=False):
    """One collective of iteration `it` on the current default group; returns whether the
    result equals a plain computation over `members` (original ranks in group order)."""
    w, i = len(members), members.index(me)
    if op == "allreduce":
        y = value(torch, me, it, n)
        dist.all_reduce(y)
        want = sum(value(torch, m, it, n) for m in members)
    elif op == "allgather":
        y = torch.empty(n * w, dtype=torch.float64)
        dist.all_gather_into_tensor(y, value(torch, me, it, n))
        want = torch.cat([value(torch, m, it, n) for m in members])
    elif op == "reduce_scatter":
        y = torch.empty(n, dtype=torch.float64)
        dist.reduce_scatter_tensor(y, value(torch, me, it, n * w))
        want = sum(value(torch, m, it, n * w) for m in members)[i * n:(i + 1) * n]
    elif op == "broadcast":
        root = it % w
        y = value(torch, me, it, n) if i == root else torch.zeros(n, dtype=torch.float64)
        dist.broadcast(y, src=root)
        want = value(torch, members[root], it, n)
    elif op == "alltoall":
        y = torch.empty(n * w, dtype=torch.float64)
        dist.all_to_all_single(y, value(torch, me, it, n * w))
        want = torch.cat([value(torch, m, it, n * w)[i * n:(i + 1) * n] for m in members])
    else:
        raise ValueError(f"unknown op {op!r}")
    if corrupt:
        y[0] += 1
    return torch.equal(y, want)


def main():
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    out_dir = os.environ["MCF_DIR"]
    op = os.environ.get("MCF_OP", "allreduce")
    n = _env_int("MCF_COUNT", 1024)
    max_iters = _env_int("MCF_MAX_ITERS", 100000)
    post = _env_int("MCF_POST", 10)
    soak_s = float(os.environ.get("MCF_SOAK_S", "0"))
    planted = os.environ.get("MCF_PLANTED", "")  # harness self-test: "wrong" or "hang"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import datetime

    import torch
    import torch.distributed as dist

    import mooncake

    torch.set_num_threads(1)
    res = {"rank": rank, "op": op, "count": n, "errors": [], "wrong": [], "shrinks": 0,
           "t_detect": None, "t_recovered": None, "excluded": None, "members": None,
           "iterations": 0, "checked_after_fault": 0, "done": False}

    def save():
        path = os.path.join(out_dir, f"result.{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(path + ".tmp", path)

    timeout = datetime.timedelta(seconds=float(os.environ.get("MCF_PG_TIMEOUT_S", "120")))
    dist.init_process_group("mooncake", rank=rank, world_size=world, timeout=timeout)
    members = list(range(world))
    it, stop_it, recovering = 0, max_iters, False
    soak_deadline = time.monotonic() + soak_s if soak_s else None
    while it < stop_it:
        if soak_deadline and it % 50 == 49:  # rank 0's clock ends a failure-free soak
            flag = torch.tensor([float(time.monotonic() > soak_deadline)])
            dist.broadcast(flag, src=0)
            if flag.item():
                break
        try:
            ok = run_op(torch, dist, op, it, members, rank,
                        n, corrupt=planted == "wrong" and recovering)
        except dist.DistBackendError as err:
            t = time.monotonic()
            res["errors"].append({"t": t, "it": it, "msg": str(err)[:400]})
            if res["t_detect"] is None:
                res["t_detect"] = t
                note("detected", msg=str(err)[:200])
            if planted == "hang":
                time.sleep(3600)
            # recover: shrink until an agreed group answers, then agree where to resume
            while True:
                res["shrinks"] += 1
                try:
                    mooncake.shrink()
                    sync = torch.tensor([rank, it], dtype=torch.int64)
                    got = [torch.empty(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
                    dist.all_gather(got, sync)
                    break
                except dist.DistBackendError as err2:
                    msg = str(err2)
                    res["errors"].append({"t": time.monotonic(), "it": it, "msg": msg[:400]})
                    if "declared this rank failed" in msg or res["shrinks"] > world:
                        res["excluded"] = msg[:400]
                        save()
                        return 0
            members = [int(g[0]) for g in got]
            it = max(int(g[1]) for g in got)
            stop_it = min(max_iters, it + post)
            recovering = True
            continue
        if not ok:
            res["wrong"].append(it)
        if res["t_detect"] is not None:
            res["checked_after_fault"] += 1
            if recovering and ok:
                res["t_recovered"] = time.monotonic()
            recovering = False
        it += 1
        res["iterations"] += 1
        if res["iterations"] == 1:  # the job runs: the harness may strike from now on
            with open(os.path.join(out_dir, f"ready.{rank}"), "w") as f:
                f.write(str(time.monotonic()))
    res["members"] = members
    res["failed_at_end"] = mooncake.failed_ranks()  # suspicions that never failed an op
    res["done"] = True
    res["t_done"] = time.monotonic()
    save()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skips interpreter teardown: seconds on a loaded machine

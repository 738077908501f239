"""Elastic DDP training that survives a rank being killed mid-run.

    python examples/elastic_ddp.py --ranks 4 --kill-rank 2 --kill-step 30 --steps 80

The script launches its ranks itself (torchrun's agent would stop every worker as soon as one
dies). The launcher hosts the TCPStore and SIGKILLs one rank at a chosen step; the survivors
see a DistBackendError from the collective in backward(), agree on who is gone with
mooncake.shrink() (which also makes the shrunk group the default group), rebuild DDP on it
(DDP broadcasts rank 0's parameters, so every survivor continues from the same state), resume
from the earliest step any survivor was at, and go on training. Each rank prints what happened and how long recovery took.
"""

import argparse
import datetime
import multiprocessing as mp
import os
import signal
import socket
import sys
import time

BATCH = 32


def log(msg):
    sys.stdout.write(msg + "\n")  # one write: lines of different ranks don't interleave
    sys.stdout.flush()


def train(rank, world, port, args, reached):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import mooncake

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # stateless: nothing else to re-sync
    gen = torch.Generator().manual_seed(1234)
    w_true = torch.randn(16, 1, generator=gen)

    step = 0
    while step < args.steps:
        # every step draws the same global batch; each rank takes its shard of the current group
        x = torch.randn(BATCH * 4, 16, generator=torch.Generator().manual_seed(step))
        y = x @ w_true
        me, n = dist.get_rank(), dist.get_world_size()
        shard = slice(me * len(x) // n, (me + 1) * len(x) // n)
        reached[rank] = step
        try:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x[shard]), y[shard])
            loss.backward()  # DDP's gradient allreduce fails here when a peer dies
            opt.step()
        except dist.DistBackendError as err:
            t_fail = time.monotonic()
            log(f"[rank {rank}] step {step}: collective failed: {str(err).splitlines()[0][:200]}")
            log(f"[rank {rank}] failed ranks seen locally: {mooncake.failed_ranks()}")
            mooncake.shrink()  # the survivors agree on who failed; no store, no rank 0 needed
            t_shrunk = time.monotonic()
            # A peer can die after some survivors finished this step's allreduce and before
            # others did: resume together from the earliest step, from the new rank 0's
            # parameters (DDP broadcasts them when it is built).
            resume = torch.tensor([step])
            dist.all_reduce(resume, op=dist.ReduceOp.MIN)
            step = int(resume)
            ddp = DDP(model)
            log(f"[rank {rank}] recovered: now rank {dist.get_rank()} of {dist.get_world_size()},"
                f" resuming at step {step};"
                f" shrink {1e3 * (t_shrunk - t_fail):.0f} ms, DDP rebuilt"
                f" {1e3 * (time.monotonic() - t_fail):.0f} ms after the failure")
            continue  # redo this step on the new group
        if step % 10 == 0 and dist.get_rank() == 0:
            log(f"[rank {rank}] step {step}: loss {loss.item():.5f} on {n} ranks")
        step += 1

    # every survivor must end with identical parameters
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    same = torch.equal(low, high)
    log(f"[rank {rank}] done: final loss {loss.item():.5f}, {dist.get_world_size()} ranks, "
        f"parameters identical on all survivors: {same}")
    dist.destroy_process_group()
    sys.exit(0 if same else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--kill-rank", type=int, default=2)
    p.add_argument("--kill-step", type=int, default=30)
    args = p.parse_args()

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the launcher hosts the store, as torchrun's agent does
    store = dist.TCPStore("127.0.0.1", port, args.ranks, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    reached = ctx.Array("i", [-1] * args.ranks)
    procs = [ctx.Process(target=train, args=(r, args.ranks, port, args, reached))
             for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    victim = procs[args.kill_rank]
    deadline = time.monotonic() + 300
    while reached[args.kill_rank] < args.kill_step and victim.is_alive():
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)  # launcher polling its own children, not synchronization of ranks
    if victim.is_alive():
        os.kill(victim.pid, signal.SIGKILL)
        log(f"[launcher] killed rank {args.kill_rank} at step {args.kill_step}")
    codes = []
    for r, proc in enumerate(procs):
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
        codes.append(proc.exitcode)
    del store
    ok = all(c == 0 for r, c in enumerate(codes) if r != args.kill_rank)
    log(f"[launcher] exit codes {codes}: {'survivors finished' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""A user script for `python -m mooncake.fault run ... -- tests/fault/allreduce_loop.py`:
plain env:// initialisation (the harness provides RANK, WORLD_SIZE, MASTER_ADDR/PORT and hosts
the store), a loop of allreduces, and on a failure: note it, shrink, check, finish."""

import os
import sys

import torch
import torch.distributed as dist

import mooncake
from mooncake.fault import note

iters = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
dist.init_process_group("mooncake")
rank = dist.get_rank()
for it in range(iters):
    x = torch.full((1024,), float(rank + 1))
    try:
        dist.all_reduce(x)
    except dist.DistBackendError as err:
        note("detected", msg=str(err)[:200])
        print(f"rank {rank}: {err}", flush=True)
        mooncake.shrink()
        y = torch.ones(4)
        dist.all_reduce(y)
        assert y[0].item() == dist.get_world_size()
        print(f"rank {rank}: shrunk to {dist.get_world_size()} ranks", flush=True)
        break
    if it == 0:
        note("ready")  # `run --ready`: faults are timed from here
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)

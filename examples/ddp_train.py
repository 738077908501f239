"""Small DDP training run on synthetic data.

    torchrun --standalone --nproc-per-node=4 examples/ddp_train.py
    BACKEND=gloo torchrun --standalone --nproc-per-node=4 examples/ddp_train.py   # reference

There is deliberately no `import mooncake`: the installed entry point registers the backend
when init_process_group asks for it. Seeds are fixed, so two runs print the same losses.
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = int(os.environ.get("STEPS", "40"))
BATCH = 32


def main():
    dist.init_process_group(backend=os.environ.get("BACKEND", "mooncake"))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # several ranks share few cores

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    # Synthetic regression task; each rank draws its own shard from a rank-specific seed.
    gen = torch.Generator().manual_seed(1000 + rank)
    target_w = torch.linspace(-1, 1, 16).unsqueeze(1)
    for step in range(STEPS):
        x = torch.randn(BATCH, 16, generator=gen)
        y = x @ target_w + 0.1 * torch.randn(BATCH, 1, generator=gen)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()  # gradients are averaged across ranks by the backend's allreduce
        opt.step()
        # Report the global mean loss so the number does not depend on which rank prints.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        if rank == 0:
            print(f"step {step:3d} loss {global_loss.item() / world:.6f}", flush=True)

    # Parameters must be identical on every rank after training.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(g, flat) for g in gathered)
    if rank == 0:
        print(f"final backend={dist.get_backend()} world={world} steps={STEPS} "
              f"loss={global_loss.item() / world:.6f} params_in_sync={in_sync}", flush=True)
    dist.destroy_process_group()
    if not in_sync:
        raise SystemExit("parameters diverged across ranks")


if __name__ == "__main__":
    main()

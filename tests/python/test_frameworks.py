"""Frameworks over mooncake, compared with gloo in the same job: DDP (comm hooks through
Work.get_future(), find_unused_parameters, uneven inputs with Join), FSDP2 (fully_shard on CPU),
torch.distributed.checkpoint, object collectives, batch_isend_irecv and coalescing, async
semantics (async_op returns at once, many outstanding ops, Work.wait(timeout)).

A category whose ops mooncake does not implement yet is skipped with the reason (pending)."""

import pytest

import _framework_workers
from _harness import run_ranks

CATEGORIES = ["ddp", "ddp_hooks", "fsdp2", "dtensor", "checkpoint", "objects", "objects_rooted",
              "batch_p2p", "async"]
JOBS = ["ddp", "fsdp2", "dtensor", "checkpoint", "objects", "objects_rooted", "batch_p2p", "async"]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request):
    world = request.param
    return world, run_ranks(_framework_workers.frameworks, world, 420, JOBS)


@pytest.mark.parametrize("category", CATEGORIES)
def test_framework(results, category):
    world, res = results
    job = "ddp" if category == "ddp_hooks" else category
    for rank, r in enumerate(res):
        if job in r["pending"]:
            pytest.skip(f"pending: {r['pending'][job]}")
        crashed = [m for m in r["failures"].get(job, []) if m.startswith("check_")]
        assert not crashed, f"world {world} rank {rank}: {job} stopped early:\n{crashed[0]}"
        assert r["counts"].get(category, 0) > 0, f"rank {rank}: no {category} checks ran"
        failures = r["failures"].get(category, [])
        assert not failures, f"world {world} rank {rank}:\n" + "\n".join(failures[:20])

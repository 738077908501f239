"""Every implemented op through mooncake vs gloo, in one spawned job per world size."""

import pytest

import _workers
from _harness import run_ranks

CATEGORIES = ["allreduce", "reduce_scatter", "async", "future", "allgather", "broadcast", "barrier",
              "noncontig", "coalesced", "p2p", "reduce", "gather", "scatter", "alltoall", "bitwise",
              "premul", "complex", "float8", "validation", "ddp", "info"]
# Fewest checks each category must have run on every rank (guards against silently empty runs).
MIN_CHECKS = {"allreduce": 190, "reduce_scatter": 140, "allgather": 100, "broadcast": 40, "validation": 18, "ddp": 5,
             "reduce": 200, "gather": 40, "scatter": 50, "alltoall": 100, "bitwise": 40,
             "premul": 12, "complex": 12, "float8": 15}


# "transport": the shared-memory path off (MC_SHM=0), so the same checks run the transport's
# algorithms (ring, recursive doubling, trees) over tcp loopback. "hosts2": the ranks on two
# "hosts" (network namespaces joined by veth links; rank r on host r % 2), so allreduce,
# allgather, reduce_scatter and barrier are hierarchical (shared memory on each host, tcp between
# them) and the rest runs over tcp; "hosts2-block": ranks numbered host by host (0, 1 | 2, 3), as
# torchrun does, where the leaders' allgather and reduce_scatter work in place.
@pytest.fixture(scope="module",
                params=[(2, ""), (4, ""), (4, "transport"), (4, "hosts2"), (4, "hosts2-block")],
                ids=["world2", "world4", "world4-transport", "world4-hosts2", "world4-hosts2-block"])
def battery(request):
    world, variant = request.param
    mp = pytest.MonkeyPatch()
    lab = None
    if variant == "transport":
        mp.setenv("MC_SHM", "0")
    if variant.startswith("hosts2"):
        from mooncake.fault import netns

        ok, why = netns.available()
        assert ok, f"network namespaces are needed (root): {why}"
        lab = netns.Lab(2).__enter__()
        for var in ("MC_OFI_IFACE", "FI_TCP_IFACE", "GLOO_SOCKET_IFNAME"):
            mp.setenv(var, netns.IFACE)
        mp.setenv("MC_TEST_NETNS", f"{lab.name}:2")
        if variant == "hosts2-block":
            mp.setenv("MC_TEST_NETNS_LAYOUT", "block")
    try:
        return world, run_ranks(_workers.battery, world, 300)
    finally:
        mp.undo()
        if lab:
            lab.close()


@pytest.mark.parametrize("category", CATEGORIES)
def test_matches_gloo(battery, category):
    world, results = battery
    for rank, res in enumerate(results):
        crashed = {k: v for k, v in res["failures"].items() if k.startswith("check_")}
        assert not crashed, f"rank {rank}: a check stopped early: {crashed}"
        assert res["counts"].get(category, 0) >= MIN_CHECKS.get(category, 1), \
            f"rank {rank}: only {res['counts'].get(category, 0)} {category} checks ran"
        failures = res["failures"].get(category, [])
        assert not failures, f"world {world} rank {rank}:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("world,transport", [(2, ""), (4, ""), (2, "tcp")],
                         ids=["world2-default", "world4-default", "world2-tcp"])
def test_recv_anysource(world, transport):
    results = run_ranks(_workers.anysource, world, 120, transport)
    for rank, res in enumerate(results):
        assert res["counts"].get("anysource", 0) >= 2, res
        failures = res["failures"].get("anysource", [])
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)

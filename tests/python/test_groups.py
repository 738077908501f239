"""Process groups over mooncake vs gloo: new_group, new_subgroups, split_group, groups driven
from several threads at once, destroy and re-create (also of the whole world on one store)."""

import pytest

import _group_workers
from _harness import run_ranks

CATEGORIES = ["new_group", "subgroups", "split", "threads", "recreate"]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request):
    world = request.param
    return world, run_ranks(_group_workers.groups, world, 240)


@pytest.mark.parametrize("category", CATEGORIES)
def test_groups(results, category):
    world, res = results
    for rank, r in enumerate(res):
        crashed = {k: v for k, v in r["failures"].items() if k.startswith("check_")}
        assert not crashed, f"rank {rank}: a check stopped early: {crashed}"
        assert r["counts"].get(category, 0) > 0, f"rank {rank}: no {category} checks ran"
        failures = r["failures"].get(category, [])
        assert not failures, f"world {world} rank {rank}:\n" + "\n".join(failures[:20])

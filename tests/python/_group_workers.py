"""Per-rank bodies of the process-group tests: new_group, new_subgroups, split_group, groups
used concurrently and from threads, destroy and re-create. Every group is built twice, over
mooncake and over gloo, and each result is compared with gloo's and with a plain computation.
Returns {"counts": ..., "failures": ...} like _workers.py."""

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from _workers import Checks

TIMEOUT = timedelta(seconds=60)


def _init(rank, world, store_path):
    import mooncake  # noqa: F401

    store = dist.FileStore(store_path, world)
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    return store


def _value(rank, seed, n=257):
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(-8, 9, (n,), generator=g).double()


def _check_group_sum(c, cat, name, group, ranks, rank, seed, gloo_group=None):
    """all_reduce over `group` (global `ranks`) equals the plain sum (and gloo's, if given)."""
    if rank not in ranks:
        c.expect(cat, name + " non-member", group == dist.GroupMember.NON_GROUP_MEMBER,
                 f"non-member got {group}")
        return
    t = _value(rank, seed)
    dist.all_reduce(t, group=group)
    exp = sum(_value(r, seed) for r in ranks)
    c.equal(cat, name, t, exp)
    c.expect(cat, name + " size", dist.get_world_size(group) == len(ranks),
             f"{dist.get_world_size(group)} != {len(ranks)}")
    c.expect(cat, name + " rank", dist.get_rank(group) == ranks.index(rank),
             f"group rank {dist.get_rank(group)}, expected {ranks.index(rank)}")
    c.expect(cat, name + " backend", dist.get_backend(group) == "mooncake", dist.get_backend(group))
    if gloo_group is not None:
        g = _value(rank, seed)
        dist.all_reduce(g, group=gloo_group)
        c.equal(cat, name + " vs gloo", t, g)


def check_new_group(c, rank, world):
    cat = "new_group"
    patterns = [list(range(world)), [0, 1], [world - 1, 0], [1], list(range(1, world))]
    for i, ranks in enumerate(patterns):
        sort = i != 2  # [world-1, 0] in that order: group rank 0 is global rank world-1
        mc = dist.new_group(ranks, sort_ranks=sort)
        gl = dist.new_group(ranks, backend="gloo", sort_ranks=sort)
        order = ranks if not sort else sorted(ranks)
        c.guard(cat, f"ranks {ranks}",
                lambda: _check_group_sum(c, cat, f"ranks {ranks}", mc, order, rank, i, gl))
        if rank in ranks and len(ranks) > 1:
            # Broadcast from the group's first rank: source named by group rank.
            src = order[0]
            t = _value(rank, 50 + i)
            dist.broadcast(t, group=mc, group_src=0)
            c.equal(cat, f"ranks {ranks} broadcast", t, _value(src, 50 + i))
            # Point-to-point by group rank inside the subgroup.
            me, n = order.index(rank), len(order)
            out = _value(rank, 60 + i)
            got = torch.empty_like(out)
            reqs = [dist.isend(out, group=mc, group_dst=(me + 1) % n),
                    dist.irecv(got, group=mc, group_src=(me - 1) % n)]
            for r in reqs:
                r.wait()
            c.equal(cat, f"ranks {ranks} ring", got, _value(order[(me - 1) % n], 60 + i))
    # use_local_synchronization: only the members call new_group (each rank creates the same
    # number of groups, or torch's group counter, hence later group names, would diverge).
    pair = [rank - rank % 2, rank - rank % 2 + 1]
    g = dist.new_group(pair, use_local_synchronization=True)
    c.guard(cat, f"local sync {pair}", lambda: _check_group_sum(
        c, cat, f"local sync {pair}", g, pair, rank, 80))
    # Two groups over the same ranks, used alternately with ops in flight on both.
    a, b = dist.new_group(), dist.new_group()
    xs = [_value(rank, 70 + k) for k in range(8)]
    works = [dist.all_reduce(x, group=(a if k % 2 else b), async_op=True) for k, x in enumerate(xs)]
    for w in works:
        w.wait()
    for k, x in enumerate(xs):
        c.equal(cat, f"same-ranks groups op {k}", x, sum(_value(r, 70 + k) for r in range(world)))


def check_subgroups(c, rank, world):
    cat = "subgroups"
    size = 2 if world % 2 == 0 else 1
    cur, groups = dist.new_subgroups(size)
    gcur, _ = dist.new_subgroups(size, backend="gloo")
    mine = list(range(rank - rank % size, rank - rank % size + size))
    c.expect(cat, "count", len(groups) == world // size, f"{len(groups)} subgroups")
    c.guard(cat, "new_subgroups", lambda: _check_group_sum(c, cat, "new_subgroups", cur, mine,
                                                           rank, 1, gcur))
    # Interleaved ranks by enumeration: [[0, 2], [1, 3]] on 4 ranks, [[0], [1]] on 2.
    half = world // 2
    enum = [list(range(s, world, half)) for s in range(half)]
    cur, _ = dist.new_subgroups_by_enumeration(enum)
    gcur, _ = dist.new_subgroups_by_enumeration(enum, backend="gloo")
    mine = next(e for e in enum if rank in e)
    c.guard(cat, "by_enumeration", lambda: _check_group_sum(c, cat, "by_enumeration", cur, mine,
                                                            rank, 2, gcur))


def check_split(c, rank, world, gloo_world):
    cat = "split"
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    c.expect(cat, "supports_splitting", backend.supports_splitting, "mooncake can't split")
    halves = [list(range(0, world, 2)), list(range(1, world, 2))]
    sub = dist.split_group(split_ranks=halves)
    gsub = dist.split_group(gloo_world, split_ranks=halves)
    mine = next(h for h in halves if rank in h)
    c.guard(cat, "halves", lambda: _check_group_sum(c, cat, "halves", sub, mine, rank, 3, gsub))
    # Ranks not named anywhere get NON_GROUP_MEMBER; the order inside a split is its rank order.
    part = [world - 1, 0]
    sub2 = dist.split_group(split_ranks=[part])
    c.guard(cat, "partial", lambda: _check_group_sum(c, cat, "partial", sub2, part, rank, 4))
    # Split of a split.
    if sub != dist.GroupMember.NON_GROUP_MEMBER and len(mine) > 1:
        inner = dist.split_group(sub, split_ranks=[[0], list(range(1, len(mine)))])
        mine2 = [mine[0]] if rank == mine[0] else mine[1:]
        c.guard(cat, "nested", lambda: _check_group_sum(c, cat, "nested", inner, mine2, rank, 5))


def check_threads(c, rank, world):
    """Several groups, each driven by its own thread, all at once; plus ops on the default group
    from the main thread while they run."""
    cat = "threads"
    nthreads, iters = 4, 20
    groups = [dist.new_group() for _ in range(nthreads)]
    results = [[] for _ in range(nthreads)]
    errors = []

    def body(i):
        try:
            for k in range(iters):
                t = _value(rank, 1000 * i + k, n=1 + 97 * k)
                w = dist.all_reduce(t, group=groups[i], async_op=(k % 2 == 0))
                if w is not None:
                    w.wait()
                results[i].append(t)
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=body, args=(i,)) for i in range(nthreads)]
    for th in threads:
        th.start()
    main = []
    for k in range(iters):
        t = _value(rank, 9000 + k)
        dist.all_reduce(t)
        main.append(t)
    for th in threads:
        th.join(120)
    c.expect(cat, "threads finished", not any(th.is_alive() for th in threads), "a thread hung")
    c.expect(cat, "no errors", not errors, "; ".join(errors))
    for i in range(nthreads):
        for k, t in enumerate(results[i]):
            c.equal(cat, f"thread {i} op {k}", t,
                    sum(_value(r, 1000 * i + k, n=1 + 97 * k) for r in range(world)))
    for k, t in enumerate(main):
        c.equal(cat, f"main op {k}", t, sum(_value(r, 9000 + k) for r in range(world)))


def check_destroy_recreate(c, rank, world):
    cat = "recreate"
    for k in range(3):
        g = dist.new_group()
        c.guard(cat, f"round {k}",
                lambda: _check_group_sum(c, cat, f"round {k}", g, list(range(world)), rank, 20 + k))
        dist.destroy_process_group(g)
        c.expect(cat, f"round {k} destroyed", g not in dist.distributed_c10d._world.pg_map, "")


def groups(rank, world, store_path):
    store = _init(rank, world, store_path)
    gloo_world = dist.new_group(backend="gloo")
    c = Checks()
    for fn in (check_new_group, check_subgroups, check_threads, check_destroy_recreate):
        c.guard(fn.__name__, "check_" + fn.__name__, lambda: fn(c, rank, world))
    c.guard("split", "check_split", lambda: check_split(c, rank, world, gloo_world))
    # The whole world destroyed and re-created on the same store object: the old
    # communicator's keys are still in it and must not be taken for the new one's.
    dist.destroy_process_group()
    for k in range(2):
        dist.init_process_group("mooncake", store=store, rank=rank, world_size=world,
                                timeout=TIMEOUT)
        c.guard("recreate", f"world {k}", lambda: _check_group_sum(
            c, "recreate", f"world {k}", dist.group.WORLD, list(range(world)), rank, 30 + k))
        dist.destroy_process_group()
    return c.result()

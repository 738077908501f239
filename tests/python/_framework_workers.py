"""Per-rank bodies of the framework tests: DDP (comm hooks, unused parameters, uneven inputs
with Join), FSDP2, torch.distributed.checkpoint, object collectives, batch_isend_irecv and
coalescing, async semantics. Each job runs the same thing over a mooncake group and a gloo
group and compares, or compares with a plain computation.

Returns {"counts": ..., "failures": ..., "pending": {category: reason}}: a category whose ops
mooncake does not implement yet (a "does not support" error from c10d, raised alike on every
rank before any data moves) is recorded as pending instead of failed."""

import copy
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _workers import Checks

TIMEOUT = timedelta(seconds=60)


class Pending(Exception):
    """An op the backend doesn't implement yet."""


def _unsupported(err):
    return "does not support" in str(err) or "missing implementation" in str(err)


def run_category(c, pending, cat, fn):
    try:
        fn()
    except Pending as p:
        pending[cat] = str(p)
    except Exception as e:  # noqa: BLE001
        if _unsupported(e):
            pending[cat] = str(e).splitlines()[0]
        else:
            import traceback

            c.expect(cat, "check_" + cat, False, traceback.format_exc(limit=6))


# ---------------------------------------------------------------- DDP


class Net(nn.Module):
    def __init__(self, with_branch):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)
        # Used only in steps with `branch` set: DDP needs find_unused_parameters.
        self.unused = nn.Linear(32, 8) if with_branch else None

    def forward(self, x, branch=False):
        h = torch.relu(self.a(x))
        return self.unused(h) if branch else self.b(h)


def _batch(rank, step, n=8):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)


def _train_ddp(group, rank, steps, hook=None, find_unused=False, branch_at=None, uneven=False,
               bucket_cap_mb=0.001):  # several buckets by default
    torch.manual_seed(0)
    model = Net(branch_at is not None)
    ddp = DDP(model, process_group=group, find_unused_parameters=find_unused,
              bucket_cap_mb=bucket_cap_mb)
    if hook is not None:
        state, fn = hook(group)
        ddp.register_comm_hook(state, fn)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    nsteps = steps + (rank if uneven else 0)
    losses = []

    def loop():
        for s in range(nsteps):
            x, y = _batch(rank, s)
            branch = branch_at is not None and s % 2 == branch_at
            loss = nn.functional.mse_loss(ddp(x, branch=branch), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())

    if uneven:
        from torch.distributed.algorithms.join import Join

        with Join([ddp]):
            loop()
    else:
        loop()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _powersgd(group):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    return ps.PowerSGDState(process_group=group, matrix_approximation_rank=1,
                            start_powerSGD_iter=2, use_error_feedback=True, warm_start=True,
                            random_seed=0), ps.powerSGD_hook


def _hooks():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as dh

    return {
        "allreduce_hook": (lambda g: (g, dh.allreduce_hook), 1e-6),
        "fp16_compress_hook": (lambda g: (g, dh.fp16_compress_hook), 2e-3),
        "bf16_compress_hook": (lambda g: (g, dh.bf16_compress_hook), 2e-2),
        "fp16_compress_wrapper": (lambda g: (g, dh.fp16_compress_wrapper(dh.allreduce_hook)), 2e-3),
    }


def check_ddp(c, rank, world, gloo):
    mc = dist.group.WORLD
    cases = [("plain", {}, 1e-6)]
    cases += [(name, {"hook": h}, tol) for name, (h, tol) in _hooks().items()]
    # PowerSGD's callbacks issue collectives and wait on them: one bucket, so that the order
    # of those collectives is the same on every rank (gloo itself mismatches with several).
    cases += [("powerSGD_hook", {"hook": _powersgd, "bucket_cap_mb": 25}, 1e-4)]
    cases += [("find_unused_parameters", {"find_unused": True, "branch_at": 1}, 1e-6),
              ("join uneven inputs", {"uneven": True}, 1e-6),
              ("join uneven + unused", {"uneven": True, "find_unused": True, "branch_at": 0},
               1e-6)]
    for name, kw, tol in cases:
        cat = "ddp_hooks" if "hook" in kw else "ddp"
        ml, mp = _train_ddp(mc, rank, 4, **kw)
        gl, gp = _train_ddp(gloo, rank, 4, **kw)
        c.equal(cat, f"{name}: losses", ml, gl, rtol=tol, atol=tol)
        for i, (a, b) in enumerate(zip(mp, gp)):
            c.equal(cat, f"{name}: param {i}", a, b, rtol=tol, atol=tol)
        # Replicas stay identical across ranks.
        flat = torch.cat([p.reshape(-1) for p in mp])
        ref = flat.clone()
        dist.broadcast(ref, 0, group=gloo)
        c.equal(cat, f"{name}: replicas equal", flat, ref)


# ---------------------------------------------------------------- FSDP2 and checkpoint


def _fsdp_model(group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_fsdp(group, rank, steps=3):
    model = _fsdp_model(group)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for s in range(steps):
        x, y = _batch(rank, s)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, torch.stack(losses)


class OpsSeen:
    """Records the c10d ops (torch.ops.c10d.* and _c10d_functional.*) dispatched inside the
    block: proof that a framework call reached the backend through the op the check is about."""

    def __init__(self):
        self.names = set()

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if "c10d" in name:
                    names.add(name.split(".")[1])  # "c10d.scatter_.default" -> "scatter_"
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def expect_ops(c, cat, what, seen, *ops):
    missing = [op for op in ops if op not in seen.names]
    c.expect(cat, f"{what} reached the backend through {', '.join(ops)}", not missing,
             f"missing {missing}; seen {sorted(seen.names)}")


def _unsharded_reference(rank, world, gloo, steps=3):
    """The FSDP model trained without FSDP: full model on each rank, grads averaged over gloo."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 8))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for s in range(steps):
        x, y = _batch(rank, s)
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        for p in ref.parameters():
            dist.all_reduce(p.grad, group=gloo)
            p.grad /= world
        opt.step()
    return ref


def check_fsdp(c, rank, world, gloo):
    cat = "fsdp2"
    with OpsSeen() as seen:
        mm, ml = _train_fsdp(dist.group.WORLD, rank)
    # FSDP2's unshard is an all_gather_into_tensor of one flat buffer, its gradient reduction a
    # reduce_scatter_tensor
    expect_ops(c, cat, "training", seen, "_allgather_base_", "_reduce_scatter_base_")
    gm, gl = _train_fsdp(gloo, rank)
    c.equal(cat, "losses", ml, gl, rtol=1e-5, atol=1e-6)
    ref = _unsharded_reference(rank, world, gloo)
    with OpsSeen() as seen:
        full = {n: p.full_tensor() for n, p in mm.named_parameters()}
    expect_ops(c, cat, "full_tensor", seen, "all_gather_into_tensor")
    gfull = {n: p.full_tensor() for n, p in gm.named_parameters()}
    for (n, a), (_, b), r in zip(mm.named_parameters(), gm.named_parameters(), ref.parameters()):
        c.equal(cat, f"{n} local shard", a.to_local(), b.to_local(), rtol=1e-5, atol=1e-6)
        c.equal(cat, f"{n} full_tensor vs gloo", full[n], gfull[n], rtol=1e-5, atol=1e-6)
        c.equal(cat, f"{n} full_tensor vs unsharded", full[n], r.detach(), rtol=1e-4, atol=1e-5)
        # FSDP2 shards dim 0 like torch.chunk
        c.equal(cat, f"{n} shard vs unsharded", a.to_local(),
                _chunk_or_empty(r.detach(), world, 0, rank), rtol=1e-4, atol=1e-5)


def _chunk_or_empty(t, world, dim, rank):
    chunks = torch.chunk(t, world, dim=dim)  # how DTensor shards; trailing ranks may get none
    return chunks[rank] if rank < len(chunks) else t.narrow(dim, 0, 0)


def _dtensor_ops(group, rank, world):
    """DTensor placements and functional collectives over `group`; returns {name: tensor}."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh.from_group(group, "cpu")
    full = torch.arange(world * 6 * 5, dtype=torch.float32).reshape(world * 6, 5)
    uneven = torch.arange((world * 3 + 1) * 4, dtype=torch.float64).reshape(world * 3 + 1, 4)
    out = {}
    d = distribute_tensor(full, mesh, [Shard(0)])  # scatter from rank 0
    out["shard"] = d.to_local()
    out["full_tensor"] = d.full_tensor()
    out["Shard->Replicate"] = d.redistribute(mesh, [Replicate()]).to_local()
    out["Shard(0)->Shard(1)"] = d.redistribute(mesh, [Shard(1)]).to_local()
    u = distribute_tensor(uneven, mesh, [Shard(0)])
    out["uneven shard"] = u.to_local()
    out["uneven full_tensor"] = u.full_tensor()
    part = DTensor.from_local(full * (rank + 1), mesh, [Partial()])
    out["Partial->Shard"] = part.redistribute(mesh, [Shard(0)]).to_local()
    out["Partial->Replicate"] = part.redistribute(mesh, [Replicate()]).to_local()
    ins = [full[rank].clone() * (rank + 1), uneven[:3].float().flatten() - rank]
    gathered = funcol.all_gather_into_tensor_coalesced(ins, group)
    for i, t in enumerate(gathered):
        out[f"all_gather_into_tensor_coalesced[{i}]"] = funcol.wait_tensor(t)
    scattered = funcol.reduce_scatter_tensor_coalesced(
        [full.clone() * (rank + 1), uneven[:world * 3].float() + rank], "sum", [0, 0], group)
    for i, t in enumerate(scattered):
        out[f"reduce_scatter_tensor_coalesced[{i}]"] = funcol.wait_tensor(t)
    return out


def check_dtensor(c, rank, world, gloo):
    """DTensor: distribute_tensor (scatter), full_tensor (all_gather_into_tensor, even and
    uneven shards), redistribution (reduce_scatter_tensor, all_reduce) and the coalesced
    functional collectives, each compared with the same calls over gloo and with the plain
    computation."""
    cat = "dtensor"
    with OpsSeen() as seen:
        mine = _dtensor_ops(dist.group.WORLD, rank, world)
    expect_ops(c, cat, "DTensor", seen, "scatter_", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_reduce", "all_gather_into_tensor_coalesced",
               "reduce_scatter_tensor_coalesced")
    theirs = _dtensor_ops(gloo, rank, world)
    c.expect(cat, "same results", sorted(mine) == sorted(theirs), f"{sorted(mine)} vs {sorted(theirs)}")
    for k in mine:
        if k in theirs:
            c.equal(cat, f"{k} vs gloo", mine[k], theirs[k])
    full = torch.arange(world * 6 * 5, dtype=torch.float32).reshape(world * 6, 5)
    uneven = torch.arange((world * 3 + 1) * 4, dtype=torch.float64).reshape(world * 3 + 1, 4)
    tri = sum(range(1, world + 1))
    c.equal(cat, "shard", mine["shard"], torch.chunk(full, world)[rank])
    c.equal(cat, "full_tensor", mine["full_tensor"], full)
    c.equal(cat, "Shard->Replicate", mine["Shard->Replicate"], full)
    c.equal(cat, "Shard(0)->Shard(1)", mine["Shard(0)->Shard(1)"],
            _chunk_or_empty(full, world, 1, rank))
    c.equal(cat, "uneven shard", mine["uneven shard"], torch.chunk(uneven, world)[rank])
    c.equal(cat, "uneven full_tensor", mine["uneven full_tensor"], uneven)
    c.equal(cat, "Partial->Shard", mine["Partial->Shard"], torch.chunk(full * tri, world)[rank])
    c.equal(cat, "Partial->Replicate", mine["Partial->Replicate"], full * tri)
    c.equal(cat, "all_gather_into_tensor_coalesced[0]", mine["all_gather_into_tensor_coalesced[0]"],
            torch.cat([full[r] * (r + 1) for r in range(world)]))
    c.equal(cat, "all_gather_into_tensor_coalesced[1]", mine["all_gather_into_tensor_coalesced[1]"],
            torch.cat([uneven[:3].float().flatten() - r for r in range(world)]))
    c.equal(cat, "reduce_scatter_tensor_coalesced[0]", mine["reduce_scatter_tensor_coalesced[0]"],
            torch.chunk(full * tri, world)[rank])
    c.equal(cat, "reduce_scatter_tensor_coalesced[1]", mine["reduce_scatter_tensor_coalesced[1]"],
            torch.chunk(uneven[:world * 3].float() * world + sum(range(world)), world)[rank])


def check_checkpoint(c, rank, world, gloo, ckpt_dir):
    """DCP save and load over mooncake (its planner runs gather_object/scatter_object_list,
    all_gather_object and broadcast), then the same checkpoint loaded over gloo: the state
    must be the same either way."""
    import torch.distributed.checkpoint as dcp

    cat = "checkpoint"
    model, _ = _train_fsdp(dist.group.WORLD, rank, steps=1)
    state = {"model": model.state_dict()}
    with OpsSeen() as seen:
        dcp.save(state, checkpoint_id=ckpt_dir, process_group=dist.group.WORLD)
        fresh = _fsdp_model(dist.group.WORLD)
        loaded = {"model": fresh.state_dict()}
        dcp.load(loaded, checkpoint_id=ckpt_dir, process_group=dist.group.WORLD)
    expect_ops(c, cat, "save/load", seen, "gather_", "scatter_")
    gfresh = _fsdp_model(gloo)
    gloaded = {"model": gfresh.state_dict()}
    dcp.load(gloaded, checkpoint_id=ckpt_dir, process_group=gloo)
    for k, v in state["model"].items():
        want = v.full_tensor()
        c.equal(cat, f"load {k}", loaded["model"][k].full_tensor(), want)
        c.equal(cat, f"load {k} over gloo", gloaded["model"][k].to_local(),
                loaded["model"][k].to_local())


# ---------------------------------------------------------------- objects, p2p


def _obj(rank):
    return {"rank": rank, "text": "x" * (10 + 37 * rank), "t": torch.arange(rank + 1)}


def _same(a, b):
    return a["rank"] == b["rank"] and a["text"] == b["text"] and torch.equal(a["t"], b["t"])


def check_objects(c, rank, world, gloo):
    cat = "objects"
    out = [None] * world
    dist.all_gather_object(out, _obj(rank))
    c.expect(cat, "all_gather_object", all(_same(out[r], _obj(r)) for r in range(world)), out)
    for src in range(world):
        lst = [_obj(rank), rank] if rank == src else [None, None]
        dist.broadcast_object_list(lst, src=src)
        c.expect(cat, f"broadcast_object_list src {src}",
                 _same(lst[0], _obj(src)) and lst[1] == src, lst)
    # send/recv_object_list around the ring.
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    box = [None]
    if rank % 2 == 0:
        dist.send_object_list([_obj(rank)], dst=nxt)
        dist.recv_object_list(box, src=prv)
    else:
        dist.recv_object_list(box, src=prv)
        dist.send_object_list([_obj(rank)], dst=nxt)
    c.expect(cat, "send/recv_object_list", _same(box[0], _obj(prv)), box)


def check_objects_rooted(c, rank, world, gloo):
    cat = "objects_rooted"
    for root in range(world):
        out = [None] * world if rank == root else None
        gout = [None] * world if rank == root else None
        with OpsSeen() as seen:
            dist.gather_object(_obj(rank), out, dst=root)
        dist.gather_object(_obj(rank), gout, dst=root, group=gloo)
        expect_ops(c, cat, "gather_object", seen, "gather_")
        if rank == root:
            c.expect(cat, f"gather_object dst {root}",
                     all(_same(out[r], _obj(r)) and _same(out[r], gout[r]) for r in range(world)),
                     out)
        box, gbox = [None], [None]
        objs = [_obj(r) for r in range(world)] if rank == root else None
        with OpsSeen() as seen:
            dist.scatter_object_list(box, objs, src=root)
        dist.scatter_object_list(gbox, objs, src=root, group=gloo)
        expect_ops(c, cat, "scatter_object_list", seen, "scatter_")
        c.expect(cat, f"scatter_object_list src {root}",
                 _same(box[0], _obj(rank)) and _same(box[0], gbox[0]), box)


def _payload(src, dst, k, n=1000):
    return torch.arange(n, dtype=torch.float32) * (src + 1) + 1000 * dst + 7 * k


def check_batch_p2p(c, rank, world, gloo):
    cat = "batch_p2p"
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for k in range(3):
        # Ring both ways, receives posted before sends.
        rl, rr = torch.empty(1000), torch.empty(1000)
        ops = [dist.P2POp(dist.irecv, rl, prv), dist.P2POp(dist.irecv, rr, nxt),
               dist.P2POp(dist.isend, _payload(rank, nxt, k), nxt),
               dist.P2POp(dist.isend, _payload(rank, prv, k), prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        c.equal(cat, f"ring from prev {k}", rl, _payload(prv, rank, k))
        c.equal(cat, f"ring from next {k}", rr, _payload(nxt, rank, k))
    # All pairs at once with tags, larger than the eager threshold for some.
    ops, got = [], {}
    for peer in range(world):
        if peer == rank:
            continue
        for tag, n in ((1, 10), (2, 300000)):
            got[(peer, tag)] = torch.empty(n)
            ops.append(dist.P2POp(dist.irecv, got[(peer, tag)], peer, tag=tag))
            ops.append(dist.P2POp(dist.isend, _payload(rank, peer, tag, n), peer, tag=tag))
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    for (peer, tag), t in got.items():
        c.equal(cat, f"all pairs from {peer} tag {tag}", t, _payload(peer, rank, tag, t.numel()))
    # Coalesced all_reduce through _coalescing_manager (allreduce_coalesced fast path).
    from torch.distributed.distributed_c10d import _coalescing_manager

    ts = [torch.full((5 + i,), float(rank + i)) for i in range(4)]
    with _coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    for i, t in enumerate(ts):
        c.equal(cat, f"coalesced all_reduce {i}", t,
                torch.full((5 + i,), float(sum(r + i for r in range(world)))))


# ---------------------------------------------------------------- async semantics


def check_async(c, rank, world, gloo):
    cat = "async"
    # 1. async_op=True returns before the peers have even issued the op: rank 0 reaches the
    #    gloo barrier (which the others pass only before joining the all_reduce) with it pending.
    t = torch.full((1000,), float(rank + 1))
    if rank == 0:
        w = dist.all_reduce(t, async_op=True)
        c.expect(cat, "pending right after issue", not w.is_completed(), "already complete")
        dist.barrier(group=gloo)
    else:
        dist.barrier(group=gloo)
        w = dist.all_reduce(t, async_op=True)
    w.wait()
    c.equal(cat, "result after wait", t, torch.full((1000,), float(world * (world + 1) // 2)))

    # 2. Work.wait(timeout) gives up after the timeout while the op stays in progress, and a
    #    later wait() completes it.
    t = torch.full((10,), float(rank))
    if rank == 0:
        w = dist.all_reduce(t, async_op=True)
        t0 = time.monotonic()
        try:
            w.wait(timeout=timedelta(milliseconds=300))
            c.expect(cat, "wait(timeout) raised", False, "returned without the peers")
        except RuntimeError as e:
            took = time.monotonic() - t0
            c.expect(cat, "wait(timeout) honours the timeout", 0.29 <= took < 5.0, f"{took:.3f}s")
            c.expect(cat, "wait(timeout) message", "timed out" in str(e).lower(), str(e))
        dist.barrier(group=gloo)
    else:
        dist.barrier(group=gloo)
        w = dist.all_reduce(t, async_op=True)
    c.expect(cat, "wait after timeout", w.wait(), "")
    c.equal(cat, "result after timed-out wait", t,
            torch.full((10,), float(world * (world - 1) // 2)))

    # 3. Many outstanding ops of mixed kinds and sizes: all results right, and once the last
    #    one is complete every earlier one is too (ops complete in issue order).
    works, expect = [], []
    for k in range(64):
        n = 1 + (k * 7919) % 50000
        if k % 3 == 2:
            out = torch.empty(n * world)
            works.append(dist.all_gather_into_tensor(out, torch.full((n,), float(k + rank)),
                                                     async_op=True))
            expect.append((out, torch.cat([torch.full((n,), float(k + r))
                                           for r in range(world)])))
        else:
            x = torch.full((n,), float(k * world + rank))
            works.append(dist.all_reduce(x, async_op=True))
            expect.append((x, torch.full((n,), float(sum(k * world + r for r in range(world))))))
    order, lock = [], threading.Lock()

    def record(k):
        with lock:
            order.append(k)

    # Futures only (Work.wait() would complete a work on this thread, ahead of its turn).
    cbs = [w.get_future().then(lambda f, k=k: record(k)) for k, w in enumerate(works)]
    works[-1].get_future().wait()
    done = [w.is_completed() for w in works]
    c.expect(cat, "earlier ops complete when the last is", all(done),
             f"incomplete: {[k for k, d in enumerate(done) if not d]}")
    for f in cbs:
        f.wait()
    c.expect(cat, "future callbacks ran in issue order", order == list(range(64)), order)
    for w in works:
        w.wait()
    for k, (got, exp) in enumerate(expect):
        c.equal(cat, f"outstanding op {k}", got, exp)


# ---------------------------------------------------------------- entry


CHECKS = {
    "ddp": check_ddp,
    "fsdp2": check_fsdp,
    "dtensor": check_dtensor,
    "objects": check_objects,
    "objects_rooted": check_objects_rooted,
    "batch_p2p": check_batch_p2p,
    "async": check_async,
}


def frameworks(rank, world, store_path, which):
    import mooncake  # noqa: F401

    store = dist.FileStore(store_path, world)
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    gloo = dist.new_group(backend="gloo")
    c, pending = Checks(), {}
    for name in which:
        if name == "checkpoint":
            ckpt = os.path.join(os.path.dirname(store_path), "ckpt")
            run_category(c, pending, name, lambda: check_checkpoint(c, rank, world, gloo, ckpt))
        else:
            run_category(c, pending, name, lambda: CHECKS[name](c, rank, world, gloo))
        dist.barrier(group=gloo)  # keeps a failed category from running into the next
    dist.destroy_process_group()
    return dict(c.result(), pending=pending)

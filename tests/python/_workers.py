"""Per-rank bodies of the torch-level tests. Every rank builds a mooncake default group and a
gloo group over the same ranks, runs each op on identical inputs through both and records
mismatches instead of raising, so all ranks keep issuing the same sequence of collectives.
Each function returns {"counts": {category: checks}, "failures": {category: [messages]}}."""

import traceback
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

R = dist.ReduceOp
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]
OPS = [R.SUM, R.AVG, R.PRODUCT, R.MIN, R.MAX]
SIZES = [0, 1, 1023, 1 << 20]
FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


class Checks:
    def __init__(self):
        self.counts = defaultdict(int)
        self.failures = defaultdict(list)

    def expect(self, cat, name, ok, detail=""):
        self.counts[cat] += 1
        if not ok:
            self.failures[cat].append(f"{name}: {detail}")

    def equal(self, cat, name, got, exp, rtol=0.0, atol=0.0):
        if got.dtype != exp.dtype or got.shape != exp.shape:
            return self.expect(cat, name, False, f"{got.dtype}{tuple(got.shape)} vs "
                                                 f"{exp.dtype}{tuple(exp.shape)}")
        if rtol == 0.0 and atol == 0.0:
            ok = torch.equal(got, exp)
        else:
            ok = torch.allclose(got.double(), exp.double(), rtol=rtol, atol=atol)
        detail = "" if ok else f"max diff {(got.double() - exp.double()).abs().max().item()}"
        self.expect(cat, name, ok, detail)

    def guard(self, cat, name, fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - recorded, and the sequence of ops goes on
            self.expect(cat, name, False, traceback.format_exc(limit=3))

    def result(self):
        return {"counts": dict(self.counts), "failures": dict(self.failures)}


def init(rank, world, store_path, timeout_s=60):
    import mooncake  # noqa: F401 - explicit registration (entry points are tested elsewhere)

    store = dist.FileStore(store_path, world)
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return dist.new_group(backend="gloo")


def make_input(dt, op, n, rank, seed):
    """Values whose sums/products are exact in every dtype, so results must be bit-identical."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    if dt == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if op == R.PRODUCT:
        vals = torch.tensor([1, 2]) if dt == torch.uint8 else torch.tensor([-2, -1, 1, 2])
        return vals[torch.randint(0, len(vals), (n,), generator=g)].to(dt)
    lo = 0 if dt == torch.uint8 else -8
    return torch.randint(lo, 9, (n,), generator=g).to(dt)


def gloo_supports(dt, op):
    if dt in FLOATS:
        return True
    return dt != torch.int16 and op != R.AVG


def gather_bytes(x, world, gloo):
    """All ranks' x via gloo, moved as bytes (gloo lacks some dtypes)."""
    raw = x.contiguous().view(torch.uint8) if x.numel() else torch.empty(0, dtype=torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(parts, raw, group=gloo)
    return [p.view(x.dtype) if x.numel() else torch.empty(0, dtype=x.dtype) for p in parts]


def reference_allreduce(x, op, world, gloo):
    if gloo_supports(x.dtype, op):
        ref = x.clone()
        dist.all_reduce(ref, op=op, group=gloo)
        return ref
    # gloo cannot reduce this dtype x op: reduce gloo-gathered inputs locally instead.
    s = torch.stack(gather_bytes(x, world, gloo)).to(torch.int64)
    if op == R.SUM:
        return s.sum(0).to(x.dtype)
    if op == R.AVG:  # integer AVG truncates, as documented by the engine
        return torch.div(s.sum(0), world, rounding_mode="trunc").to(x.dtype)
    if op == R.PRODUCT:
        return s.prod(0).to(x.dtype)
    return (s.amin(0) if op == R.MIN else s.amax(0)).to(x.dtype)


def check_allreduce(c, rank, world, gloo):
    seed = 0
    for dt in DTYPES:
        for op in OPS:
            if dt == torch.bool and op == R.AVG:
                continue  # checked in check_validation: rejected before any data moves
            for n in SIZES:
                seed += 1
                name = f"allreduce {dt} {op} n={n}"
                x = make_input(dt, op, n, rank, seed)

                def body(x=x, op=op, name=name, dt=dt):
                    got = x.clone()
                    dist.all_reduce(got, op=op)
                    ref = reference_allreduce(x, op, world, gloo)
                    # AVG of floats divides: same IEEE result unless rounded differently.
                    tol = (1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-6) \
                        if (op == R.AVG and dt in FLOATS) else 0.0
                    c.equal("allreduce", name, got, ref, rtol=tol, atol=tol)
                c.guard("allreduce", name, body)
    # Random floats: summation order may legitimately differ from gloo's.
    for dt, n in [(torch.float32, 1023), (torch.float32, 1 << 20), (torch.float64, 4097)]:
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(n, generator=g, dtype=dt)
        got, ref = x.clone(), x.clone()
        dist.all_reduce(got)
        dist.all_reduce(ref, group=gloo)
        c.equal("allreduce", f"random {dt} n={n}", got, ref, rtol=1e-5, atol=1e-5)


def check_async_and_futures(c, rank, world, gloo):
    xs = [make_input(dt, R.SUM, n, rank, 500 + i)
          for i, (dt, n) in enumerate([(torch.float32, 1023), (torch.int64, 1 << 16),
                                       (torch.bfloat16, 7), (torch.int32, 0)])]
    gots = [x.clone() for x in xs]
    works = [dist.all_reduce(g, async_op=True) for g in gots]  # all in flight at once
    for w in works:
        w.wait()
        c.expect("async", "is_completed after wait", w.is_completed())
        c.expect("async", "is_success after wait", w.is_success())
    for i, (x, got) in enumerate(zip(xs, gots)):
        ref = reference_allreduce(x, R.SUM, world, gloo)
        c.equal("async", f"async allreduce #{i}", got, ref)
        c.equal("async", f"result() #{i}", works[i].result()[0], ref)

    # getFuture(): value is the output TensorList (what DDP comm hooks consume).
    x = make_input(torch.float32, R.SUM, 33, rank, 600)
    ref = reference_allreduce(x, R.SUM, world, gloo)
    got = x.clone()
    fut = dist.all_reduce(got, async_op=True).get_future()
    chained = fut.then(lambda f: f.value()[0] * 2)
    c.equal("future", "future value", fut.wait()[0], ref)
    c.equal("future", "then() value", chained.wait(), ref * 2)

    # A callback that itself runs a blocking collective must not stall completion.
    y = make_input(torch.int64, R.SUM, 5, rank, 601)
    yref = reference_allreduce(y, R.SUM, world, gloo)

    def nested(f):
        t = f.value()[0].clone()
        dist.all_reduce(t)
        return t
    out = dist.all_reduce(y.clone(), async_op=True).get_future().then(nested).wait()
    c.equal("future", "collective inside then()", out, yref * world)

    outs = [torch.empty(4, dtype=torch.int32) for _ in range(world)]
    mine = torch.full((4,), rank, dtype=torch.int32)
    value = dist.all_gather(outs, mine, async_op=True).get_future().wait()
    c.expect("future", "allgather future holds the outputs",
             len(value) == world and all(torch.equal(v, torch.full((4,), r, dtype=torch.int32))
                                         for r, v in enumerate(value)), str(value))


def check_gather_broadcast(c, rank, world, gloo):
    seed = 1000
    for dt in DTYPES:
        for n in SIZES:
            seed += 1
            per_rank = n // world if n >= 1 << 20 else n  # keep the 1M case at ~1M total
            x = make_input(dt, R.SUM, per_rank, rank, seed)
            ref = gather_bytes(x, world, gloo)

            def ag(x=x, ref=ref, dt=dt, n=n):
                outs = [torch.full_like(x, 1) for _ in range(world)]
                dist.all_gather(outs, x)
                for r in range(world):
                    c.equal("allgather", f"all_gather {dt} n={n} block {r}", outs[r], ref[r])
                flat = torch.empty(world * x.numel(), dtype=dt)
                dist.all_gather_into_tensor(flat, x)
                c.equal("allgather", f"all_gather_into_tensor {dt} n={n}", flat,
                        torch.cat(ref) if x.numel() else flat.new_empty(0))
            c.guard("allgather", f"allgather {dt} n={n}", ag)

            root = seed % world

            def bc(x=x, root=root, dt=dt, n=n):
                got = x.clone()
                dist.broadcast(got, src=root)
                exp = ref[root]  # gloo-gathered bytes of the root's input
                c.equal("broadcast", f"broadcast {dt} n={n} root={root}", got, exp)
            c.guard("broadcast", f"broadcast {dt} n={n}", bc)
    for _ in range(3):
        dist.barrier()
        c.expect("barrier", "barrier returned", True)


def check_reduce_scatter(c, rank, world, gloo):
    """reduce_scatter_tensor against the matching block of a gloo (or local) allreduce."""
    seed = 5000
    for dt in DTYPES:
        for op in OPS:
            if dt == torch.bool and op == R.AVG:
                continue
            for per_rank in (0, 1, 1023):
                seed += 1
                name = f"reduce_scatter_tensor {dt} {op} per_rank={per_rank}"
                x = make_input(dt, op, per_rank * world, rank, seed)

                def body(x=x, op=op, name=name, dt=dt, per_rank=per_rank):
                    got = torch.full((per_rank,), 1, dtype=dt)
                    dist.reduce_scatter_tensor(got, x, op=op)
                    ref = reference_allreduce(x, op, world, gloo)
                    exp = ref[rank * per_rank:(rank + 1) * per_rank]
                    tol = (1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-6) \
                        if (op == R.AVG and dt in FLOATS) else 0.0
                    c.equal("reduce_scatter", name, got, exp, rtol=tol, atol=tol)
                c.guard("reduce_scatter", name, body)


def check_noncontiguous(c, rank, world, gloo):
    g = torch.Generator().manual_seed(rank)
    base = torch.randint(-8, 9, (64, 30), generator=g).float()
    image = torch.randint(0, 5, (2, 3, 4, 5), generator=g).float()
    views = {  # each call returns a fresh non-contiguous tensor holding this rank's values
        "strided": lambda: base.clone()[:, ::3],
        "transposed": lambda: base.clone().t(),
        "channels_last": lambda: image.contiguous(memory_format=torch.channels_last),
    }
    for name, make in views.items():
        # gloo mishandles strided views (reduces the underlying storage), so its reference
        # runs on a contiguous copy.
        got, ref = make(), make().contiguous()
        assert not got.is_contiguous()
        dist.all_reduce(got)
        dist.all_reduce(ref, group=gloo)
        c.equal("noncontig", f"allreduce {name}", got, ref)
        c.expect("noncontig", f"allreduce {name} kept its strides", not got.is_contiguous())
        b, bref = make(), make().contiguous()
        dist.broadcast(b, src=world - 1)
        dist.broadcast(bref, src=world - 1, group=gloo)
        c.equal("noncontig", f"broadcast {name}", b, bref)

    x = base[:, ::3]
    outs = [torch.zeros(30, 64).t() for _ in range(world)]  # non-contiguous outputs
    refs = [torch.zeros(64, 10) for _ in range(world)]
    dist.all_gather([o[:, :10] for o in outs], x)
    dist.all_gather(refs, x.contiguous(), group=gloo)
    for r in range(world):
        c.equal("noncontig", f"all_gather non-contiguous out {r}", outs[r][:, :10], refs[r])
    flat = torch.zeros(2, world * x.numel())[0]  # contiguous row view of a larger buffer
    dist.all_gather_into_tensor(flat, x)
    c.equal("noncontig", "all_gather_into_tensor non-contiguous in", flat,
            torch.cat([r.reshape(-1) for r in refs]))

    # allreduce_coalesced: one flat engine call, results copied back into each tensor.
    ts = [make_input(torch.float32, R.SUM, n, rank, 900 + n) for n in (3, 0, 17, 1)]
    ts.append(base.clone()[:, ::3])
    refs = [t.clone() for t in ts]
    dist.all_reduce_coalesced(ts)
    dist.all_reduce_coalesced(refs, group=gloo)
    for i, (t, r) in enumerate(zip(ts, refs)):
        c.equal("coalesced", f"all_reduce_coalesced tensor {i}", t, r)


def check_p2p(c, rank, world, gloo):
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    # Two messages to the same peer, received in the opposite order: matched by tag.
    a = torch.full((5,), 100 + rank, dtype=torch.int64)
    b = torch.arange(1023, dtype=torch.float32) + rank
    ra, rb = torch.empty_like(a), torch.empty(1023)
    works = [dist.isend(a, nxt, tag=11), dist.isend(b, nxt, tag=12),
             dist.irecv(rb, prv, tag=12), dist.irecv(ra, prv, tag=11)]
    for w in works:
        w.wait()
    c.equal("p2p", "tag 11", ra, torch.full((5,), 100 + prv, dtype=torch.int64))
    c.equal("p2p", "tag 12", rb, torch.arange(1023, dtype=torch.float32) + prv)

    # Same exchange through gloo must agree.
    ga, gb = torch.empty_like(a), torch.empty(1023)
    ws = [dist.isend(a, nxt, group=gloo, tag=11), dist.isend(b, nxt, group=gloo, tag=12),
          dist.irecv(gb, prv, group=gloo, tag=12), dist.irecv(ga, prv, group=gloo, tag=11)]
    for w in ws:
        w.wait()
    c.equal("p2p", "tag 11 vs gloo", ra, ga)
    c.equal("p2p", "tag 12 vs gloo", rb, gb)

    # Non-contiguous recv target and a large message.
    big = torch.arange(1 << 20, dtype=torch.float64) * (rank + 1)
    dst = torch.zeros(2, 1 << 20, dtype=torch.float64).t()[:, 0]  # stride 2
    ws = [dist.isend(big, nxt, tag=3), dist.irecv(dst, prv, tag=3)]
    for w in ws:
        w.wait()
    c.equal("p2p", "large non-contiguous recv", dst,
            torch.arange(1 << 20, dtype=torch.float64) * (prv + 1))



def check_validation(c, rank, world, gloo):
    """Errors raised by the shim before anything reaches the engine (so every rank raises the
    same error and the communicator stays usable)."""
    pg = dist.distributed_c10d._get_default_group()

    def raises(name, exc, fn, words=("rank", )):
        try:
            fn()
        except exc as e:
            msg = str(e)
            ok = all(w.lower() in msg.lower() for w in words)
            c.expect("validation", name, ok, f"message: {msg}")
            return
        except Exception as e:  # noqa: BLE001
            return c.expect("validation", name, False, f"raised {type(e).__name__}: {e}")
        c.expect("validation", name, False, "did not raise")

    raises("float8 allreduce", TypeError,
           lambda: dist.all_reduce(torch.ones(4, dtype=torch.float8_e4m3fn)),
           ("rank", "allreduce", "dtype"))
    raises("uint32 allreduce", TypeError,
           lambda: dist.all_reduce(torch.ones(4, dtype=torch.uint32)), ("rank", "allreduce"))
    raises("complex broadcast", TypeError,
           lambda: pg.broadcast([torch.ones(4, dtype=torch.complex64)]).wait(),
           ("rank", "broadcast"))
    raises("BAND", ValueError, lambda: dist.all_reduce(torch.ones(4, dtype=torch.int32),
                                                       op=R.BAND), ("rank", "BAND"))
    raises("BXOR", ValueError, lambda: dist.all_reduce(torch.ones(4, dtype=torch.int32),
                                                       op=R.BXOR), ("rank", "BXOR"))
    raises("bool AVG", TypeError, lambda: dist.all_reduce(torch.ones(4, dtype=torch.bool),
                                                          op=R.AVG), ("rank", "avg", "Bool"))
    raises("meta output", ValueError,
           lambda: dist.all_gather([torch.empty(2, device="meta") for _ in range(world)],
                                   torch.ones(2)), ("rank", "allgather", "meta"))
    raises("two tensors", ValueError, lambda: pg.allreduce([torch.ones(2), torch.ones(2)]).wait(),
           ("rank", "allreduce", "one tensor"))
    raises("allgather list length", ValueError,
           lambda: dist.all_gather([torch.empty(2) for _ in range(world + 1)], torch.ones(2)),
           ("rank", "allgather"))
    raises("allgather output size", ValueError,
           lambda: dist.all_gather([torch.empty(3)] + [torch.empty(2)] * (world - 1),
                                   torch.ones(2)), ("rank", "allgather", "elements"))
    # torch itself rejects mixed dtypes first (ValueError); the shim's TypeError backs it up.
    raises("allgather dtype", (TypeError, ValueError),
           lambda: dist.all_gather([torch.empty(2, dtype=torch.int32) for _ in range(world)],
                                   torch.ones(2)), ("dtype",))
    raises("sparse", ValueError, lambda: dist.all_reduce(torch.ones(3).to_sparse()),
           ("rank", "allreduce"))
    # Still usable afterwards.
    t = torch.ones(3)
    dist.all_reduce(t)
    c.equal("validation", "allreduce after errors", t, torch.full((3,), float(world)))


def check_ddp(c, rank, world, gloo):
    def train(group):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        ddp = DDP(model, process_group=group)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(10 + rank)
        losses = []
        for _ in range(6):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=torch.float64), [p.detach().clone()
                                                           for p in model.parameters()]

    mc_losses, mc_params = train(dist.group.WORLD)
    gl_losses, gl_params = train(gloo)
    # With more than 2 ranks gradients may be summed in a different order than gloo's.
    c.equal("ddp", "per-step losses", mc_losses, gl_losses, rtol=1e-6, atol=1e-7)
    for i, (a, b) in enumerate(zip(mc_params, gl_params)):
        c.equal("ddp", f"param {i}", a, b, rtol=1e-5, atol=1e-6)


def battery(rank, world, store_path):
    gloo = init(rank, world, store_path)
    c = Checks()
    for check in (check_allreduce, check_async_and_futures, check_gather_broadcast,
                  check_reduce_scatter, check_noncontiguous, check_p2p, check_validation, check_ddp):
        c.guard(check.__name__, check.__name__, lambda check=check: check(c, rank, world, gloo))
    be = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    c.expect("info", "backend name", dist.get_backend() == "mooncake", dist.get_backend())
    c.expect("info", "transport reported", bool(be.transport()), repr(be.transport()))
    dist.destroy_process_group()
    return c.result()


def anysource(rank, world, store_path, transport):
    """recv(src=None): rank 0 receives one tagged message from every other rank, after a
    tagged exchange has already used the same peers."""
    import os

    if transport:
        os.environ["MC_TRANSPORT"] = transport
    init(rank, world, store_path, timeout_s=15)
    c = Checks()
    be = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    if transport:
        c.expect("anysource", "transport in use", transport in be.transport(), be.transport())
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    a, ra = torch.full((5,), rank, dtype=torch.int64), torch.empty(5, dtype=torch.int64)
    for w in [dist.isend(a, nxt, tag=11), dist.irecv(ra, prv, tag=11)]:
        w.wait()
    c.equal("anysource", "warm-up exchange", ra, torch.full((5,), prv, dtype=torch.int64))
    c.guard("anysource", "recv from any source", lambda: _anysource_body(c, rank, world))
    dist.destroy_process_group()
    return c.result()


def _anysource_body(c, rank, world):
    if rank == 0:
        seen = {}
        for _ in range(world - 1):
            t = torch.empty(3, dtype=torch.int32)
            src = dist.recv(t, tag=21)
            seen[src] = t
        c.expect("anysource", "every sender seen once", sorted(seen) == list(range(1, world)),
                 str(sorted(seen)))
        for src, t in seen.items():
            c.equal("anysource", f"payload from {src}", t, torch.full((3,), src, dtype=torch.int32))
    else:
        dist.send(torch.full((3,), rank, dtype=torch.int32), 0, tag=21)
        c.expect("anysource", "sent", True)
    dist.barrier()


def mismatch(rank, world, store_path, timeout_s):
    """Ranks call allreduce with different sizes: every rank must get DistBackendError within
    the communicator timeout, and the process must be able to shut down cleanly."""
    import time

    gloo = init(rank, world, store_path, timeout_s=timeout_s)
    c = Checks()

    # Work.wait(timeout) on a recv nobody sends yet: times out, the op stays pending.
    if rank == 0:
        t = torch.zeros(4)
        w = dist.irecv(t, 1, tag=7)
        t0 = time.monotonic()
        try:
            w.wait(timedelta(seconds=1))
            c.expect("wait_timeout", "wait(1s) raised", False, "returned")
        except dist.DistBackendError as e:
            c.expect("wait_timeout", "wait(1s) raised timed out", "timed out" in str(e), str(e))
        c.expect("wait_timeout", "wait(1s) returned in time", time.monotonic() - t0 < 5)
        dist.barrier(group=gloo)  # now let rank 1 send
        w.wait()
        c.equal("wait_timeout", "recv completes later", t, torch.full((4,), 7.0))
    else:
        dist.barrier(group=gloo)
        if rank == 1:
            dist.send(torch.full((4,), 7.0), 0, tag=7)
        c.expect("wait_timeout", "sent", True)

    x = torch.ones(10 + 10 * rank)
    t0 = time.monotonic()
    try:
        dist.all_reduce(x)
        c.expect("mismatch", "allreduce with mismatched sizes raised", False, "returned")
    except dist.DistBackendError as e:
        elapsed = time.monotonic() - t0
        msg = str(e)
        c.expect("mismatch", "error names rank and op", "rank" in msg and "allreduce" in msg, msg)
        c.expect("mismatch", f"raised within timeout ({elapsed:.1f}s)", elapsed < timeout_s + 5)
    t0 = time.monotonic()
    dist.destroy_process_group()
    c.expect("mismatch", "destroy_process_group is prompt", time.monotonic() - t0 < 10)
    return c.result()


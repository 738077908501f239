"""Per-rank bodies of the torch-level tests. Every rank builds a mooncake default group and a
gloo group over the same ranks, runs each op on identical inputs through both and records
mismatches instead of raising, so all ranks keep issuing the same sequence of collectives.
Each function returns {"counts": {category: checks}, "failures": {category: [messages]}}."""

import math
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



# ---- reduce, gather, scatter, all-to-all, new reduce ops and dtypes -------------------------

COMPLEX = [torch.complex64, torch.complex128]
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.float8_e8m0fnu]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
BITWISE = [R.BAND, R.BOR, R.BXOR]


def make_any(dt, op, n, rank, seed):
    """make_input, extended to complex (exact parts) and float8 (arbitrary bytes)."""
    if dt in COMPLEX:
        part = torch.float32 if dt == torch.complex64 else torch.float64
        return torch.complex(make_input(part, op, n, rank, seed),
                             make_input(part, op, n, rank, seed + 99991))
    if dt in FLOAT8:
        g = torch.Generator().manual_seed(seed * 7919 + rank)
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dt)
    return make_input(dt, op, n, rank, seed)


def local_reduction(xs, op, world):
    """Plain torch computation of op over the list of every rank's tensor."""
    import functools
    dt = xs[0].dtype
    if op in BITWISE:
        fn = {R.BAND: torch.bitwise_and, R.BOR: torch.bitwise_or, R.BXOR: torch.bitwise_xor}[op]
        return functools.reduce(fn, xs)
    s = torch.stack(xs)
    if dt in COMPLEX:
        if op == R.PRODUCT:
            return functools.reduce(torch.mul, xs)
        total = s.sum(0)
        return total / world if op == R.AVG else total
    if dt == torch.bool:
        return s.any(0) if op in (R.SUM, R.MAX) else s.all(0)
    if dt in FLOATS:  # exact inputs: float64 holds every partial result exactly
        d = s.double()
        r = {R.SUM: d.sum(0), R.AVG: d.sum(0) / world, R.PRODUCT: d.prod(0),
             R.MIN: d.amin(0), R.MAX: d.amax(0)}[op]
        return r.to(dt)
    i = s.to(torch.int64)
    r = {R.SUM: i.sum(0), R.AVG: torch.div(i.sum(0), world, rounding_mode="trunc"),
         R.PRODUCT: i.prod(0), R.MIN: i.amin(0), R.MAX: i.amax(0)}[op]
    return r.to(dt)


def avg_tol(dt, op):
    if op != R.AVG or dt not in FLOATS | set(COMPLEX):
        return 0.0
    return 1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-6


def equal_any(c, cat, name, got, exp, tol=0.0):
    if got.is_complex() and tol:
        return c.equal(cat, name, torch.view_as_real(got), torch.view_as_real(exp), tol, tol)
    if got.dtype in FLOAT8:  # no comparison kernels for float8: compare the bytes
        return c.equal(cat, name, got.view(torch.uint8), exp.view(torch.uint8))
    c.equal(cat, name, got, exp, rtol=tol, atol=tol)


def check_reduce(c, rank, world, gloo):
    """dist.reduce to every root, every dtype x op (new ops included), vs a plain computation;
    gloo's reduce too where it supports the op."""
    seed = 7000
    for dt in DTYPES + COMPLEX:
        ops = OPS + (BITWISE if dt in INTS or dt == torch.bool else [])
        for op in ops:
            if (dt == torch.bool and op == R.AVG) or (dt in COMPLEX and op in (R.MIN, R.MAX)):
                continue
            for n in (0, 7, 1 << 15):
                seed += 1
                root = seed % world
                name = f"reduce {dt} {op} n={n} root={root}"
                x = make_any(dt, op, n, rank, seed)
                allx = gather_bytes(x, world, gloo)  # collective: every rank, outside body

                def body(x=x, op=op, root=root, name=name, dt=dt, allx=allx):
                    got = x.clone()
                    dist.reduce(got, dst=root, op=op)
                    if rank == root:
                        exp = local_reduction(allx, op, world)
                        equal_any(c, "reduce", name, got, exp, avg_tol(dt, op))
                    else:
                        c.equal("reduce", name + " (non-root unchanged)", got, x)
                    if dt in (torch.float32, torch.int64) and op in (R.SUM, R.MAX):
                        ref = x.clone()  # gloo leaves partial sums on non-roots: root only
                        dist.reduce(ref, dst=root, op=op, group=gloo)
                        if rank == root:
                            c.equal("reduce", name + " vs gloo", got, ref)
                c.guard("reduce", name, body)


def check_gather_scatter(c, rank, world, gloo):
    seed = 8000
    for dt in DTYPES + COMPLEX + FLOAT8:
        for n in (0, 5, 1 << 14):
            seed += 1
            root = seed % world
            x = make_any(dt, R.SUM, n, rank, seed)
            allx = gather_bytes(x, world, gloo)

            def gat(x=x, root=root, dt=dt, n=n, allx=allx):
                outs = [torch.full_like(x, 0) for _ in range(world)] if rank == root else None
                dist.gather(x, outs, dst=root)
                if rank == root:
                    for r in range(world):
                        equal_any(c, "gather", f"gather {dt} n={n} root={root} block {r}",
                                  outs[r], allx[r])
                if dt == torch.float32:
                    refs = [torch.zeros_like(x) for _ in range(world)] if rank == root else None
                    dist.gather(x, refs, dst=root, group=gloo)
                    if rank == root:
                        for r in range(world):
                            c.equal("gather", f"gather {dt} n={n} vs gloo {r}", outs[r], refs[r])
            c.guard("gather", f"gather {dt} n={n}", gat)

            def sca(dt=dt, n=n, root=root, allx=allx):
                # root scatters every rank's input (as gathered): rank r gets allx[r]
                got = torch.full_like(allx[rank], 0)
                dist.scatter(got, list(allx) if rank == root else None, src=root)
                equal_any(c, "scatter", f"scatter {dt} n={n} root={root}", got, allx[rank])
                if dt == torch.float32:
                    ref = torch.zeros_like(got)
                    dist.scatter(ref, list(allx) if rank == root else None, src=root, group=gloo)
                    c.equal("scatter", f"scatter {dt} n={n} vs gloo", got, ref)
            c.guard("scatter", f"scatter {dt} n={n}", sca)


def uneven_splits(world, k):
    """splits[i][j]: rows rank i sends to rank j (zeros included)."""
    return [[0 if (i + 2 * j + k) % 3 == 0 else (i * 5 + j * 3 + k) % 7 + (k * 100 if k == 2 else 0)
             for j in range(world)] for i in range(world)]


def check_alltoall(c, rank, world, gloo):
    seed = 9000
    for dt in DTYPES + COMPLEX + FLOAT8:
        seed += 1
        rows = 3
        x = make_any(dt, R.SUM, world * rows * 4, rank, seed).view(world * rows, 4)
        allx = [t.view(world * rows, 4) for t in gather_bytes(x, world, gloo)]
        exp = torch.cat([allx[r][rank * rows:(rank + 1) * rows] for r in range(world)])

        def single(x=x, dt=dt, exp=exp):
            got = torch.empty_like(x)
            dist.all_to_all_single(got, x)
            equal_any(c, "alltoall", f"all_to_all_single {dt} equal", got, exp)
            ins = list(x.chunk(world))
            outs = [torch.empty_like(t) for t in ins]
            dist.all_to_all(outs, ins)
            equal_any(c, "alltoall", f"all_to_all list {dt}", torch.cat(outs), exp)
        c.guard("alltoall", f"alltoall {dt}", single)

        for k in range(3):
            splits = uneven_splits(world, k)
            send = splits[rank]
            recv = [splits[j][rank] for j in range(world)]
            y = make_any(dt, R.SUM, sum(send) * 2, rank, seed + 50 + k).view(sum(send), 2)
            # inputs differ in size per rank: rebuild every rank's input locally (deterministic)
            ally = [make_any(dt, R.SUM, sum(splits[j]) * 2, j, seed + 50 + k).view(-1, 2)
                    for j in range(world)]
            offs = [[sum(splits[i][:j]) for j in range(world)] for i in range(world)]
            exp_v = torch.cat([ally[j][offs[j][rank]:offs[j][rank] + splits[j][rank]]
                               for j in range(world)])

            def uneven(y=y, send=send, recv=recv, dt=dt, k=k, exp_v=exp_v):
                got = torch.full((sum(recv), 2), 0, dtype=torch.uint8).view(dt) \
                    if dt in FLOAT8 else torch.zeros(sum(recv), 2, dtype=dt)
                dist.all_to_all_single(got, y, output_split_sizes=recv, input_split_sizes=send)
                equal_any(c, "alltoall", f"all_to_all_single {dt} uneven #{k}", got, exp_v)
                if dt == torch.float32:
                    ref = torch.zeros_like(got)
                    dist.all_to_all_single(ref, y, recv, send, group=gloo)
                    c.equal("alltoall", f"all_to_all_single uneven #{k} vs gloo", got, ref)
                outs = [torch.empty(r, 2, dtype=dt) for r in recv]
                dist.all_to_all(outs, list(y.split(send)))
                equal_any(c, "alltoall", f"all_to_all list {dt} uneven #{k}", torch.cat(outs),
                          exp_v)
            c.guard("alltoall", f"alltoall uneven {dt} #{k}", uneven)


def check_new_ops(c, rank, world, gloo):
    """BAND/BOR/BXOR, PREMUL_SUM (double and tensor factor), complex dtypes through allreduce,
    reduce_scatter and reduce; float8 through broadcast and send/recv."""
    seed = 11000
    for dt in INTS + [torch.bool]:
        for op in BITWISE:
            seed += 1
            x = make_input(dt, R.SUM, 1023, rank, seed)
            exp = local_reduction(gather_bytes(x, world, gloo), op, world)

            def bw(x=x, op=op, dt=dt, exp=exp):
                got = x.clone()
                dist.all_reduce(got, op=op)
                c.equal("bitwise", f"all_reduce {dt} {op}", got, exp)
                out = torch.empty(1023 // world if 1023 % world == 0 else 0, dtype=dt)
                xin = x[:out.numel() * world]
                dist.reduce_scatter_tensor(out, xin, op=op)
                c.equal("bitwise", f"reduce_scatter_tensor {dt} {op}", out,
                        exp[rank * out.numel():(rank + 1) * out.numel()])
                if dt != torch.bool and dt != torch.int16:
                    ref = x.clone()
                    dist.all_reduce(ref, op=op, group=gloo)
                    c.equal("bitwise", f"all_reduce {dt} {op} vs gloo", got, ref)
            c.guard("bitwise", f"bitwise {dt} {op}", bw)

    for dt in sorted(FLOATS, key=str):
        for kind in ("double", "tensor"):
            seed += 1
            factor = 0.5 * (rank + 1)  # per-rank factors, exact in every float dtype
            op = dist._make_nccl_premul_sum(factor if kind == "double" else
                                            torch.tensor([factor], dtype=torch.float64))
            per = 16
            x = make_input(dt, R.SUM, per * world, rank, seed)
            scaled = gather_bytes(x * factor, world, gloo)  # torch's own x * factor
            exp = local_reduction(scaled, R.SUM, world)

            def pm(x=x, op=op, dt=dt, kind=kind, exp=exp):
                got = x.clone()
                dist.all_reduce(got, op=op)
                c.equal("premul", f"all_reduce {dt} premul ({kind})", got, exp)
                out = torch.empty(per, dtype=dt)
                dist.reduce_scatter_tensor(out, x, op=op)
                c.equal("premul", f"reduce_scatter_tensor {dt} premul ({kind})", out,
                        exp[rank * per:(rank + 1) * per])
                red = x.clone()
                dist.reduce(red, dst=world - 1, op=op)
                if rank == world - 1:
                    c.equal("premul", f"reduce {dt} premul ({kind})", red, exp)
            c.guard("premul", f"premul {dt} {kind}", pm)

    for dt in COMPLEX:
        for op in (R.SUM, R.AVG, R.PRODUCT):
            seed += 1
            x = make_any(dt, op, 64 * world, rank, seed)
            exp = local_reduction(gather_bytes(x, world, gloo), op, world)

            def cx(x=x, op=op, dt=dt, exp=exp):
                got = x.clone()
                # torch's frontend refuses complex PRODUCT in all_reduce; the process group
                # itself takes it
                dist.distributed_c10d._get_default_group().allreduce([got], op).wait()
                equal_any(c, "complex", f"all_reduce {dt} {op}", got, exp, avg_tol(dt, op))
                out = torch.empty(64, dtype=dt)
                dist.reduce_scatter_tensor(out, x, op=op)
                equal_any(c, "complex", f"reduce_scatter_tensor {dt} {op}", out,
                          exp[rank * 64:(rank + 1) * 64], avg_tol(dt, op))
                if op == R.SUM:
                    ref = x.clone()
                    dist.all_reduce(ref, group=gloo)
                    c.equal("complex", f"all_reduce {dt} vs gloo", got, ref)
            c.guard("complex", f"complex {dt} {op}", cx)

    for dt in FLOAT8:
        seed += 1
        x = make_any(dt, R.SUM, 1000, rank, seed)
        allx = gather_bytes(x, world, gloo)

        def f8(x=x, dt=dt, allx=allx):
            got = x.clone()
            dist.broadcast(got, src=world - 1)
            equal_any(c, "float8", f"broadcast {dt}", got, allx[world - 1])
            flat = torch.empty(world * 1000, dtype=torch.uint8).view(dt)
            dist.all_gather_into_tensor(flat, x)
            equal_any(c, "float8", f"all_gather_into_tensor {dt}", flat, torch.cat(
                [a.view(torch.uint8) for a in allx]).view(dt))
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            r = torch.empty(1000, dtype=torch.uint8).view(dt)
            for w in [dist.isend(x, nxt, tag=5), dist.irecv(r, prv, tag=5)]:
                w.wait()
            equal_any(c, "float8", f"send/recv {dt}", r, allx[prv])
        c.guard("float8", f"float8 {dt}", f8)


def check_list_forms(c, rank, world, gloo):
    """reduce_scatter (list), and the coalesced tensor forms (via the coalescing manager)."""
    seed = 12000
    for dt in (torch.float32, torch.int64, torch.bfloat16):
        seed += 1
        ins = [make_input(dt, R.SUM, 37, rank, seed + j) for j in range(world)]
        out = torch.zeros(37, dtype=dt)
        dist.reduce_scatter(out, ins)
        allin = gather_bytes(torch.cat(ins), world, gloo)
        exp = local_reduction([a[rank * 37:(rank + 1) * 37] for a in allin], R.SUM, world)
        c.equal("coalesced", f"reduce_scatter list {dt}", out, exp)
        if dt != torch.bfloat16:
            ref = torch.zeros(37, dtype=dt)
            dist.reduce_scatter(ref, [t.clone() for t in ins], group=gloo)
            c.equal("coalesced", f"reduce_scatter list {dt} vs gloo", out, ref)

    from torch.distributed.distributed_c10d import _coalescing_manager
    sizes = [3, 0, 17]
    ins = [make_input(torch.float32, R.SUM, n, rank, 12100 + n) for n in sizes]
    outs = [torch.zeros(n * world) for n in sizes]
    outs[2] = torch.zeros(2, sizes[2] * world)[0]  # a row view of a larger buffer
    with _coalescing_manager(async_ops=True) as cm:
        for o, i in zip(outs, ins):
            dist.all_gather_into_tensor(o, i)
    cm.wait()
    for j, (o, i) in enumerate(zip(outs, ins)):
        exp = torch.cat(gather_bytes(i, world, gloo)) if i.numel() else o.new_empty(0)
        c.equal("coalesced", f"all_gather_into_tensor coalesced #{j}", o, exp)

    rins = [make_input(torch.int32, R.SUM, n * world, rank, 12200 + n) for n in sizes]
    routs = [torch.zeros(n, dtype=torch.int32) for n in sizes]
    with _coalescing_manager(async_ops=True) as cm:
        for o, i in zip(routs, rins):
            dist.reduce_scatter_tensor(o, i, op=R.MAX)
    cm.wait()
    for j, (o, i) in enumerate(zip(routs, rins)):
        exp = local_reduction(gather_bytes(i, world, gloo), R.MAX, world)
        c.equal("coalesced", f"reduce_scatter_tensor coalesced #{j}", o,
                exp[rank * sizes[j]:(rank + 1) * sizes[j]])

    # The deprecated list form, all_gather_coalesced: outs[r][j] = rank r's ins[j] (empty and
    # shaped tensors, a non-contiguous output, complex and int dtypes), against gloo.
    for dt in (torch.float32, torch.int64, torch.complex64):
        shapes = [(2, 3), (0,), (5,)]
        ins = [make_input(torch.float32, R.SUM, math.prod(sh), rank, 12300 + k).reshape(sh)
               for k, sh in enumerate(shapes)]
        ins = [t.to(dt) * (1 + 1j) if dt.is_complex else t.to(dt) for t in ins]
        mine = [[torch.zeros(sh, dtype=dt) for sh in shapes] for _ in range(world)]
        mine[world - 1][0] = torch.zeros(3, 2, dtype=dt).t()  # non-contiguous (2, 3)
        theirs = [[torch.zeros(sh, dtype=dt) for sh in shapes] for _ in range(world)]
        dist.all_gather_coalesced(mine, ins)
        dist.all_gather_coalesced(theirs, ins, group=gloo)
        for r in range(world):
            for k in range(len(shapes)):
                c.equal("coalesced", f"all_gather_coalesced {dt} rank {r} #{k} vs gloo",
                        mine[r][k], theirs[r][k])
    fut = dist.all_gather_coalesced([[torch.zeros(4)] for _ in range(world)],
                                    [torch.full((4,), float(rank))], async_op=True)
    fut.wait()
    c.expect("coalesced", "all_gather_coalesced async future", fut.done())


def _gather_opts(world):
    opts = dist.GatherOptions()
    opts.rootRank = world  # out of range
    return opts


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
    raises("float8 reduce", TypeError,
           lambda: dist.reduce(torch.ones(4, dtype=torch.float8_e5m2), dst=0),
           ("rank", "reduce", "float8"))
    raises("float8 reduce_scatter", TypeError,
           lambda: dist.reduce_scatter_tensor(torch.ones(1, dtype=torch.float8_e4m3fn),
                                              torch.ones(world, dtype=torch.float8_e4m3fn)),
           ("rank", "reduce_scatter", "float8"))
    raises("complex MAX", TypeError,  # straight to the group: torch's frontend rejects it too
           lambda: pg.allreduce([torch.ones(4, dtype=torch.complex64)], R.MAX).wait(),
           ("rank", "allreduce", "MAX", "complex"))
    raises("BAND float", TypeError, lambda: dist.all_reduce(torch.ones(4), op=R.BAND),
           ("rank", "BAND", "integer"))
    raises("BXOR float reduce", TypeError,
           lambda: dist.reduce(torch.ones(4, dtype=torch.float64), dst=0, op=R.BXOR),
           ("rank", "reduce", "BXOR"))
    raises("PREMUL_SUM int", TypeError,
           lambda: dist.all_reduce(torch.ones(4, dtype=torch.int32),
                                   op=dist._make_nccl_premul_sum(2.0)),
           ("rank", "PREMUL_SUM", "floating"))
    raises("gather root", ValueError, lambda: pg.gather([], [torch.ones(2)],
                                                        _gather_opts(world)).wait(),
           ("rank", "gather", "root"))
    raises("all_to_all_single splits", ValueError,
           lambda: dist.all_to_all_single(torch.empty(world), torch.ones(world),
                                          [1] * world, [2] * world), ("rank", "split"))
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
                  check_reduce_scatter, check_noncontiguous, check_p2p, check_reduce,
                  check_gather_scatter, check_alltoall, check_new_ops, check_list_forms,
                  check_validation, check_ddp):
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



def mismatch_text(rank, world, store_path):
    """Mismatched calls on the default group and on a group with a long (hashed) name: the
    error each rank gets must end with the whole cause, sizes included (nothing cut off)."""
    init(rank, world, store_path, timeout_s=30)
    long_group = dist.new_group(list(range(world)), use_local_synchronization=True)
    got = {}

    def run(key, fn):
        try:
            fn()
            got[key] = None
        except dist.DistBackendError as e:
            got[key] = str(e)

    for gname, g in (("default", None), ("long", long_group)):
        run((gname, "recv"), lambda g=g: dist.send(torch.ones(100), 1, group=g) if rank == 0
            else dist.recv(torch.empty(10), 0, group=g) if rank == 1 else None)
        run((gname, "allreduce"), lambda g=g: dist.all_reduce(torch.ones(10 + 10 * rank), group=g))
        run((gname, "gather"), lambda g=g: dist.gather(
            torch.ones(3 + rank), [torch.empty(3) for _ in range(world)] if rank == 0 else None,
            dst=0, group=g))
        run((gname, "alltoall"), lambda g=g: dist.all_to_all_single(
            torch.empty(world * (2 + rank)), torch.ones(world * (2 + rank)), group=g))
        dist.barrier(group=g)  # the group is still usable after each mismatch
    return {"group_name": dist.distributed_c10d._get_process_group_name(long_group),
            "got": {f"{k[0]}/{k[1]}": v for k, v in got.items()}}

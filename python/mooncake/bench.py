"""Collective benchmark, mooncake side by side with Gloo in the same run.

    python -m mooncake.bench --op allreduce --ranks 2 --min-bytes 8 --max-bytes 16M --compare gloo
    python -m mooncake.bench --op all --ranks 2 --compare gloo --plot busbw.png
    python -m mooncake.bench --op allreduce --ranks 2 --netns 2          # root: across veth "hosts"
    python -m mooncake.bench --netns 2 --engine build/tests/c/mc-bench   # the C engine alone

--op: allreduce, allgather (all_gather_into_tensor), reduce_scatter (reduce_scatter_tensor),
broadcast (root 0), alltoall (all_to_all_single), sendrecv (each rank sends to rank+1 and
receives from rank-1), a comma-separated list, or all.

Columns as nccl-tests: size is the bytes of the largest buffer (the full tensor), count the
elements per rank as nccl-tests counts them, time in us, algbw = size / time and busbw = algbw x
2(n-1)/n (allreduce), (n-1)/n (allgather, reduce_scatter, alltoall) or 1 (broadcast,
sendrecv), in GB/s (1e9); #wrong = elements that differ from the known result, all ranks,
checked in a separate run after timing. Each time is the median over --repeats runs of --iters
back-to-back operations, the slowest rank's. memcpy is single-core copy bandwidth of the same
bytes (numpy copyto, one thread, fastest of 5 runs) measured on rank 0 in the same run; bus/mc
is busbw as a percentage of it. MC_FAILURE_TIMEOUT_MS defaults to 10 s here (a rank measuring
memcpy on a loaded machine must not be declared failed). With --compare gloo, Gloo runs each
size right after mooncake on the same tensors: its time, busbw and the speedup (gloo time /
mooncake time) follow.

--netns N (root): the ranks run in N network namespaces (rank r in namespace r % N, or
r * N // ranks with --netns-layout block: numbered host by host, as torchrun does) joined by
veth links to a bridge (python/mooncake/fault/netns.py), so traffic crosses veth "hosts" instead
of loopback; --link-rate RATE limits each of their links (tc tbf). --engine PATH runs the C
benchmark mc-bench (no torch) in that set-up instead.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OPS = ["allreduce", "allgather", "reduce_scatter", "broadcast", "alltoall", "sendrecv"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64}
TYPE_NAMES = {"float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16",
              "int32": "int32", "int64": "int64"}


def _parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def busbw_factor(op, n):
    if op == "allreduce":
        return 2 * (n - 1) / n
    if op in ("allgather", "reduce_scatter", "alltoall"):
        return (n - 1) / n
    return 1.0


def _values(rank, idx):
    """Element idx (a tensor of indices) of rank's data: small integers, exact in every dtype."""
    return (rank + 1) + (idx % 7)


class Case:
    """Tensors of one (op, size) row and the known result."""

    def __init__(self, op, size, dtype, rank, n):
        esz = torch.tensor([], dtype=dtype).element_size()
        elems = size // esz
        self.op, self.rank, self.n, self.dtype = op, rank, n, dtype
        per_rank = op in ("allgather", "reduce_scatter", "alltoall")
        self.count = elems // n if per_rank else elems
        c = self.count
        in_elems, out_elems = {
            "allgather": (c, c * n), "reduce_scatter": (c * n, c), "alltoall": (c * n, c * n),
            "broadcast": (0, c)}.get(op, (c, c))
        self.inp = torch.empty(in_elems, dtype=dtype)
        self.out = torch.empty(out_elems, dtype=dtype)
        self.size = max(in_elems, out_elems) * esz
        self.reset()

    def reset(self):
        r, n, c = self.rank, self.n, self.count
        if self.op == "broadcast":
            self.out.copy_(_values(0, torch.arange(c)) if r == 0 else torch.full((c,), -1))
            return
        self.inp.copy_(_values(r, torch.arange(self.inp.numel())))
        self.out.fill_(-1)
        if self.op == "allreduce":
            self.out.copy_(self.inp)  # all_reduce works in place on out

    def expected(self):
        r, n, c = self.rank, self.n, self.count
        i = torch.arange(self.out.numel())
        if self.op == "allreduce":
            return n * (n + 1) // 2 + n * (i % 7)
        if self.op == "reduce_scatter":
            return n * (n + 1) // 2 + n * ((r * c + i) % 7)
        if self.op == "allgather":
            return _values(i // c, i % c)
        if self.op == "broadcast":
            return _values(0, i)
        if self.op == "alltoall":
            return _values(i // c, r * c + i % c)
        return _values((r - 1) % n, i)  # sendrecv

    def wrong(self):
        return int((self.out.to(torch.float64) != self.expected().to(torch.float64)).sum())

    def run(self, group):
        op, n, r = self.op, self.n, self.rank
        if op == "allreduce":
            dist.all_reduce(self.out, group=group)
        elif op == "allgather":
            dist.all_gather_into_tensor(self.out, self.inp, group=group)
        elif op == "reduce_scatter":
            dist.reduce_scatter_tensor(self.out, self.inp, group=group)
        elif op == "broadcast":
            dist.broadcast(self.out, src=0, group=group)
        elif op == "alltoall":
            dist.all_to_all_single(self.out, self.inp, group=group)
        else:
            reqs = dist.batch_isend_irecv([
                dist.P2POp(dist.irecv, self.out, (r - 1) % n, group=group),
                dist.P2POp(dist.isend, self.inp, (r + 1) % n, group=group)])
            for q in reqs:
                q.wait()


def _time(case, group, iters, repeats, sync):
    samples = []
    for _ in range(repeats):
        dist.barrier(group=sync)
        start = time.perf_counter()
        for _ in range(iters):
            case.run(group)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def memcpy_gbps(nbytes, repeats=5):
    """Single-core copy bandwidth for nbytes (numpy copyto: one thread, little call overhead)."""
    import numpy as np

    if nbytes <= 0:
        return 0.0
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    reps = max(1, int(64e6 // nbytes))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        samples.append((time.perf_counter() - start) / reps)
    return nbytes / min(samples) / 1e9  # the fastest run: what one core can do


def _enter_netns(name):
    """Moves this (still single-networking-thread) process into network namespace `name`:
    threads and sockets created from here on live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000):  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns({name})")
    finally:
        os.close(fd)


def _sizes(args):
    size = args.min_bytes
    while size <= args.max_bytes:
        yield size
        size *= args.step


def _fmt_row(rec, gloo):
    row = (f"{rec['size']:>12} {rec['count']:>12} {rec['type']:>8} {rec['redop']:>6} "
           f"{rec['root']:>5} {rec['time_us']:>10.1f} {rec['algbw']:>7.3f} {rec['busbw']:>7.3f} "
           f"{rec['wrong']:>6} {rec['memcpy']:>7.2f} {rec['bus_pct_memcpy']:>6.1f}")
    if gloo:
        row += (f" {rec['gloo_time_us']:>10.1f} {rec['gloo_busbw']:>10.3f} "
                f"{rec['speedup']:>7.2f}")
    return row


def _header(gloo):
    cols = (f"#{'size':>11} {'count':>12} {'type':>8} {'redop':>6} {'root':>5} {'time':>10} "
            f"{'algbw':>7} {'busbw':>7} {'#wrong':>6} {'memcpy':>7} {'bus/mc':>6}")
    units = (f"#{'(B)':>11} {'(elements)':>12} {'':>8} {'':>6} {'':>5} {'(us)':>10} "
             f"{'(GB/s)':>7} {'(GB/s)':>7} {'':>6} {'(GB/s)':>7} {'(%)':>6}")
    if gloo:
        cols += f" {'gloo time':>10} {'gloo busbw':>10} {'speedup':>7}"
        units += f" {'(us)':>10} {'(GB/s)':>10} {'(x)':>7}"
    return cols + "\n" + units


def _warm_up(rank, seconds=0.5):
    """Small allreduces for about `seconds` (rank 0's clock decides, so every rank runs as many):
    a new communicator opens its standby endpoint in the background after its first operation,
    which would otherwise be timed with the first rows."""
    t = torch.zeros(2)
    flag = torch.zeros(1)
    start = time.perf_counter()
    while True:
        for _ in range(20):
            dist.all_reduce(t)
        flag.fill_(1.0 if rank == 0 and time.perf_counter() - start < seconds else 0.0)
        dist.broadcast(flag, 0)
        if flag.item() == 0.0:
            return


def _worker(rank, args, store_path, out_path):
    if args.netns:
        host = rank * args.netns // args.ranks if args.netns_layout == "block" else rank % args.netns
        _enter_netns(args.lab_ns[host])
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, args.ranks)
    import mooncake  # noqa: F401  (registers the backend; the entry point would too)

    n = args.ranks
    dist.init_process_group("mooncake", store=store, rank=rank, world_size=n)
    gloo = dist.new_group(backend="gloo") if args.compare == "gloo" else None
    sync = gloo  # barriers and result gathering
    _warm_up(rank)
    dtype = DTYPES[args.dtype]
    records = []
    for op in args.ops:
        if op == "sendrecv" and n < 2:
            continue
        if rank == 0:
            print(f"#\n# {op}, {n} ranks{f' in {args.netns} network namespaces' if args.netns else ''}"
                  f", {args.dtype}, median of {args.repeats} x {args.iters or 'auto'} iters"
                  f"{', Gloo in the same run' if gloo else ''}")
            print(_header(gloo is not None), flush=True)
        for size in _sizes(args):
            case = Case(op, size, dtype, rank, n)
            if case.count == 0:
                continue
            iters = args.iters or max(2, min(200, int(5e7 // max(case.size, 1) // 8)))
            case.run(None)  # warm-up (and connection set-up)
            t = _time(case, None, iters, args.repeats, sync)
            case.reset()
            case.run(None)
            wrong = case.wrong()
            tg = None
            if gloo:
                case.run(gloo)
                tg = _time(case, gloo, iters, args.repeats, sync)
            stats = torch.tensor([t, tg or 0.0, float(wrong)], dtype=torch.float64)
            # slowest rank's times, total of wrong elements
            mx = stats[:2].clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=sync)
            w = stats[2:].clone()
            dist.all_reduce(w, group=sync)
            mc = memcpy_gbps(case.size) if rank == 0 else 0.0  # others wait in the barrier
            dist.barrier(group=sync)
            if rank == 0:
                t, tg = float(mx[0]), float(mx[1])
                bus = busbw_factor(op, n)
                rec = {"op": op, "ranks": n, "size": case.size, "count": case.count,
                       "type": TYPE_NAMES[args.dtype],
                       "redop": "sum" if op in ("allreduce", "reduce_scatter") else "none",
                       "root": 0 if op == "broadcast" else -1, "time_us": t * 1e6,
                       "algbw": case.size / t / 1e9, "busbw": case.size / t / 1e9 * bus,
                       "wrong": int(w[0]), "memcpy": mc,
                       "bus_pct_memcpy": 100 * case.size / t / 1e9 * bus / mc if mc else 0.0}
                if gloo:
                    rec.update(gloo_time_us=tg * 1e6, gloo_busbw=case.size / tg / 1e9 * bus,
                               speedup=tg / t)
                records.append(rec)
                print(_fmt_row(rec, gloo is not None), flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


def plot(records, path):
    """busbw vs size per op, mooncake and Gloo (and half of single-core memcpy, the target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in records)]
    cols = min(3, len(ops))
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        rs = [r for r in records if r["op"] == op]
        x = [r["size"] for r in rs]
        ax.plot(x, [r["busbw"] for r in rs], "o-", label="mooncake")
        if "gloo_busbw" in rs[0]:
            ax.plot(x, [r["gloo_busbw"] for r in rs], "s-", label="gloo")
        ax.plot(x, [r["memcpy"] / 2 for r in rs], ":", color="gray", label="50% memcpy (1 core)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}, {rs[0]['ranks']} ranks")
        ax.set_xlabel("size (B)")
        ax.set_ylabel("busbw (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _engine(args, lab):
    """Runs the C benchmark (mc-bench) with the same sweep, in the lab's namespaces if any."""
    cmd = [args.engine, "-o", ",".join(args.ops), "-n", str(args.ranks), "-b",
           str(args.min_bytes), "-e", str(args.max_bytes), "-f", str(args.step), "-r",
           str(args.repeats), "-i", str(args.iters or 20), "-d", TYPE_NAMES[args.dtype]]
    if lab:
        cmd += ["--netns", lab.name, "--netns-count", str(args.netns)]
    return subprocess.call(cmd)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mooncake.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="allreduce", help=f"{', '.join(OPS)}, a list or all")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--min-bytes", type=_parse_size, default=8)
    p.add_argument("--max-bytes", type=_parse_size, default=16 << 20)
    p.add_argument("--step", type=int, default=8, help="size multiplier between rows")
    p.add_argument("--iters", type=int, default=0,
                   help="operations per timed run (0: by size, 2..200)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    p.add_argument("--compare", choices=["gloo", "none"], default="gloo")
    p.add_argument("--plot", metavar="PNG", help="draw busbw vs size (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p.add_argument("--netns", type=int, default=0, metavar="N",
                   help="run the ranks in N network namespaces joined by veth links (root)")
    p.add_argument("--link-rate", metavar="RATE",
                   help="with --netns: limit each namespace's link to RATE each way (tc tbf, "
                   "e.g. 2gbit), a network slower than memory as between real hosts")
    p.add_argument("--netns-layout", choices=["cyclic", "block"], default="cyclic",
                   help="rank r on namespace r %% N (cyclic) or r * N // ranks (block)")
    p.add_argument("--engine", metavar="MC_BENCH",
                   help="run the C benchmark mc-bench (engine alone) instead of torch ranks")
    args = p.parse_args(argv)
    args.ops = OPS if args.op == "all" else args.op.split(",")
    bad = [op for op in args.ops if op not in OPS]
    if bad or args.step < 2 or args.ranks < 1 or args.netns < 0:
        p.error(f"unknown op {bad}" if bad else "bad --step/--ranks/--netns")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a rank busy copying (memcpy column) on a loaded machine must not be declared dead
    os.environ.setdefault("MC_FAILURE_TIMEOUT_MS", "10000")
    lab = None
    if args.netns:
        from mooncake.fault import netns

        ok, why = netns.available()
        if not ok:
            p.error(f"--netns: {why}")
        lab = netns.Lab(args.netns).__enter__()
        if args.link_rate:
            lab.limit_rate(args.link_rate)
        env = lab.env(0)
        env["GLOO_SOCKET_IFNAME"] = netns.IFACE
        os.environ.update(env)
        os.environ["MC_TEST_NETNS_LAYOUT"] = args.netns_layout  # mc-bench (--engine) reads it
        args.lab_ns = lab.ns
    try:
        if args.engine:
            return _engine(args, lab)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), out), nprocs=args.ranks)
            with open(out) as f:
                records = json.load(f)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        if args.plot:
            plot(records, args.plot)
            print(f"# plot: {args.plot}")
        return 0
    finally:
        if lab:
            lab.close()


if __name__ == "__main__":
    sys.exit(main())

"""Collective benchmark, mooncake side by side with Gloo in the same run.

    python -m mooncake.bench --op allreduce --ranks 2 --min-bytes 8 --max-bytes 16M --compare gloo

--op: allreduce, reduce_scatter (reduce_scatter_tensor) or allgather (all_gather_into_tensor).
size is the bytes of the full (reduced or gathered) tensor, as in nccl-tests.

Prints nccl-tests style columns (time in us, algbw/busbw in GB/s, #wrong) for mooncake and,
with --compare gloo, Gloo's time and busbw on the same data plus the speed ratio. Each time is
the median over --repeats runs of --iters back-to-back operations.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# op -> (bus bandwidth factor for n ranks, run(full, part, group), expected full-tensor value)
OPS = {
    "allreduce": (lambda n: 2 * (n - 1) / n, lambda full, part, g: dist.all_reduce(full, group=g)),
    "reduce_scatter": (lambda n: (n - 1) / n,
                       lambda full, part, g: dist.reduce_scatter_tensor(part, full, group=g)),
    "allgather": (lambda n: (n - 1) / n,
                  lambda full, part, g: dist.all_gather_into_tensor(full, part, group=g)),
}


def _time_op(run, group, full, part, iters, repeats):
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(iters):
            run(full, part, group)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def _wrong(op, full, part, rank, n):
    """Elements that differ from the known result (inputs are rank+1 everywhere)."""
    if op == "allreduce":
        return int((full != n * (n + 1) / 2).sum())
    if op == "reduce_scatter":
        return int((part != n * (n + 1) / 2).sum())
    want = torch.arange(1, n + 1, dtype=full.dtype).repeat_interleave(part.numel())
    return int((full != want).sum())


def _worker(rank, args, store_path):
    store = dist.FileStore(store_path, args.ranks)
    import mooncake  # noqa: F401  (registers the backend; the entry point would too)

    dist.init_process_group("mooncake", store=store, rank=rank, world_size=args.ranks)
    gloo = dist.new_group(backend="gloo") if args.compare == "gloo" else None
    n = args.ranks
    factor, run = OPS[args.op]
    bus = factor(n)
    if rank == 0:
        print(f"# mooncake {args.op}, {n} ranks, float32 sum, median of {args.repeats} x iters")
        cols = f"{'size':>12} {'count':>12} {'type':>7} {'redop':>5} {'time':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>6}"
        if gloo:
            cols += f" {'gloo time':>10} {'gloo busbw':>10} {'speedup':>7}"
        print(cols)
        units = f"{'(B)':>12} {'(elements)':>12} {'':>7} {'':>5} {'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6}"
        print(units + (f" {'(us)':>10} {'(GB/s)':>10} {'(x)':>7}" if gloo else ""))
    size = max(4 * n, args.min_bytes)
    while size <= args.max_bytes:
        count = size // 4 // n * n  # the full tensor splits evenly into n blocks
        iters = max(3, min(200, int(2e8 // max(size, 1) // 64) or 3))
        full = torch.full((count,), float(rank + 1))
        part = torch.full((count // n,), float(rank + 1))
        run(full, part, None)  # warm-up
        t = _time_op(run, None, full, part, iters, args.repeats)
        full.fill_(float(rank + 1))
        part.fill_(float(rank + 1))
        run(full, part, None)
        wrong = _wrong(args.op, full, part, rank, n)
        row = f"{count * 4:>12} {count:>12} {'float':>7} {'sum':>5} {t * 1e6:>10.1f} {size / t / 1e9:>7.3f} {size / t / 1e9 * bus:>7.3f} {wrong:>6}"
        if gloo:
            run(full, part, gloo)
            tg = _time_op(run, gloo, full, part, iters, args.repeats)
            row += f" {tg * 1e6:>10.1f} {size / tg / 1e9 * bus:>10.3f} {tg / t:>7.2f}"
        if rank == 0:
            print(row, flush=True)
        size *= args.step
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mooncake.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=sorted(OPS), default="allreduce")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--min-bytes", type=_parse_size, default=8)
    p.add_argument("--max-bytes", type=_parse_size, default=16 << 20)
    p.add_argument("--step", type=int, default=8, help="size multiplier between rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", choices=["gloo", "none"], default="gloo")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store")), nprocs=args.ranks)


if __name__ == "__main__":
    main()

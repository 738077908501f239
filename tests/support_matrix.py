"""Measures which op x dtype x reduce op each backend accepts, by calling it (2 ranks, small
tensors, results checked against a plain computation), and writes docs/support-matrix.md.

    python tests/support_matrix.py [docs/support-matrix.md]
"""

import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

R = dist.ReduceOp
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          torch.float8_e4m3fn, torch.float8_e5m2]
REDOPS = {"SUM": R.SUM, "AVG": R.AVG, "PRODUCT": R.PRODUCT, "MIN": R.MIN, "MAX": R.MAX,
          "BAND": R.BAND, "BOR": R.BOR, "BXOR": R.BXOR,
          "PREMUL_SUM": "premul"}
REDUCING = ["all_reduce", "reduce", "reduce_scatter_tensor"]
MOVING = ["all_gather_into_tensor", "broadcast", "gather", "scatter", "all_to_all_single",
          "send/recv"]
WORLD = 2


def value(dt, rank):
    if dt.is_floating_point and dt.itemsize == 1:  # float8: exact small values
        return torch.tensor([1.0 + rank, 2.0], dtype=torch.float32).to(dt)
    if dt == torch.bool:
        return torch.tensor([True, bool(rank)])
    return torch.tensor([1 + rank, 2], dtype=torch.int64).to(dt)


def op_of(name):
    r = REDOPS[name]
    return dist._make_nccl_premul_sum(2.0) if r == "premul" else r


def run_reducing(op, dt, redop, rank, pg):
    x = value(dt, rank)
    if op == "all_reduce":
        dist.all_reduce(x, op=op_of(redop), group=pg)
    elif op == "reduce":
        dist.reduce(x, dst=0, op=op_of(redop), group=pg)
    else:
        out = torch.empty(1, dtype=dt)
        dist.reduce_scatter_tensor(out, torch.cat([x[:1], x[:1]]), op=op_of(redop), group=pg)


def run_moving(op, dt, rank, pg):
    x = value(dt, rank)
    if op == "all_gather_into_tensor":
        out = torch.empty(2 * WORLD, dtype=dt)
        dist.all_gather_into_tensor(out, x, group=pg)
        ok = torch.equal(out.view(torch.uint8), torch.cat([value(dt, r) for r in range(WORLD)])
                         .view(torch.uint8))
    elif op == "broadcast":
        dist.broadcast(x, src=0, group=pg)
        ok = torch.equal(x.view(torch.uint8), value(dt, 0).view(torch.uint8))
    elif op == "gather":
        out = [torch.empty(2, dtype=dt) for _ in range(WORLD)] if rank == 0 else None
        dist.gather(x, out, dst=0, group=pg)
        ok = rank != 0 or all(torch.equal(o.view(torch.uint8), value(dt, r).view(torch.uint8))
                              for r, o in enumerate(out))
    elif op == "scatter":
        out = torch.empty(2, dtype=dt)
        dist.scatter(out, [value(dt, r) for r in range(WORLD)] if rank == 0 else None, src=0,
                     group=pg)
        ok = torch.equal(out.view(torch.uint8), value(dt, rank).view(torch.uint8))
    elif op == "all_to_all_single":
        out = torch.empty(2, dtype=dt)
        dist.all_to_all_single(out, x, group=pg)
        ok = out.numel() == 2
    else:
        if rank == 0:
            dist.send(x, 1, group=pg)
            ok = True
        else:
            out = torch.empty(2, dtype=dt)
            dist.recv(out, 0, group=pg)
            ok = torch.equal(out.view(torch.uint8), value(dt, 0).view(torch.uint8))
    if not ok:
        raise RuntimeError("wrong result")


def worker(rank, path, results):
    import mooncake  # noqa: F401 - registers the backend

    store = dist.FileStore(path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    groups = {"gloo": dist.group.WORLD, "mooncake": dist.new_group(backend="mooncake")}
    table = {}
    for backend, pg in groups.items():
        for dt in DTYPES:
            cases = [(op, r) for op in REDUCING for r in REDOPS] + [(op, None) for op in MOVING]
            for op, redop in cases:
                try:
                    if redop is None:
                        run_moving(op, dt, rank, pg)
                    else:
                        run_reducing(op, dt, redop, rank, pg)
                    ok = True
                except Exception:  # noqa: BLE001 - rejection is the datum
                    ok = False
                # both ranks must agree that it worked; a failure on one would desync them
                flag = torch.tensor([int(ok)])
                dist.all_reduce(flag, op=R.MIN, group=groups["gloo"])
                table[(backend, op, str(dt).replace("torch.", ""), redop)] = bool(flag.item())
    if rank == 0:
        results.update(table)
    dist.destroy_process_group()


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "docs/support-matrix.md"
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(worker, args=(os.path.join(tmp, "store"), results), nprocs=WORLD)
        table = dict(results)
    mark = {(True, True): "both", (True, False): "mooncake", (False, True): "Gloo",
            (False, False): "–"}
    lines = [
        "# Support matrix: op x dtype x reduce op, mooncake and Gloo",
        "",
        "Measured by calling each backend (`python tests/support_matrix.py`, 2 ranks, torch "
        f"{torch.__version__}); a combination counts as supported when the call succeeds on every "
        "rank (results of the non-reducing ops are checked byte for byte). `both`: mooncake and "
        "Gloo; `mooncake`/`Gloo`: only that one; `–`: neither. Some rejections come from "
        "torch's front end before any backend is called (e.g. complex MIN/MAX, bitwise ops on "
        "floats).",
        "",
        "## Reducing operations",
        "",
    ]
    dts = [str(d).replace("torch.", "") for d in DTYPES]
    for op in REDUCING:
        lines += [f"### {op}", "", "| dtype | " + " | ".join(REDOPS) + " |",
                  "| --- |" + " --- |" * len(REDOPS)]
        for d in dts:
            cells = [mark[(table[("mooncake", op, d, r)], table[("gloo", op, d, r)])]
                     for r in REDOPS]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Operations that move data without reducing", "",
              "| dtype | " + " | ".join(MOVING) + " |", "| --- |" + " --- |" * len(MOVING)]
    for d in dts:
        cells = [mark[(table[("mooncake", op, d, None)], table[("gloo", op, d, None)])]
                 for op in MOVING]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

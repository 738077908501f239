"""Seeded random campaigns of trials, their report (JSON + a table) and an optional plot."""

import json
import math
import random
import time

from .harness import HANG_KINDS, KILL_KINDS, Trial, run_trial

OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "alltoall")
SIZES = {"small": 1024, "large": 131072}  # float64 elements per rank (8 KiB, 1 MiB)
# the engine's operation names (MC_FAULT op=) of the worker's torch calls
ENGINE_OP = {"alltoall": "alltoallv"}
LOCAL_SCENARIOS = ("sigkill", "sigstop", "kill_two", "kill_rank0", "mcfault_kill_op",
                   "mcfault_kill_agree", "mcfault_error")
NET_SCENARIOS = ("partition", "partition_out", "link_down")
NETEM_SCENARIOS = ("netem_loss", "netem_delay")


def make_trial(rng, scenario, ranks, op, size, **kw):
    """The trial for one scenario, with its random choices (victims, times, sequence numbers)
    drawn from rng."""
    at = round(rng.uniform(20, 300))  # ms after every rank ran its first operation
    seq = rng.randrange(3, 20) if size == "small" else rng.randrange(2, 6)
    t = Trial(ranks=ranks, op=op, size=size, count=SIZES[size], scenario=scenario, **kw)
    op = ENGINE_OP.get(op, op)
    anyone = rng.randrange(ranks)
    if scenario == "sigkill":
        t.victims, t.events = (anyone,), ((at, "kill", anyone),)
    elif scenario == "sigstop":
        t.victims, t.events = (anyone,), ((at, "stop", anyone),)
    elif scenario == "kill_two":
        a, b = rng.sample(range(ranks), 2)
        t.victims, t.events = (a, b), ((at, "kill", a), (at, "kill", b))
    elif scenario == "kill_rank0":
        t.victims, t.events = (0,), ((at, "kill", 0),)
    elif scenario == "mcfault_kill_op":
        t.victims = (anyone,)
        t.mc_fault = f"rank={anyone},op={op},seq={seq},action=kill"
    elif scenario == "mcfault_kill_agree":
        # one rank dies inside an operation; during the agreement that follows, the
        # coordinator (lowest survivor) dies in one of its phases, or a member while promising
        first = rng.randrange(1, ranks)
        rest = [r for r in range(ranks) if r != first]
        phase = rng.choice(("prepare", "accept", "commit", "promise"))
        second = rest[0] if phase != "promise" else rng.choice(rest[1:])
        t.victims = (first, second)
        t.mc_fault = (f"rank={first},op={op},seq={seq},action=kill;"
                      f"rank={second},op=agree,phase={phase},action=kill")
    elif scenario == "mcfault_error":
        t.victims = ()  # a broken link: everyone fails the op, nobody died, nobody is excluded
        t.mc_fault = f"rank={anyone},op={op},seq={seq},action=error"
    elif scenario in ("partition", "partition_out", "partition_in", "link_down"):
        t.use_netns = True
        t.victims, t.events = (anyone,), ((at, scenario, anyone),)
    elif scenario == "netem_loss":
        t.use_netns, t.expect_failure = True, False
        t.events = ((at, "netem", anyone, ("loss", "5%")),)
    elif scenario == "netem_delay":
        t.use_netns, t.expect_failure = True, False
        t.events = ((at, "netem", anyone, ("delay", "20ms")),)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return t


def plan(seed, trials, ranks, scenarios, ops=OPS, sizes=tuple(SIZES), **kw):
    """Every scenario in turn (shuffled by the seed), each with a random op and size. Trial i
    depends only on (seed, i): a longer campaign starts with the trials of a shorter one."""
    order = []
    while len(order) < trials:
        batch = list(scenarios)
        random.Random(f"{seed}/{len(order)}").shuffle(batch)
        order += batch
    out = []
    for i, s in enumerate(order[:trials]):
        rng = random.Random(f"{seed}:{i}")
        out.append(make_trial(rng, s, ranks, rng.choice(ops), rng.choice(sizes), **kw))
    return out


def percentile(xs, p):
    """Nearest-rank percentile; None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def _stats(records, key):
    xs = [v for r in records for v in r.get(key, {}).values()]
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "max": max(xs) if xs else None}


def kind_of(scenario):
    if scenario in KILL_KINDS:
        return "kill"
    if scenario in HANG_KINDS:
        return "hang"
    return "error" if scenario == "mcfault_error" else "other"


def report(records, meta):
    out = dict(meta)
    out["trials"] = len(records)
    for word, key in (("hang", "hangs"), ("wrong_result", "wrong_results"),
                      ("crash", "crashes"), ("not_fired", "not_fired"),
                      ("undetected", "undetected"), ("false_suspicion", "false_suspicions")):
        out[key] = sum(1 for r in records if word in r["problems"])
    out["ok"] = sum(1 for r in records if r["outcome"] == "ok")
    det, rec = _stats(records, "detection_ms"), _stats(records, "recovery_ms")
    out.update(detection_ms_p50=det["p50"], detection_ms_p99=det["p99"],
               detection_ms_max=det["max"], recovery_ms_p50=rec["p50"],
               recovery_ms_p99=rec["p99"], recovery_ms_max=rec["max"])
    out["by_kind"] = {}
    for kind in ("kill", "hang", "error"):
        sel = [r for r in records if kind_of(r["scenario"]) == kind]
        if sel:
            out["by_kind"][kind] = {"trials": len(sel),
                                    "detection_ms": _stats(sel, "detection_ms"),
                                    "recovery_ms": _stats(sel, "recovery_ms")}
    out["records"] = records
    return out


def _fmt(x):
    return "-" if x is None else f"{x:.0f}"


def summary(rep):
    lines = [f"{'#':>3} {'scenario':<19} {'op':<15} {'size':<5} {'victims':<8} "
             f"{'detect ms (max)':>15} {'recover ms':>10} {'time s':>6}  outcome"]
    for i, r in enumerate(rep["records"]):
        det = list(r["detection_ms"].values())
        recv = list(r["recovery_ms"].values())
        lines.append(f"{i:>3} {r['scenario']:<19} {r['op']:<15} {r['size']:<5} "
                     f"{','.join(map(str, r['victims'])) or '-':<8} "
                     f"{_fmt(max(det) if det else None):>15} "
                     f"{_fmt(max(recv) if recv else None):>10} {r['duration_s']:>6.1f}  "
                     f"{r['outcome']}{' -> ' + r['log_dir'] if r['outcome'] != 'ok' else ''}")
    lines.append("")
    lines.append(f"trials {rep['trials']}  ok {rep['ok']}  hangs {rep['hangs']}  "
                 f"wrong_results {rep['wrong_results']}  crashes {rep['crashes']}  "
                 f"not_fired {rep['not_fired']}  undetected {rep['undetected']}")
    lines.append(f"detection ms: p50 {_fmt(rep['detection_ms_p50'])}  "
                 f"p99 {_fmt(rep['detection_ms_p99'])}  max {_fmt(rep['detection_ms_max'])}   "
                 f"recovery ms: p50 {_fmt(rep['recovery_ms_p50'])}  "
                 f"p99 {_fmt(rep['recovery_ms_p99'])}  max {_fmt(rep['recovery_ms_max'])}")
    for kind, s in rep["by_kind"].items():
        d, rc = s["detection_ms"], s["recovery_ms"]
        lines.append(f"  {kind:<5} ({s['trials']} trials): detection p50 {_fmt(d['p50'])} "
                     f"p99 {_fmt(d['p99'])} max {_fmt(d['max'])}; recovery p50 "
                     f"{_fmt(rc['p50'])} p99 {_fmt(rc['p99'])} max {_fmt(rc['max'])}")
    return "\n".join(lines)


def plot(rep, path):
    """Detection and recovery latency distributions, by fault kind (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "detection_ms", "detection (fault -> failed op returns)"),
                           (axes[1], "recovery_ms", "recovery (fault -> first correct op)")):
        for kind in ("kill", "hang", "error"):
            xs = sorted(v for r in rep["records"] if kind_of(r["scenario"]) == kind
                        for v in r[key].values())
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=f"{kind} (n={len(xs)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of survivors")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"mooncake fault campaign: {rep['trials']} trials, seed {rep.get('seed')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_campaign(trials, meta, log=print):
    records = []
    t0 = time.monotonic()
    for i, t in enumerate(trials):
        r = run_trial(t)
        records.append(r)
        det = list(r["detection_ms"].values())
        log(f"[{i + 1}/{len(trials)}] {t.scenario} {t.op}/{t.size} victims={list(t.victims)} "
            f"-> {r['outcome']} (detect max {_fmt(max(det) if det else None)} ms, "
            f"{r['duration_s']:.1f} s)")
    meta = dict(meta, wall_s=round(time.monotonic() - t0, 1))
    return report(records, meta)


def save(rep, path):
    with open(path, "w") as f:
        json.dump(rep, f, indent=1, default=str)

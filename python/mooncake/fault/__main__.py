"""python -m mooncake.fault {run,campaign,soak,cleanup} ... (docs/fault-harness.md)"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from . import campaign, netns
from .harness import Trial, run_trial


def _at(spec):
    """"R@MS" -> (rank, ms)"""
    m = re.fullmatch(r"(\d+)@(\d+(?:\.\d*)?)", spec)
    if not m:
        raise argparse.ArgumentTypeError(f"expected RANK@MS, got {spec!r}")
    return int(m[1]), float(m[2])


def _env(a):
    return dict(kv.split("=", 1) for kv in a.env)


def _victims_of_rules(rules):
    out = set()
    for rule in filter(None, rules.split(";")):
        f = dict(kv.split("=", 1) for kv in rule.split(",") if "=" in kv)
        if f.get("action", "kill").split(":")[0] in ("kill", "stop", "exit") and "rank" in f:
            out.add(int(f["rank"]))
    return out


def cmd_run(a):
    events, victims = [], set(_victims_of_rules(a.fault or ""))
    for action, specs in (("kill", a.kill), ("stop", a.stop), ("partition", a.partition),
                          ("partition_out", a.partition_out), ("link_down", a.link_down)):
        for r, ms in specs or ():
            events.append((ms, action, r))
            victims.add(r)
    script = tuple(a.script[1:] if a.script[:1] == ["--"] else a.script)
    t = Trial(ranks=a.ranks, op=a.op, size=a.size, count=campaign.SIZES[a.size],
              scenario="run", victims=tuple(sorted(victims)), mc_fault=a.fault or "",
              events=tuple(events), cont_stopped=not a.no_cont, timeout_s=a.timeout,
              use_netns=a.netns or any(e[1] not in ("kill", "stop") for e in events),
              transport=a.transport, script=script, keep_logs=True,
              expect_failure=bool(victims or a.fault), env=_env(a), wait_ready=a.ready)
    rec = run_trial(t)
    print(f"{'rank':>4} {'role':<8} {'status':<10} {'detect ms':>9} {'recover ms':>10}  note")
    for r in range(a.ranks):
        info = rec["ranks"][r]
        status = "HUNG" if info["hung"] else info["exit"]
        note = info.get("excluded") or info.get("first_error") or ""
        if r in victims:
            note = f"[{info.get('victim_outcome')}] {note}"
        print(f"{r:>4} {'victim' if r in victims else 'survivor':<8} {status:<10} "
              f"{campaign._fmt(info.get('detection_ms')):>9} "
              f"{campaign._fmt(info.get('recovery_ms')):>10}  {note[:90]}")
    for line in rec["mc_fault_fired"]:
        print(f"MC_FAULT fired on {line}")
    print(f"outcome: {rec['outcome']}  problems: {rec['problems'] or 'none'}  "
          f"logs: {rec['log_dir']}")
    if a.json:
        campaign.save(rec, a.json)
    return 0 if rec["outcome"] == "ok" else 1


def _scenarios(a):
    if a.scenarios:
        return a.scenarios.split(",")
    out = list(campaign.LOCAL_SCENARIOS)
    if a.netns:
        ok, why = netns.available()
        if not ok:
            raise SystemExit(f"--netns: {why}")
        out += campaign.NET_SCENARIOS
        if netns.netem_available():
            out += campaign.NETEM_SCENARIOS
        else:
            print("note: this kernel has no sch_netem: loss/delay scenarios skipped",
                  file=sys.stderr)
    return out


def cmd_campaign(a):
    scen = _scenarios(a)
    ops = a.ops.split(",") if a.ops else campaign.OPS
    sizes = a.sizes.split(",") if a.sizes else tuple(campaign.SIZES)
    trials = campaign.plan(a.seed, a.trials, a.ranks, scen, ops, sizes,
                           timeout_s=a.timeout, transport=a.transport, planted=a.planted,
                           env=_env(a))
    meta = {"seed": a.seed, "ranks": a.ranks, "scenarios": scen, "ops": list(ops),
            "sizes": list(sizes), "transport": a.transport or "auto",
            "timeout_s": a.timeout, "planted": a.planted or None, "env": _env(a)}
    rep = campaign.run_campaign(trials, meta, log=lambda s: print(s, flush=True))
    print()
    print(campaign.summary(rep))
    if a.json:
        campaign.save(rep, a.json)
        print(f"report: {a.json}")
    if a.plot:
        campaign.plot(rep, a.plot)
        print(f"plot: {a.plot}")
    bad = rep["hangs"] + rep["wrong_results"] + rep["crashes"] + rep["not_fired"]
    return 1 if bad else 0


def cmd_soak(a):
    load = []
    if a.load:
        for _ in range(a.load_procs or os.cpu_count() or 2):
            load.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                         start_new_session=True))
    try:
        t = Trial(ranks=a.ranks, op=a.op, size=a.size, count=campaign.SIZES[a.size],
                  scenario="soak", expect_failure=False, timeout_s=a.minutes * 60 + 180,
                  transport=a.transport, use_netns=a.netns, keep_logs=True,
                  env=dict(_env(a), MCF_SOAK_S=str(a.minutes * 60),
                           MCF_MAX_ITERS=str(10**12)))
        rec = run_trial(t)
    finally:
        for p in load:
            p.kill()
            p.wait()
    # a false suspicion: any rank's "rank N failed" warning, or any failed operation
    warnings = []
    for r in range(a.ranks):
        try:
            with open(os.path.join(rec["log_dir"], f"rank.{r}.log"), errors="replace") as f:
                warnings += [f"rank {r}: {m[0]}" for m in
                             re.finditer(r"control: rank \d+ failed.*", f.read())]
        except OSError:
            pass
    errors = sum(1 for r in rec["ranks"].values() if r.get("first_error"))
    # suspicions while the job ran: a failed op, or a rank known failed before the end;
    # warnings after that come from the ranks' exits racing their goodbyes
    during = sum(1 for r in rec["ranks"].values()
                 if r.get("first_error") or r.get("failed_at_end") or r.get("hung"))
    rep = {"ranks": a.ranks, "minutes": a.minutes, "load": bool(a.load),
           "load_procs": len(load), "false_suspicions": during, "failure_warnings": len(warnings),
           "ranks_with_errors": errors, "warnings": warnings[:50], "outcome": rec["outcome"],
           "env": _env(a), "record": rec}
    print(f"soak: {a.ranks} ranks, {a.minutes} min, load={len(load)} busy processes: "
          f"false suspicions {during} (ranks with a failed op: {errors}; 'rank N failed' "
          f"warnings incl. at exit: {len(warnings)}), "
          f"outcome {rec['outcome']}, logs {rec.get('log_dir')}")
    for w in warnings[:10]:
        print("  " + w)
    if a.json:
        campaign.save(rep, a.json)
    return 0 if rec["outcome"] == "ok" and not during else 1


def cmd_cleanup(a):
    removed = netns.cleanup(everything=a.all)
    print(f"removed {len(removed)} namespace(s): {' '.join(removed) or '-'}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mooncake.fault", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--ranks", type=int, default=4)
        s.add_argument("--transport", default="", help="MC_TRANSPORT for the ranks (tcp, shm)")
        s.add_argument("--timeout", type=float, default=90.0,
                       help="hard limit per trial in seconds (a hang is recorded, then killed)")
        s.add_argument("--netns", action="store_true",
                       help="one network namespace per rank (root); enables network faults")
        s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="extra environment for the ranks, e.g. MC_FAILURE_TIMEOUT_MS=1000")

    r = sub.add_parser("run", help="one job, one fault scenario")
    common(r)
    r.add_argument("--fault", help="MC_FAULT rules (fault.h), e.g. rank=2,op=allreduce,seq=9")
    for flag in ("kill", "stop", "partition", "partition-out", "link-down"):
        r.add_argument(f"--{flag}", type=_at, action="append", metavar="R@MS",
                       help=f"{flag} rank R MS ms after the job runs")
    r.add_argument("--no-cont", action="store_true", help="leave stopped ranks stopped")
    r.add_argument("--ready", action="store_true",
                   help="user script: time faults from every rank's mooncake.fault.note('ready')")
    r.add_argument("--op", default="allreduce", choices=campaign.OPS)
    r.add_argument("--size", default="small", choices=tuple(campaign.SIZES))
    r.add_argument("--json")
    r.add_argument("script", nargs=argparse.REMAINDER,
                   help="-- script.py args (default: the built-in worker)")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("campaign", help="a seeded random campaign of trials")
    common(c)
    c.add_argument("--trials", type=int, default=12)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--json")
    c.add_argument("--plot", help="PNG of the latency distributions (needs matplotlib)")
    c.add_argument("--scenarios", help="comma-separated subset")
    c.add_argument("--ops", help="comma-separated subset of " + ",".join(campaign.OPS))
    c.add_argument("--sizes", help="small,large")
    c.add_argument("--planted", choices=("wrong", "hang"),
                   help="harness self-test: survivors corrupt a result or hang after a fault")
    c.set_defaults(fn=cmd_campaign)

    s = sub.add_parser("soak", help="failure-free run; counts false suspicions")
    common(s)
    s.add_argument("--minutes", type=float, default=10)
    s.add_argument("--load", action="store_true", help="busy processes on every core")
    s.add_argument("--load-procs", type=int)
    s.add_argument("--op", default="allreduce", choices=campaign.OPS)
    s.add_argument("--size", default="small", choices=tuple(campaign.SIZES))
    s.add_argument("--json")
    s.set_defaults(fn=cmd_soak)

    k = sub.add_parser("cleanup", help="remove leftover namespaces of finished harnesses")
    k.add_argument("--all", action="store_true", help="also those of running harnesses")
    k.set_defaults(fn=cmd_cleanup)

    a = p.parse_args(argv)
    start = time.monotonic()
    try:
        return a.fn(a)
    finally:
        if a.cmd != "cleanup":
            print(f"({time.monotonic() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    import signal

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally (namespaces, processes) runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    sys.exit(main())

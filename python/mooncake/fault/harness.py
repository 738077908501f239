"""Trials: launch N ranks, strike one fault scenario, bound everything by a hard deadline, and
judge what the ranks did. Used by ``python -m mooncake.fault`` (see __main__.py) and tests.

Ranks are plain processes started here (not torchrun, whose agent kills every worker when one
dies), each in its own session so that a trial can always kill all it started. The harness
hosts the torch TCPStore (in-process; in network mode in the bridge namespace) and gives every
rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
TORCHELASTIC_USE_AGENT_STORE=True, so ``init_process_group("mooncake")`` (env://) connects to
it as a client; killing rank 0 therefore never kills the store.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import netns

KILL_KINDS = ("sigkill", "kill_two", "kill_rank0", "mcfault_kill_op", "mcfault_kill_agree")
HANG_KINDS = ("sigstop", "partition", "partition_out", "partition_in", "link_down")

FIRED_RE = re.compile(r"rank (\d+): MC_FAULT fired: (.*) \(at monotonic ([0-9.]+)\)")
UNFIRED_RE = re.compile(r"MC_FAULT rule never fired here: (.*)")


@dataclasses.dataclass
class Trial:
    ranks: int = 4
    op: str = "allreduce"
    count: int = 1024
    size: str = "small"
    scenario: str = "custom"
    victims: tuple = ()          # ranks the fault takes out (survivors must exclude them)
    mc_fault: str = ""           # MC_FAULT rules (fault.h)
    events: tuple = ()           # (at_ms, action, rank[, arg]); action: kill, stop, partition,
    #                              partition_out, partition_in, link_down, netem
    cont_stopped: bool = True    # SIGCONT stopped ranks once the survivors are done
    expect_failure: bool = True  # survivors must see an error (False: e.g. a delay)
    timeout_s: float = 90.0
    use_netns: bool = False
    transport: str = ""
    post: int = 10               # checked iterations after recovery
    planted: str = ""            # harness self-test: the worker corrupts ("wrong") or hangs
    script: tuple = ()           # a user script (and args) instead of the built-in worker
    env: dict = dataclasses.field(default_factory=dict)
    keep_logs: bool = False
    wait_ready: bool = False     # user script: start the clock at every rank's note("ready")


def _signal_name(code):
    if code is None:
        return None
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class _LocalStore:
    def __init__(self):
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.addr, self.port = "127.0.0.1", self.store.port

    def close(self):
        del self.store


_STORE_CODE = """
import sys, time, datetime, torch.distributed as d
s = d.TCPStore("0.0.0.0", int(sys.argv[1]), is_master=True, wait_for_workers=False,
               timeout=datetime.timedelta(seconds=600))
print("ready", flush=True)
time.sleep(3600)
"""


class _NetnsStore:
    """The store runs in the bridge namespace, reachable from every rank's namespace."""

    def __init__(self, lab):
        self.addr, self.port = netns.BRIDGE_IP, 29400
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.bridge, sys.executable, "-c", _STORE_CODE,
             str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.close()
            raise RuntimeError("the store did not start in the bridge namespace")

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _launch(trial, lab, store, out_dir):
    procs = []
    base = dict(os.environ)
    base.pop("MC_FAULT", None)
    for r in range(trial.ranks):
        env = dict(base, RANK=str(r), WORLD_SIZE=str(trial.ranks), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(trial.ranks), MASTER_ADDR=store.addr,
                   MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                   MCF_DIR=out_dir, MCF_OP=trial.op, MCF_COUNT=str(trial.count),
                   MCF_POST=str(trial.post), OMP_NUM_THREADS="1",
                   # a fault that never comes must not run the job for minutes
                   MCF_MAX_ITERS=str(max(200, 2 * 1024 * 1024 // max(1, trial.count))))
        if trial.mc_fault:
            env["MC_FAULT"] = trial.mc_fault
        if trial.transport:
            env["MC_TRANSPORT"] = trial.transport
        if trial.planted:
            env["MCF_PLANTED"] = trial.planted
        if lab:
            env.update(lab.env(r))
        env.update(trial.env)
        cmd = [sys.executable, *trial.script] if trial.script else [
            sys.executable, "-m", "mooncake.fault.worker"]
        if lab:
            cmd = lab.prefix_cmd(r) + cmd
        log = open(os.path.join(out_dir, f"rank.{r}.log"), "wb")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
    return procs


def _kill_all(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # its session: children included
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _strike(ev, procs, lab):
    """Applies one event; returns whether it took effect."""
    action, r = ev[1], ev[2]
    if action in ("kill", "stop", "cont"):
        if procs[r].poll() is not None:
            return False
        sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}[action]
        os.kill(procs[r].pid, sig)
        return True
    if not lab:
        raise ValueError(f"{action} needs network namespaces (--netns)")
    if action.startswith("partition"):
        lab.partition(r, {"partition": "both", "partition_out": "out",
                          "partition_in": "in"}[action])
    elif action == "link_down":
        lab.link_down(r)
    elif action == "netem":
        lab.netem(r, list(ev[3]))
    else:
        raise ValueError(f"unknown fault action {action!r}")
    return True


def run_trial(trial):
    """Runs one trial to completion (never longer than trial.timeout_s plus clean-up) and
    returns its record (a JSON-able dict)."""
    out_dir = tempfile.mkdtemp(prefix="mcf-trial-")
    lab = store = None
    procs = []
    rec = {"scenario": trial.scenario, "op": trial.op, "size": trial.size,
           "count": trial.count, "world": trial.ranks, "victims": sorted(trial.victims),
           "mc_fault": trial.mc_fault, "events": [list(e) for e in trial.events],
           "transport": trial.transport or "auto", "netns": trial.use_netns}
    t_start = time.monotonic()
    try:
        if trial.use_netns:
            lab = netns.Lab(trial.ranks).__enter__()
            store = _NetnsStore(lab)
        else:
            store = _LocalStore()
        procs = _launch(trial, lab, store, out_dir)
        rec.update(_drive(trial, procs, lab, out_dir, t_start))
    finally:
        _kill_all(procs)
        if store:
            store.close()
        if lab:
            lab.close()
    _judge(trial, rec, out_dir)
    rec["duration_s"] = round(time.monotonic() - t_start, 2)
    if trial.keep_logs or rec["outcome"] != "ok":
        rec["log_dir"] = out_dir
        rec["log_tail"] = _log_tails(trial, out_dir, rec)
        if not trial.keep_logs:
            keep = os.path.join(tempfile.gettempdir(), "mcf-failed")
            os.makedirs(keep, exist_ok=True)
            dest = tempfile.mkdtemp(prefix=f"{trial.scenario}-", dir=keep)
            shutil.copytree(out_dir, dest, dirs_exist_ok=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            rec["log_dir"] = dest
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def _drive(trial, procs, lab, out_dir, t_start):
    deadline = t_start + trial.timeout_s
    n = trial.ranks
    builtin = not trial.script or trial.wait_ready
    # the clock of the events starts when every rank ran its first operation (built-in
    # worker) or at launch (user scripts)
    t0 = time.monotonic()
    while builtin and time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(out_dir, f"ready.{r}")) for r in range(n)):
            break
        if any(p.poll() is not None for p in procs):
            break  # a rank died early (or a fault fired before the clock): judged later
        time.sleep(0.01)
    t0 = time.monotonic()
    out = {"startup_s": round(t0 - t_start, 2), "struck": [], "t_fault": None}
    pending = sorted(trial.events, key=lambda e: e[0])
    stopped = set()
    victims = set(trial.victims)
    survivors = [r for r in range(n) if r not in victims]
    survivors_done_at = None
    t_exit = {}
    while time.monotonic() < deadline:
        now = time.monotonic()
        for r, p in enumerate(procs):
            if r not in t_exit and p.poll() is not None:
                t_exit[r] = now
        while pending and now >= t0 + pending[0][0] / 1e3:
            ev = pending.pop(0)
            t = time.monotonic()
            ok = _strike(ev, procs, lab)
            out["struck"].append({"action": ev[1], "rank": ev[2], "t": t, "took_effect": ok})
            if ok and out["t_fault"] is None:
                out["t_fault"] = t
            if ok and ev[1] == "stop":
                stopped.add(ev[2])
        if pending:
            time.sleep(min(0.005, max(0.0, t0 + pending[0][0] / 1e3 - time.monotonic())))
            continue
        if survivors_done_at is None and all(procs[r].poll() is not None for r in survivors):
            survivors_done_at = time.monotonic()
            if lab:
                lab.heal()  # a cut-off rank may now learn it was excluded
            if trial.cont_stopped:
                for r in stopped:
                    _strike((0, "cont", r), procs, lab)
        if all(p.poll() is not None for p in procs):
            break
        if survivors_done_at is not None and stopped and not trial.cont_stopped:
            break  # stopped ranks stay stopped: killed below
        time.sleep(0.02)
    out["hung"] = [r for r in range(n) if procs[r].poll() is None
                   and not (r in stopped and not trial.cont_stopped)]
    out["exit"] = {r: _signal_name(procs[r].poll()) for r in range(n)}
    out["t_exit"] = t_exit
    return out


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _log(out_dir, r):
    try:
        with open(os.path.join(out_dir, f"rank.{r}.log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _log_tails(trial, out_dir, rec):
    bad = set(rec.get("hung", [])) | {int(k) for k in rec.get("crashed", [])}
    ranks = sorted(bad) or range(trial.ranks)
    return {r: _log(out_dir, r)[-1500:] for r in ranks}


def _judge(trial, rec, out_dir):
    n = trial.ranks
    victims = set(trial.victims)
    survivors = [r for r in range(n) if r not in victims]
    logs = {r: _log(out_dir, r) for r in range(n)}
    fired = [(int(m[1]), m[2], float(m[3])) for r in range(n) for m in FIRED_RE.finditer(logs[r])]
    unfired = sorted({m[1] for r in range(n) for m in UNFIRED_RE.finditer(logs[r])})
    rec["mc_fault_fired"] = [f"rank {r}: {text}" for r, text, _ in fired]
    times = [t for _, _, t in fired] + [s["t"] for s in rec.get("struck", []) if s["took_effect"]]
    rec["t_fault"] = min(times) if times else None
    problems = []
    wanted_events = len(trial.events)
    struck_ok = sum(1 for s in rec.get("struck", []) if s["took_effect"])
    rules = [x for x in trial.mc_fault.split(";") if x]
    fired_texts = {text for _, text, _ in fired}
    if unfired or struck_ok < wanted_events or any(x not in fired_texts for x in rules):
        problems.append("not_fired")
    results = {r: _read_json(os.path.join(out_dir, f"result.{r}.json")) for r in range(n)}
    ranks = {}
    crashed, wrong = [], []
    for r in range(n):
        res = results[r] or {}
        info = {"exit": rec["exit"].get(r), "hung": r in rec["hung"]}
        if r in rec["t_exit"] and rec["t_fault"]:
            info["exit_after_fault_s"] = round(rec["t_exit"][r] - rec["t_fault"], 2)
        if res:
            info.update(shrinks=res.get("shrinks"), members=res.get("members"),
                        wrong_iterations=res.get("wrong"), excluded=res.get("excluded"),
                        failed_at_end=res.get("failed_at_end"), iterations=res.get("iterations"),
                        first_error=(res.get("errors") or [{}])[0].get("msg"))
            if res.get("t_detect") and rec["t_fault"]:
                info["detection_ms"] = round((res["t_detect"] - rec["t_fault"]) * 1e3, 2)
            if res.get("t_recovered") and rec["t_fault"]:
                info["recovery_ms"] = round((res["t_recovered"] - rec["t_fault"]) * 1e3, 2)
        ranks[r] = info
        if r in victims:
            # a victim that comes back (SIGCONT, healed link) may learn it was excluded or
            # (cut off) carry on alone; it must never claim the survivors' group
            info["victim_outcome"] = (
                "hung" if info["hung"] else "excluded" if res.get("excluded") else
                f"continued alone as {res['members']}" if res.get("done") else
                info["exit"] or "?")
            if res.get("done") and res.get("members") and len(res["members"]) > 1 and \
                    set(res["members"]) & set(survivors):
                wrong.append(r)
            continue
        if trial.script:
            if info["exit"] != "exit 0" and not info["hung"]:
                crashed.append(r)
            continue
        if info["hung"]:
            continue
        if not res or not res.get("done") or info["exit"] != "exit 0":
            crashed.append(r)  # died, raised, or was excluded although alive (false suspicion)
            continue
        if res.get("wrong") or sorted(res.get("members") or []) != survivors:
            wrong.append(r)
        if trial.expect_failure and res.get("t_detect") is None:
            problems.append("undetected")
        if not trial.expect_failure and res.get("errors"):
            problems.append("false_suspicion")
    if trial.script:  # a user script: use its "detected" notes, if any
        for r in survivors:
            for line in _read_lines(os.path.join(out_dir, f"events.{r}")):
                ev = _loads(line)
                if ev and ev.get("event") == "detected" and rec["t_fault"]:
                    ranks[r].setdefault("detection_ms",
                                        round((ev["t"] - rec["t_fault"]) * 1e3, 2))
    if rec["hung"]:
        problems.append("hang")
    if crashed:
        problems.append("crash")
    if wrong:
        problems.append("wrong_result")
    rec["ranks"] = ranks
    rec["crashed"] = crashed
    rec["wrong"] = wrong
    rec["detection_ms"] = {r: ranks[r]["detection_ms"] for r in survivors
                           if "detection_ms" in ranks[r]}
    rec["recovery_ms"] = {r: ranks[r]["recovery_ms"] for r in survivors
                          if "recovery_ms" in ranks[r]}
    rec["problems"] = sorted(set(problems))
    rec.pop("t_exit", None)
    # one word: the worst thing that happened
    for word in ("hang", "wrong_result", "crash", "not_fired", "undetected", "false_suspicion"):
        if word in problems:
            rec["outcome"] = word
            break
    else:
        rec["outcome"] = "ok"


def _read_lines(path):
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def _loads(line):
    try:
        return json.loads(line)
    except ValueError:
        return None

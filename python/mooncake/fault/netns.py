"""A small network lab: one network namespace per rank, wired by veth pairs into a bridge that
lives in its own namespace (which also hosts the store), and faults on those links.

Nothing is created in the host's namespace: every link is made directly inside the lab's
namespaces, so deleting the namespaces removes everything. Names start with
``mcf-<harness pid>-<random>-``; ``cleanup()`` removes the labs of harnesses that are gone.
Needs root (``ip netns add``). Faults use only what this kernel has: link down, and drops by a
``pfifo limit 0`` queue (one direction per end: both ends = a full partition). Loss and delay
use ``tc netem`` when the kernel has sch_netem (``netem_available()``).

Addresses: bridge 10.231.0.254/24, rank r 10.231.0.(r+1) on interface ``eth0``. The engine then
finds its control-plane address on eth0 (the only non-loopback interface; MC_OFI_IFACE=eth0 is
set anyway) and libfabric's tcp provider uses the domain ``eth0`` (MC_OFI_IFACE, FI_TCP_IFACE).
"""

import atexit
import os
import secrets
import subprocess

PREFIX = "mcf-"
SUBNET = "10.231.0"
BRIDGE_IP = f"{SUBNET}.254"
IFACE = "eth0"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True,
                          timeout=20)


def _tc(ns, *args, check=True):
    return subprocess.run(["tc", "-n", ns, *args], check=check, capture_output=True, text=True,
                          timeout=20)


def available():
    """(ok, why): whether network namespaces can be made here."""
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode:
            return False, f"`ip netns add` failed: {r.stderr.strip()} (needs root)"
        _ip("netns", "del", probe, check=False)
        return True, ""
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"`ip` unusable: {err}"


class Lab:
    """Namespaces for `ranks` ranks plus a bridge namespace. Use as a context manager."""

    def __init__(self, ranks):
        self.ranks = ranks
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.bridge = f"{self.name}-br"
        self.ns = [f"{self.name}-r{r}" for r in range(ranks)]
        self._faults = []  # undo commands
        self._made = []

    def rank_ip(self, r):
        return f"{SUBNET}.{r + 1}"

    def __enter__(self):
        atexit.register(self.close)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _setup(self):
        br = self.bridge
        _ip("netns", "add", br)
        self._made.append(br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        _ip("-n", br, "link", "set", "br0", "up")
        for r, ns in enumerate(self.ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", f"p{r}",
                "netns", br)
            _ip("-n", br, "link", "set", f"p{r}", "master", "br0")
            _ip("-n", br, "link", "set", f"p{r}", "up")
            _ip("-n", ns, "addr", "add", f"{self.rank_ip(r)}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")

    def close(self):
        self.heal()
        for ns in reversed(self._made):
            kill_ns_processes(ns)
            _ip("netns", "del", ns, check=False)
        self._made = []

    def prefix_cmd(self, r):
        """Command prefix that runs a program in rank r's namespace (the pid stays the same:
        `ip netns exec` execs the program)."""
        return ["ip", "netns", "exec", self.ns[r]]

    def env(self, r):
        return {"MC_OFI_IFACE": IFACE, "FI_TCP_IFACE": IFACE}

    # ---- faults (each returns nothing; heal() undoes them all) ----

    def _drop(self, ns, dev):
        _tc(ns, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0")
        self._faults.append(lambda: _tc(ns, "qdisc", "del", "dev", dev, "root", check=False))

    def partition(self, r, direction="both"):
        """Cut rank r off: "out" drops what it sends, "in" what it receives, "both" both."""
        if direction in ("out", "both"):
            self._drop(self.ns[r], IFACE)
        if direction in ("in", "both"):
            self._drop(self.bridge, f"p{r}")

    def link_down(self, r):
        _ip("-n", self.ns[r], "link", "set", IFACE, "down")
        ns = self.ns[r]

        def undo():
            _ip("-n", ns, "link", "set", IFACE, "up", check=False)
            _ip("-n", ns, "route", "replace", f"{SUBNET}.0/24", "dev", IFACE, check=False)

        self._faults.append(undo)

    def netem(self, r, spec):
        """spec: netem arguments, e.g. ["loss", "20%"] or ["delay", "200ms"] (both ways)."""
        for ns, dev in ((self.ns[r], IFACE), (self.bridge, f"p{r}")):
            _tc(ns, "qdisc", "replace", "dev", dev, "root", "netem", *spec)
            self._faults.append(
                lambda ns=ns, dev=dev: _tc(ns, "qdisc", "del", "dev", dev, "root", check=False))

    def limit_rate(self, rate):
        """Every host's link carries at most `rate` (tc tbf syntax, e.g. "2gbit") each way: a
        network slower than the hosts' memory, as between real hosts (benchmarks; heal() keeps
        it, close() drops it with the namespaces)."""
        for r, ns in enumerate(self.ns):
            for where, dev in ((ns, IFACE), (self.bridge, f"p{r}")):
                _tc(where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    "1mb", "latency", "100ms")

    def heal(self):
        while self._faults:
            try:
                self._faults.pop()()
            except (OSError, subprocess.SubprocessError):
                pass


def netem_available():
    """Whether this kernel has sch_netem (loss/delay faults)."""
    with Lab(1) as lab:
        r = _tc(lab.ns[0], "qdisc", "add", "dev", IFACE, "root", "netem", "delay", "1ms",
                check=False)
        return r.returncode == 0


def kill_ns_processes(ns):
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def cleanup(everything=False):
    """Deletes leftover lab namespaces (of harness processes that are gone, or all of them);
    returns the names removed."""
    r = _ip("netns", "list", check=False)
    removed = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        try:
            owner = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            owner = -1
        if not everything and owner > 0 and os.path.exists(f"/proc/{owner}"):
            continue  # a running harness owns it
        kill_ns_processes(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    return removed

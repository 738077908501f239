"""Runs a test with its ranks spread over N "hosts": network namespaces joined by veth links to
a bridge (python/mooncake/fault/netns.py), so that ranks of one host share memory and talk to
the others over tcp. Rank r is on host r % N (tests/c/harness.c reads MC_TEST_NETNS), or on
host r * N / size with MC_TEST_NETNS_LAYOUT=block.

    in_hosts.py N COMMAND [ARGS...]      (root: it makes network namespaces)
"""

import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# netns.py by path: importing the mooncake package would import torch, which this does not need
spec = importlib.util.spec_from_file_location(
    "netns", os.path.join(HERE, "..", "..", "python", "mooncake", "fault", "netns.py"))
netns = importlib.util.module_from_spec(spec)
spec.loader.exec_module(netns)

hosts = int(sys.argv[1])
ok, why = netns.available()
if not ok:
    sys.exit(f"in_hosts.py: cannot make network namespaces: {why}")
netns.cleanup()  # labs left by runs that were killed (a ctest timeout)
with netns.Lab(hosts) as lab:
    env = dict(os.environ, MC_TEST_NETNS=f"{lab.name}:{hosts}", MC_OFI_IFACE=netns.IFACE,
               FI_TCP_IFACE=netns.IFACE)
    sys.exit(subprocess.run(sys.argv[2:], env=env).returncode)

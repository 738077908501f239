"""Fault-injection harness: ``python -m mooncake.fault run|campaign|soak|cleanup``.

Launches N ranks itself (torchrun's agent would kill every worker when one dies), strikes a
fault (SIGKILL, SIGSTOP, MC_FAULT rules inside operations or the agreement, network faults
between ranks in separate network namespaces), bounds everything by a hard deadline, and
reports per-rank outcomes, detection and recovery times. See docs/fault-harness.md.
"""

import json
import os
import time

from .harness import Trial, run_trial  # noqa: F401


def note(event, **fields):
    """Appends an event line to $MCF_DIR/events.<rank>. Any script run by the harness may
    call ``note("ready")`` once its job runs (``run --ready`` waits for every rank's before
    starting the fault clock) and ``note("detected")`` where it caught a failure (the harness
    then reports its detection time: fault -> that call)."""
    d = os.environ.get("MCF_DIR")
    if not d:
        return
    rec = dict(fields, event=event, t=time.monotonic(), rank=int(os.environ.get("RANK", -1)))
    with open(os.path.join(d, f"events.{rec['rank']}"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if event == "ready":  # `run --ready` starts the fault clock once every rank said so
        with open(os.path.join(d, f"ready.{rec['rank']}"), "w") as f:
            f.write(str(rec["t"]))

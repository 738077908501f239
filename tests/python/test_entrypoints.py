"""The installed package works without `import mooncake` (entry points), from a fresh
interpreter and through torchrun."""

import os
import re
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRESH = r"""
import sys
import torch
import torch.distributed as dist

rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
assert "MOONCAKE" not in dist.Backend._plugins, "registered before init_process_group"
dist.init_process_group("mooncake", store=dist.FileStore(path, world), rank=rank,
                        world_size=world)
assert dist.get_backend() == "mooncake", dist.get_backend()
t = torch.full((3,), float(rank + 1))
dist.all_reduce(t)
assert t.tolist() == [world * (world + 1) / 2] * 3, t
dist.destroy_process_group()
print("FRESH-OK", "mooncake._C" in sys.modules)
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_fresh_interpreter_without_import():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [subprocess.Popen([sys.executable, "-c", FRESH, str(r), str(world), store],
                                  cwd=tmp, env=_clean_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        try:
            outs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out}"
        assert "FRESH-OK True" in out, out


def _torchrun(backend, nproc, steps):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", os.path.join(REPO, "examples", "ddp_train.py")]
        p = subprocess.run(cmd, cwd=tmp, env=_clean_env(BACKEND=backend, STEPS=str(steps)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=240)
    assert p.returncode == 0, f"torchrun {backend} failed:\n{p.stdout[-4000:]}"
    losses = [float(x) for x in re.findall(r"^step +\d+ loss ([0-9.]+)$", p.stdout, re.M)]
    assert len(losses) == steps, p.stdout[-4000:]
    final = re.search(r"^final backend=(\S+) world=(\d+) .* params_in_sync=(\w+)$", p.stdout, re.M)
    assert final, p.stdout[-4000:]
    assert final.groups() == (backend, str(nproc), "True"), final.group(0)
    return losses


@pytest.mark.parametrize("nproc", [4])
def test_torchrun_ddp_example_matches_gloo(nproc):
    steps = 12
    mc = _torchrun("mooncake", nproc, steps)
    gl = _torchrun("gloo", nproc, steps)
    # Gradient sums may be accumulated in a different order than gloo's: allow rounding only.
    for step, (a, b) in enumerate(zip(mc, gl)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: {a} vs {b}"
    assert mc[-1] < mc[0], "training did not reduce the loss"


AUTOLOAD = r"""
import sys, warnings
import torch  # runs the torch.backends entry point (mooncake._autoload) on the way
import torch.distributed as dist
import mooncake

assert "mooncake" in sys.modules
# torch >= 2.14: the eager hook leaves registration to the lazy entry point.
assert "MOONCAKE" not in dist.Backend._plugins
# The torch < 2.14 path registers, idempotently...
mooncake._torch_version = lambda: (2, 13)
mooncake._autoload(); mooncake._autoload()
assert dist.Backend._plugins["MOONCAKE"].creator_fn is mooncake._create_backend
assert dist.Backend.backend_capability["mooncake"] == ["cpu"]
# ...and a failure there only warns: it must never break `import torch`.
def boom():
    raise RuntimeError("boom")
mooncake._register_c10d_backend = boom
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    mooncake._autoload()
assert any("boom" in str(x.message) for x in w), w
print("AUTOLOAD-OK")
"""


def test_torch_backends_autoload_hook_is_safe():
    p = subprocess.run([sys.executable, "-c", AUTOLOAD], env=_clean_env(), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                       cwd=tempfile.gettempdir())
    assert p.returncode == 0 and "AUTOLOAD-OK" in p.stdout, p.stdout[-3000:]

"""PyTorch's own generic distributed suite (DistributedTest._DistTestBase, shipped in the torch
wheel as torch.testing._internal.distributed.distributed_test) run against one backend.

    BACKEND=mooncake WORLD_SIZE=2 python -m pytest -q tests/torch_suite/run_suite.py [-k ...]

torch's own driver (test/distributed/test_distributed_spawn.py, not in the wheel) accepts only
gloo/nccl/ucc. This module is the same driver for any registered backend. Nothing in torch is
edited: the suite decides what to skip from BACKEND and from the feature sets in
common_distributed.DistTestCases when its decorators run, i.e. when distributed_test is
imported, so mooncake is added to the CPU feature sets before that import. Spawned ranks
re-import this module, so they see the same sets and registration.
"""

import os

os.environ.setdefault("BACKEND", "mooncake")
os.environ.setdefault("WORLD_SIZE", "2")
# A hung test fails after this many seconds instead of torch's default 300.
os.environ.setdefault("DISTRIBUTED_TESTS_DEFAULT_TIMEOUT", "120")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.testing._internal.common_distributed import DistTestCases  # noqa: E402

BACKEND = os.environ["BACKEND"]

if BACKEND not in ("gloo", "nccl", "ucc", "mpi"):
    import importlib

    importlib.import_module(BACKEND)  # registers the plugin (entry points would do it too)
    # CPU features the plugin provides; "gpu"/"cuda" stay unset so GPU-only tests skip.
    for feature in ("ddp", "subgroup", "plugin"):
        DistTestCases.backend_feature[feature].add(BACKEND)

from torch.testing._internal.distributed import distributed_test as _dt  # noqa: E402

torch.set_num_threads(1)  # several ranks share few cores


class TestDistBackendWithSpawn(_dt.TestDistBackend, _dt.DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()

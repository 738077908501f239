#!/usr/bin/env bash
# The main job: a 4-rank DDP training run on this machine over backend "mooncake".
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
PY=${PYTHON:-python3}
echo "== torchrun --standalone --nproc-per-node=4 examples/ddp_train.py"
exec $PY -m torch.distributed.run --standalone --nproc-per-node=4 examples/ddp_train.py

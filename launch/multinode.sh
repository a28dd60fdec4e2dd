#!/usr/bin/env bash
# Plain multi-node launch without a scheduler: run this once on every node.
#   node 0:  NODE_RANK=0 NNODES=2 HEAD=10.0.0.1 bash launch/multinode.sh --config configs/tiny.toml --parallel.pp 2 --parallel.dp 2
#   node 1:  NODE_RANK=1 NNODES=2 HEAD=10.0.0.1 bash launch/multinode.sh --config configs/tiny.toml --parallel.pp 2 --parallel.dp 2
# HEAD is an address of node 0 that every node can reach; the run directory must be shared.
# On one machine (a test of the launch itself) use HEAD=127.0.0.1 and start both in two shells.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}" "${NNODES:?set NNODES}" "${HEAD:?set HEAD (node 0 address)}"
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-2}" \
    --rdzv-backend c10d --rdzv-id "${RDZV_ID:-k25train}" --rdzv-endpoint "$HEAD:${RDZV_PORT:-29500}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m launch.train "$@"

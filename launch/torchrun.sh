#!/usr/bin/env bash
# Launch attnres-train with torchrun, on one node or many (c10d rendezvous).
#
#   launch/torchrun.sh model=small train.steps=200                       # one node, all local GPUs (or 1 CPU proc)
#   NPROC_PER_NODE=4 launch/torchrun.sh parallel.pp=2 parallel.tp=2       # 4 processes on this node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh ...          # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh ...          # on node1
#
# Every argument is passed to attnres-train as a hydra override.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$here/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=1
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-attnres-$MASTER_ADDR-$MASTER_PORT}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"   # torch.compile is slower than eager on CPU
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"           # several ranks share the cores
fi

if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" --node-rank "$NODE_RANK")
fi

echo "torchrun: nnodes=$NNODES node_rank=$NODE_RANK nproc_per_node=$NPROC_PER_NODE rendezvous=${rdzv[*]}" >&2
cd "$here"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv[@]}" \
  -m attnres_train.train "$@"

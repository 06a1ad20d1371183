#!/usr/bin/env bash
# Everything the GPU owes, in one command (for a machine with one CUDA device):
#   1. the GPU tests: Triton AttnRes kernels at the 48B shapes (bf16, fp32), TE layers vs the local
#      path, fla's chunk_kda vs the torch chunked KDA
#   2. the op benchmark at the 48B shapes and the paper's L=128/N=8/S=16 shapes (bf16): time and
#      achieved bandwidth of fused Triton vs torch two-phase vs naive vs the plain residual add
#   3. attnres-train-profile on the `small` model, one GPU: baseline vs block AttnRes
# Results land in bench/results/ (device, command and date inside each file).
#
#   bash bench/gpu_suite.sh            # or: make gpu-bench
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
DATE="$(date +%F)"
DEV="$("$PY" -c 'import torch,re; print(re.sub(r"[^a-z0-9]+","-",torch.cuda.get_device_name().lower()).strip("-"))')"

echo "== GPU tests" >&2
"$PY" -m pytest -q -m gpu tests 2>&1 | tee "bench/results/gpu_tests_${DEV}_${DATE}.log" | tail -5

echo "== op benchmark" >&2
"$PY" bench/attnres_op.py --preset kimi48b --tokens 16384 --name "attnres_op_${DEV}_kimi48b_${DATE}"
"$PY" bench/attnres_op.py --preset paper --tokens 16384 --name "attnres_op_${DEV}_paper_${DATE}"

echo "== model-level overhead (small, one GPU)" >&2
"$BIN/attnres-train-profile" --steps 20 --warmup 5 --repeats 3 --name "profile_small_1gpu_${DEV}_${DATE}" \
  model=small train.micro_batch_size=8 train.global_batch_size=32

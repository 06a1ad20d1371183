#!/usr/bin/env bash
# Everything the GPU owes, in one command (for a machine with one CUDA device):
#   tests    the GPU tests: Triton AttnRes kernels at the 48B shapes (bf16, fp32), TE layers vs the
#            local path, fla's chunk_kda vs the torch chunked KDA
#   op       the op benchmark at the 48B shapes and the paper's L=128/N=8/S=16 shapes (bf16): time
#            and achieved bandwidth of fused Triton vs torch two-phase vs naive vs the residual add
#   tiles    the Triton tile sweep at the 48B shapes (bf16): every candidate (BLOCK_T, BLOCK_D,
#            warps) of each kernel checked against the torch op and timed; the fastest goes into
#            triton_kernels.FWD_TILE / BWD_TILE / MERGE_TILE
#   profile  attnres-train-profile on the `small` model, one GPU: baseline vs block AttnRes
# Results land in bench/results/ (device, command and date inside each file).
#
#   bash bench/gpu_suite.sh                 # every step (or: make gpu-bench)
#   bash bench/gpu_suite.sh tiles profile   # some steps (e.g. to fit a per-command time limit)
#
# A failing step does not stop the others (a GPU session is scarce): each step's status is
# printed at the end, and the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
DATE="$(date +%F)"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests op tiles profile)
for s in "${STEPS[@]}"; do
  case "$s" in tests|op|tiles|profile) ;; *) echo "unknown step '$s' (tests, op, tiles, profile)" >&2; exit 2;; esac
done
RESULTS="${GPU_SUITE_RESULTS:-bench/results}"  # where the test log goes (the scripts write there too)
DEV="$("$PY" -c 'import torch,re; print(re.sub(r"[^a-z0-9]+","-",torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null)" \
  || { echo "no CUDA device: the GPU suite needs one" >&2; exit 2; }

step_tests() {
  "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests_${DEV}_${DATE}.log" | tail -5
}
step_op() {
  "$PY" -m bench.attnres_op --preset kimi48b --tokens 16384 --name "attnres_op_${DEV}_kimi48b_${DATE}" \
    && "$PY" -m bench.attnres_op --preset paper --tokens 16384 --name "attnres_op_${DEV}_paper_${DATE}"
}
step_tiles() {
  "$PY" -m bench.triton_tiles --preset kimi48b --tokens 16384 --name "triton_tiles_${DEV}_kimi48b_${DATE}"
}
step_profile() {
  "$BIN/attnres-train-profile" --steps 20 --warmup 5 --repeats 3 --name "profile_small_1gpu_${DEV}_${DATE}" \
    model=small train.micro_batch_size=8 train.global_batch_size=32
}

declare -A STATUS
failed=0
for s in "${STEPS[@]}"; do
  echo "== $s" >&2
  t0=$SECONDS
  if "step_$s"; then STATUS[$s]="ok"; else STATUS[$s]="FAILED"; failed=1; fi
  STATUS[$s]+=" ($((SECONDS - t0)) s)"
done
echo "== summary" >&2
for s in "${STEPS[@]}"; do echo "  $s: ${STATUS[$s]}" >&2; done
exit $failed

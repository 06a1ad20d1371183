"""PP=2 composed with tensor (TP=2), expert (EP=2) and data parallelism (DP=2, distributed
optimizer): loss and every gradient equal the unsplit single-process run (gloo, 4 CPU processes).

The reference weights and gradients travel through megatron's distributed checkpoints, which
reshard them into each rank's TP/EP/PP slice: the comparison is shard by shard and needs no
hand-written TP/EP mapping. The model runs in fp64 (compose_worker.DTYPE) except where megatron
or the model fix fp32: megatron's cross-entropy (vocab_parallel_cross_entropy casts the logits to
fp32, so the loss and the gradient entering the model carry fp32 rounding, which TP's split
softmax changes) and KDA's decay parameters (A_log, dt_bias: fp32 by design). Measured: fp64
parameters within 3e-8 relative (L2 over all: 4e-9), the fp32 ones within 5e-7; in fp32 the same
runs show 1e-5..1e-4 of reassociation noise. A lost TP partial sum or a wrong shard is >= 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from attnres_train.config.schema import ParallelConfig
from parallel.groups import free_port
from parallel.layout import layout_for
from tests.parallel import compose_worker

pytestmark = pytest.mark.slow

CASES = [
    {"name": "pp2-tp2", "tp": 2, "ep": 1},
    {"name": "pp2-ep2", "tp": 1, "ep": 2},  # DP=2 on the dense part, experts split in two
    {"name": "pp2-dp2", "tp": 1, "ep": 1},  # distributed optimizer (reduce-scattered grads)
]


def test_pp2_composed_with_tp_ep_dp(tmp_path):
    ref_dir, out_dir = tmp_path / "ref", tmp_path / "out"
    ref_dir.mkdir()
    out_dir.mkdir()
    mp.start_processes(compose_worker.reference, args=(1, free_port(), str(ref_dir)), nprocs=1, start_method="spawn")
    mp.start_processes(compose_worker.composed, args=(4, free_port(), CASES, str(ref_dir), str(out_dir)), nprocs=4,
                       start_method="spawn")
    ref_loss = json.loads((ref_dir / "reference.json").read_text())["loss"]
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(4)]
    for case in CASES:
        name = case["name"]
        per_rank = [res[name] for res in results]
        losses = [r["loss"] for r in per_rank if "loss" in r]
        assert losses, name
        # the last stage's DP ranks each see half the micro-batches: their mean is the global loss
        loss = sum(losses) / len(losses)
        assert abs(loss - ref_loss) <= 1e-7 * abs(ref_loss), (name, loss, ref_loss)
        diff = sum(r["diff_sq"] for r in per_rank)
        ref = sum(r["ref_sq"] for r in per_rank)
        assert all(r["num_grads"] > 0 for r in per_rank), name
        assert (diff / ref) ** 0.5 <= 1e-8, (name, (diff / ref) ** 0.5)
        assert max(r["max_rel_err"] for r in per_rank) <= 1e-7, (name, [r["max_rel_err"] for r in per_rank])
        assert max(r["max_rel_err_fp32"] for r in per_rank) <= 1e-5, name
        # payload bytes: every TP rank ships its sequence slice, every DP replica its micro-batches,
        # so over all ranks: micro-batches x layout tensors x [s, b, d] in fp64, each direction
        tensors = layout_for(compose_worker.model_config(), ParallelConfig(pp=2)).tensors_per_microbatch()
        expected = compose_worker.NUM_MICRO * tensors * 16 * compose_worker.MBS * 128 * 8
        for direction in ("forward", "backward"):
            assert sum(r["bytes"][direction] for r in per_rank) == expected, (name, direction)

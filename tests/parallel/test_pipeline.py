"""Pipeline parallelism with AttnRes payloads: exact against the single-stage run (gloo, CPU).

Reference: the unsplit model on the same micro-batches, same weights, fp32. The forward (loss) is
bitwise equal. Gradients differ only by the order in which fp32 sums are taken: a block's
gradient is accumulated from local uses and from deposits of later stages instead of inside one
graph. Stated tolerances: the whole gradient (all parameters of the rank) within 1e-6 relative
(L2), every single parameter within 1e-5 (small reductions such as KDA's A_log, a [H] vector summed
over all tokens, show ~1e-6 of fp32 reassociation noise). A lost or doubled deposit is O(1).
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from parallel.groups import free_port
from parallel.layout import build_layout, expected_aligned, paper_eq8
from tests.parallel import pp_worker

pytestmark = pytest.mark.slow

# Block size 3 sublayers: blocks span chunk boundaries, so a partial sum travels and one block's
# phase-1 pass is split between two stages.
CASES = [
    {"name": "block-S2", "model": {"residual": "block", "attnres.block_size": 2}},
    {"name": "full", "model": {"residual": "full"}},
    {"name": "standard", "model": {"residual": "standard"}},
    {"name": "block-S3", "model": {"residual": "block", "attnres.block_size": 3}},
    {"name": "block-S3-nocache", "model": {"residual": "block", "attnres.block_size": 3}, "cache": False},
]


def _run(P, V, tmp_path, cases):
    mp.start_processes(pp_worker.main, args=(P, free_port(), P, V, cases, str(tmp_path)), nprocs=P,
                       start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(P)]


# Four stages run interleaved (pp4-vpp2); the non-interleaved 1F1B schedule runs at pp2 (a pp4 case
# without VPP repeated both at 4 processes on the 2-core CI machine: 45 s)
# At four stages (4 processes on the 2-core CI machine) the cases whose payloads differ most: full
# AttnRes (every sublayer output a source) and blocks spanning chunks, with and without the cache.
PP4_CASES = [case for case in CASES if case["name"] in ("full", "block-S3", "block-S3-nocache")]


@pytest.mark.parametrize("P,V", [(2, 1), (2, 2), (4, 2)], ids=["pp2", "pp2-vpp2", "pp4-vpp2"])
def test_pipeline_equals_single_stage(P, V, tmp_path):
    cases = PP4_CASES if P == 4 else CASES
    _check(P, V, cases, _run(P, V, tmp_path, cases))


# Under PP=2 (and PP=2 x VPP=2): activation recomputation and uneven stages give the same loss and
# gradients as the unsplit run without recomputation. Block size 3 sublayers: recompute groups and
# stages cut through AttnRes blocks, so partial sums enter and leave checkpointed groups.
S3 = {"residual": "block", "attnres.block_size": 3}
SELECTIVE = {"recompute": "selective", "recompute_modules": ["core_attn", "layernorm", "mla_up_proj", "shared_experts"]}
COMPOSED = [
    {"name": "selective", "model": S3, "parallel": SELECTIVE},
    {"name": "full-1", "model": S3, "parallel": {"recompute": "full", "recompute_num_layers": 1}},
    {"name": "full-3", "model": S3, "parallel": {"recompute": "full", "recompute_num_layers": 3}},
    {"name": "full-standard", "model": {"residual": "standard"},
     "parallel": {"recompute": "full", "recompute_num_layers": 1}},
]
UNEVEN = {1: [3, 5], 2: [1, 3, 3, 1]}


# Interleaved only (its schedule runs the same recompute paths as plain 1F1B, which
# test_pipeline_equals_single_stage[pp2] covers): a V=1 repeat cost 20-30 s of the CI budget.
@pytest.mark.parametrize("V", [2], ids=["pp2-vpp2"])
def test_pipeline_recompute_and_uneven_stages(V, tmp_path):
    cases = COMPOSED + [{"name": "uneven", "model": S3, "parallel": {"layers_per_stage": UNEVEN[V]}},
                        {"name": "uneven-full", "model": {"residual": "full"},
                         "parallel": {"layers_per_stage": UNEVEN[V], "recompute": "full"}}]
    _check(2, V, cases, _run(2, V, tmp_path, cases))


# Three virtual stages (12 layers, 6 chunks of 2 layers): N_p = 2 (block size 2) and N_p = 1
# (block size 4) blocks per chunk; the measured bytes equal the closed form, below Eq. 8.
L12 = {"num_layers": 12, "layer_pattern": "KKKMKKKMKKKM"}
VPP3 = [{"name": "block-S2-np2", "model": {**L12, "residual": "block", "attnres.block_size": 2}},
        {"name": "block-S4-np1", "model": {**L12, "residual": "block", "attnres.block_size": 4}}]


def test_pipeline_vpp3_closed_form(tmp_path):
    results = _run(2, 3, tmp_path, VPP3)
    _check(2, 3, VPP3, results, num_layers=12)
    seq, mbs, hidden, num_micro = 16, 2, 128, 4
    for case, np_ in zip(VPP3, (2, 1)):
        tensors = sum(results[r][case["name"]]["bytes"]["forward"] for r in range(2)) // (seq * mbs * hidden * 4 * num_micro)
        assert tensors == expected_aligned(2, 3, np_) < paper_eq8(2, 3, np_), (case["name"], tensors)


def _check(P, V, cases, results, num_layers=8):
    seq, mbs, hidden, num_micro = 16, 2, 128, 2 * P
    for case in cases:
        name = case["name"]
        last = results[P - 1][name]
        assert last["loss"] == last["ref_loss"], (name, last)  # the forward is bitwise equal
        for r in range(P):
            res = results[r][name]
            assert res["num_grads"] > 0
            assert (res["diff_sq"] / res["ref_sq"]) ** 0.5 <= 1e-6, (name, r, res)
            assert res["grad_rel_err"] <= 1e-5, (name, r, res["grad_rel_err"])
        # bytes on the wire equal the layout's count, forward and backward, summed over ranks
        residual = case["model"]["residual"]
        bs = {"standard": None, "full": 1}.get(residual, case["model"].get("attnres.block_size"))
        layout = build_layout(num_layers, P, V, bs, cache=case.get("cache", True),
                              layers_per_stage=case.get("parallel", {}).get("layers_per_stage"))
        expected = layout.tensors_per_microbatch() * num_micro * seq * mbs * hidden * 4
        assert sum(results[r][name]["bytes"]["forward"] for r in range(P)) == expected, name
        assert sum(results[r][name]["bytes"]["backward"] for r in range(P)) == expected, name

"""`train.dry_run=true` with a pipeline layout: per-chunk layers/parameters/memory and the per-hop
AttnRes payloads in stdout and plan.json (attnres_train/plan.py), through the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from parallel.layout import build_layout, expected_aligned, naive_full, paper_eq7, paper_eq8

ROOT = Path(__file__).resolve().parents[1]

# The CLI, with its process groups initialised for one process whatever parallel.* says: a dry run is
# one process, and init_distributed refuses pp/ep > 1 in a world of 1. Idempotent once train.run
# itself initialises dry runs with single_process_parallel(cfg.parallel).
CLI = """
import sys
import parallel.groups as groups
from attnres_train.plan import single_process_parallel
init = groups.init_distributed
groups.init_distributed = lambda parallel_cfg: init(single_process_parallel(parallel_cfg))
sys.argv = ["attnres-train", *sys.argv[1:]]
from attnres_train.train import main
main()
"""

LAYERS_48B = [3, 4, 4, 4, 3, 3, 3, 3]  # 27 layers over pp*vpp = 8 chunks


def dry_run(run_dir: Path, *overrides, env: dict | None = None) -> tuple:
    cmd = [sys.executable, "-c", CLI, "train.dry_run=true", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(ROOT),
                                   OMP_NUM_THREADS="1", **(env or {})))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "plan.json").read_text()), proc.stdout


def check_common(plan: dict, layout, num_layers: int) -> None:
    stages = plan["stages"]
    # layers: 0..L-1 exactly once, in chunk order, the sizes of the layout
    assert [i for st in stages for i in st["layers"]] == list(range(num_layers))
    assert [len(st["layers"]) for st in stages] == list(layout.layers)
    assert [(st["rank"], st["vstage"]) for st in stages] == [(c % layout.pp, c // layout.pp)
                                                             for c in range(layout.num_chunks)]
    assert sum(st["params_total"] for st in stages) == plan["params_total"]
    assert sum(st["params_active"] for st in stages) == plan["params_active"]
    assert [st["embedding"] for st in stages] == [True] + [False] * (layout.num_chunks - 1)
    assert [st["lm_head"] for st in stages] == [False] * (layout.num_chunks - 1) + [True]
    # hops: the layout's tensors; bytes = tensors x s x b x d x bytes(dtype)
    hops = plan["hops"]
    assert [h["tensors"] for h in hops] == layout.tensors_per_hop()
    assert [(h["src"], h["dst_rank"]) for h in hops] == [(c, (c + 1) % layout.pp)
                                                         for c in range(layout.num_chunks - 1)]
    assert all(h["bytes"] == h["tensors"] * plan["tensor_bytes"] for h in hops)
    assert plan["bytes_per_microbatch"] == sum(h["bytes"] for h in hops)
    assert plan["bytes_per_step"] == 2 * plan["bytes_per_microbatch"] * plan["microbatches_per_step"]
    assert {"weights_grads_optimizer", "activations_per_layer", "in_flight"} <= set(plan["memory_assumptions"])
    for r in plan["ranks"]:
        mine = [st for st in stages if st["rank"] == r["rank"]]
        assert r["memory_bytes"] >= sum(st["memory_bytes"] for st in mine) > 0


def test_48b_pp4_vpp2_ep8(tmp_path):
    plan, out = dry_run(tmp_path, "model=kimi_linear_48b_a3b", "parallel.pp=4", "parallel.vpp=2", "parallel.ep=8",
                        f"parallel.layers_per_stage=[{','.join(map(str, LAYERS_48B))}]")
    layout = build_layout(27, 4, 2, 6, layers_per_stage=LAYERS_48B)
    check_common(plan, layout, 27)
    stages = plan["stages"]
    pattern = "KKKMKKKMKKKMKKKMKKKMKKKMKKM"
    assert "".join(t for st in stages for t in st["attention"]) == pattern
    assert [f for st in stages for f in st["ffn"]] == ["dense"] + ["moe"] * 26
    # per GPU (tp=1): each chunk holds 1/ep of its routed experts, the rest whole, so over the
    # chunks: params_total - routed·(1 - 1/ep)
    routed = plan["params_by_module"]["moe routed experts"]["total"]
    assert sum(st["params_per_gpu"] for st in stages) == plan["params_total"] - routed + routed // 8
    assert sum(st["expert_params_per_gpu"] for st in stages) == routed // 8
    # AttnRes hops: the layout's blocks and partial sums; S=6 does not fall on these chunk boundaries
    assert [(tuple(h["blocks"]), h["partial"]) for h in plan["hops"]] == [(h.blocks, h.partial) for h in layout.hops]
    assert plan["tensor_bytes"] == 4096 * 8 * 2304 * 2  # seq x micro-batch x d x bf16
    assert plan["microbatches_per_step"] == 4  # 32 / (8 x dp=1)
    assert plan["bytes_eq7"] is None and plan["bytes_eq8"] is None and plan["bytes_expected"] is None
    assert plan["bytes_naive_full"] is None and plan["pipeline"]["aligned_blocks_per_chunk"] is None
    # the table: one row per chunk, first and last rows carry embedding / head
    assert "   0   0     0     0-2    KKK    DEE    4,198,987,232" in out
    assert "+head" in out and "chunk 6 -> 7 (rank 2 -> 3)" in out and "dp=1 (assumed 1" in out


def test_tiny_aligned_closed_forms_and_world_size(tmp_path):
    # 4 layers over pp*vpp = 4 chunks: 2 sublayers per chunk = one block (S=2): aligned, N_p = 1.
    # A world of 4 GPUs: dp = 4 / pp = 2, so 32 / (8 x 2) = 2 micro-batches per step.
    plan, out = dry_run(tmp_path, "parallel.pp=2", "parallel.vpp=2", env={"ATTNRES_PLAN_WORLD_SIZE": "4"})
    layout = build_layout(4, 2, 2, 2)
    check_common(plan, layout, 4)
    tb = plan["tensor_bytes"]
    assert tb == 64 * 8 * 128 * 2
    assert plan["pipeline"]["dp"] == 2 and plan["microbatches_per_step"] == 2
    assert plan["pipeline"]["aligned_blocks_per_chunk"] == 1
    assert plan["bytes_per_microbatch"] == expected_aligned(2, 2, 1) * tb == 4 * tb
    assert plan["bytes_expected"] == plan["bytes_per_microbatch"]
    # the paper's Eq. 8 / Eq. 7 count non-embedding blocks only; the naive full count adds C-1 = 3
    assert plan["bytes_eq8"] == paper_eq8(2, 2, 1) * tb == 5 * tb
    assert plan["bytes_eq7"] == paper_eq7(2, 2, 1) * tb == 6 * tb
    assert plan["bytes_naive_full"] == naive_full(2, 2, 1) * tb == 9 * tb
    # ep = tp = 1: every GPU holds its chunks whole
    assert sum(st["params_per_gpu"] for st in plan["stages"]) == plan["params_total"]
    assert "this layout (full count: embedding + partial): 4 tensors" in out
    assert "paper Eq. 8 (cached, non-embedding blocks): 5 tensors" in out
    assert "paper Eq. 7 (naive, non-embedding blocks): 6 tensors" in out
    assert "naive full count (Eq. 7 + embedding hops): 9 tensors" in out


def test_tiny_naive_scheme_is_the_naive_full_count(tmp_path):
    plan, _ = dry_run(tmp_path, "parallel.pp=2", "parallel.vpp=2", "parallel.attnres_cache=false")
    layout = build_layout(4, 2, 2, 2, cache=False)
    check_common(plan, layout, 4)
    tb = plan["tensor_bytes"]
    assert plan["bytes_per_microbatch"] == plan["bytes_expected"] == plan["bytes_naive_full"] == 9 * tb
    assert plan["bytes_eq7"] == 6 * tb  # the paper's count leaves out the embedding's 3 hops


def test_standard_residual_one_hidden_state_per_hop(tmp_path):
    plan, out = dry_run(tmp_path, "model.residual=standard", "parallel.pp=4", "train.dtype=fp32")
    layout = build_layout(4, 4, 1, None)
    check_common(plan, layout, 4)
    assert plan["tensor_bytes"] == 64 * 8 * 128 * 4  # fp32
    assert [h["tensors"] for h in plan["hops"]] == [1, 1, 1]
    assert all(h["hidden"] and h["blocks"] == [] and not h["partial"] for h in plan["hops"])
    assert plan["bytes_eq7"] is None and plan["bytes_eq8"] is None and plan["bytes_naive_full"] is None
    assert all(r["attnres_block_bytes"] == 0 for r in plan["ranks"])
    # 1F1B: rank p holds pp - p micro-batches at its peak
    assert [r["microbatches_in_flight"] for r in plan["ranks"]] == [4, 3, 2, 1]
    assert "hidden state: 1 tensors" in out

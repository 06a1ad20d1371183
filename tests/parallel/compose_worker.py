"""Worker for PP=2 composed with TP, EP and DP (gloo, CPU): one process per rank.

`reference` (one process): the unsplit model (TP=PP=EP=DP=1) runs all micro-batches; its weights
and its gradients (written into the parameters of a second save) go to two megatron distributed
checkpoints. `composed` (4 processes): for each case the ranks build their chunks with the case's
TP/PP/EP/DP, load the reference weights through dist_checkpointing (which reshards them: TP
splits, expert-parallel expert ranges, pipeline layer ranges), run megatron's schedule through
parallel.Pipeline with megatron's DDP (distributed optimizer's reduce-scatter when DP > 1) and
compare every local gradient shard with the reference gradient resharded the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NUM_MICRO, MBS = 4, 2
# fp64 end to end (weights, p2p payloads, DDP grad buffers): TP splits row-parallel reductions and
# DP sums micro-batches in another order; in fp32 that reassociation noise reaches 1e-5..1e-4 on
# reductions over all tokens (KDA's A_log), in fp64 it is ~1e-9, so a real error cannot hide.
DTYPE = "float64"


def model_config():
    from tests.helpers import tiny_model_cfg

    # 8 layers, block size 3 sublayers: AttnRes blocks span the pipeline boundary; MoE from layer 2
    return tiny_model_cfg(num_layers=8, layer_pattern="KKKMKKKM", seq_length=16, residual="block",
                          **{"attnres.block_size": 3})


def _init(rank, world, port, tp=1, pp=1, ep=1):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from attnres_train import cpu_compat

    cpu_compat.apply()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(0)


def _save(model, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True)
    dist_checkpointing.save({"model0": model.sharded_state_dict()}, str(path), sharded_strategy=("torch_dist", 1))


def _load(chunk, path: Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model0": chunk.sharded_state_dict()}, str(path),
                                    sharded_strategy=("torch_dist", 1))
    chunk.load_state_dict(state["model0"], strict=False)  # strict=False: extra_state entries


def reference(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch

    from attnres_train.model.model import build_model
    from parallel.pipeline import _loss_func
    from tests.parallel.pp_worker import batches_for

    _init(rank, world, port)
    cfg = model_config()
    torch.manual_seed(0)
    ref = build_model(cfg, params_dtype=getattr(torch, DTYPE))
    with torch.no_grad():  # non-zero pseudo-queries: non-trivial depth mixes
        g = torch.Generator().manual_seed(1)
        for n, p in ref.named_parameters():
            if n.endswith(".query"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    out = Path(out_dir)
    _save(ref, out / "weights")
    loss_total = 0.0
    for b in batches_for(cfg, NUM_MICRO, MBS):
        loss, _ = _loss_func(b["loss_mask"], ref(b["tokens"], b["position_ids"], None, labels=b["labels"]))
        (loss / NUM_MICRO).backward()
        loss_total += loss.item() / NUM_MICRO
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.grad)
    _save(ref, out / "grads")
    (out / "reference.json").write_text(json.dumps({"loss": loss_total}))


def _gather_distributed_optimizer_shards(ddp_chunks) -> None:
    """With the distributed optimizer, finish_grad_sync reduce-scatters each bucket: every DP rank
    holds only its shard of the reduced gradient. All-gather the shards back into the buckets so
    every parameter's main_grad is complete (for the comparison only; training never needs it)."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in ddp_chunks:
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            pg = group.intra_distributed_optimizer_instance_group
            if pg.size() == 1:
                continue
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, pg.size())
                local = shards[pg.rank()].clone()
                dist.all_gather(list(shards), local, group=pg)


def run_case(case: dict, ref_dir: Path) -> dict:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from attnres_train.config.schema import ParallelConfig
    from attnres_train.model.model import build_model
    from parallel.layout import layout_for
    from parallel.pipeline import Pipeline
    from tests.parallel.pp_worker import batches_for

    cfg = model_config()
    pcfg = ParallelConfig(tp=case["tp"], pp=2, ep=case["ep"])
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()

    def chunk():
        return build_model(cfg, pcfg, pre_process=pre, post_process=post, params_dtype=getattr(torch, DTYPE))

    model, expected = chunk(), chunk()
    _load(model, ref_dir / "weights")
    _load(expected, ref_dir / "grads")  # its parameters now hold the reference gradients
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False,
                                               use_distributed_optimizer=dp > 1)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    ddp.zero_grad_buffer()

    per_rank = NUM_MICRO // dp
    batches = batches_for(cfg, NUM_MICRO, MBS)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    pipe = Pipeline([ddp], layout_for(cfg, pcfg), seq_length=cfg.seq_length, micro_batch_size=MBS)
    out = pipe.run(batches)  # megatron's schedule; ends with finalize_model_grads (DP reduction)
    if dp > 1:
        _gather_distributed_optimizer_shards([ddp])

    # KDA keeps its decay parameters (A_log, dt_bias) in fp32 whatever the model dtype (as Kimi
    # does): their gradients are compared separately, at fp32 precision.
    result = {"max_rel_err": 0.0, "max_rel_err_fp32": 0.0, "diff_sq": 0.0, "ref_sq": 0.0, "num_grads": 0,
              "dp": dp, "bytes": dict(pipe.comm.bytes_sent)}
    want = dict(expected.named_parameters())
    for name, p in model.named_parameters():
        got, ref = p.main_grad, want[name].detach()
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        err = (got - ref).norm().item() / max(ref.norm().item(), 1e-30)
        if os.environ.get("PP_DEBUG") and err > 1e-10:
            print("DEBUG", case["name"], name, err, flush=True)
        if p.dtype == torch.float32:
            result["max_rel_err_fp32"] = max(result["max_rel_err_fp32"], err)
            continue
        result["max_rel_err"] = max(result["max_rel_err"], err)
        result["diff_sq"] += (got - ref).double().pow(2).sum().item()
        result["ref_sq"] += ref.double().pow(2).sum().item()
        result["num_grads"] += 1
    if out:
        result["loss"] = sum(d["lm loss"].item() for d in out) / len(out)
    return result


def composed(rank: int, world: int, port: int, cases: list, ref_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    results = {}
    for case in cases:
        _init(rank, world, port, tp=case["tp"], pp=2, ep=case["ep"])
        results[case["name"]] = run_case(case, Path(ref_dir))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    ps.destroy_model_parallel()
    dist.destroy_process_group()

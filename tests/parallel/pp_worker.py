"""Worker for the pipeline exactness tests: one process per pipeline rank (gloo, CPU).

Each rank builds the single-stage reference model itself, runs every micro-batch through it, then
builds its own pipeline chunks with the reference's weights (matched by global parameter name),
runs megatron's schedule through parallel.Pipeline and compares loss and every gradient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def batches_for(cfg, num_micro: int, mbs: int):
    import torch

    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(num_micro):
        tokens = torch.randint(0, cfg.vocab_size, (mbs, cfg.seq_length + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "loss_mask": torch.ones(mbs, cfg.seq_length),
                    "position_ids": torch.arange(cfg.seq_length).expand(mbs, -1)})
    return out


def global_name(chunk, name: str) -> str:
    """A chunk's parameter name with its local layer index replaced by the global one (PP only:
    TP/EP shards need a resharding checkpoint, see compose_worker.py)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def run_case(cfg, P: int, V: int, num_micro: int, mbs: int, cache: bool = True, parallel: dict | None = None) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from attnres_train.config.schema import ParallelConfig
    from attnres_train.model.model import build_model
    from parallel.layout import layout_for
    from parallel.pipeline import Pipeline, _loss_func

    torch.manual_seed(0)
    ref = build_model(cfg)
    with torch.no_grad():  # non-zero pseudo-queries (as after some training): non-trivial depth mixes
        g = torch.Generator().manual_seed(1)
        for n, p in ref.named_parameters():
            if n.endswith(".query"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    batches = batches_for(cfg, num_micro, mbs)
    ref_loss = 0.0
    for b in batches:
        loss, _ = _loss_func(b["loss_mask"], ref(b["tokens"], b["position_ids"], None, labels=b["labels"]))
        (loss / num_micro).backward()
        ref_loss += loss.item() / num_micro
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_state = ref.state_dict()

    pcfg = ParallelConfig(pp=P, vpp=V, attnres_cache=cache, **(parallel or {}))
    chunks = []
    for v in range(V):
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)
        chunk = build_model(cfg, pcfg, pre_process=pre, post_process=post,
                            vp_stage=v if V > 1 else None)
        chunk.load_state_dict({n: ref_state[global_name(chunk, n)] for n in chunk.state_dict()})
        chunks.append(chunk)
    layout = layout_for(cfg, pcfg)
    pipe = Pipeline(chunks, layout, seq_length=cfg.seq_length, micro_batch_size=mbs)
    out = pipe.run(batches)
    result = {"grad_rel_err": 0.0, "num_grads": 0, "bytes": dict(pipe.comm.bytes_sent),
              "diff_sq": 0.0, "ref_sq": 0.0}
    for chunk in chunks:
        for n, p in chunk.named_parameters():
            ref_g = ref_grads[global_name(chunk, n)]
            assert p.grad is not None, n
            # relative error ||g - g_ref|| / ||g_ref||: the pipeline adds a block's gradient
            # contributions (local uses, received deposits) in another order than one graph does
            err = (p.grad - ref_g).norm().item() / max(ref_g.norm().item(), 1e-30)
            if os.environ.get("PP_DEBUG") and err > 3e-7:
                print("DEBUG", global_name(chunk, n), err, flush=True)
            result["grad_rel_err"] = max(result["grad_rel_err"], err)
            result["diff_sq"] += (p.grad - ref_g).double().pow(2).sum().item()
            result["ref_sq"] += ref_g.double().pow(2).sum().item()
            result["num_grads"] += 1
    if out:
        loss = sum(d["lm loss"].item() for d in out) / len(out)
        result["loss"], result["ref_loss"] = loss, ref_loss
        if os.environ.get("PP_DEBUG"):
            print("DEBUG loss", repr(loss), repr(ref_loss), flush=True)
    return result


def main(rank: int, world: int, port: int, P: int, V: int, cases: list, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from attnres_train import cpu_compat

    cpu_compat.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tests.helpers import tiny_model_cfg

    ps.initialize_model_parallel(1, P, virtual_pipeline_model_parallel_size=V if V > 1 else None)
    model_parallel_cuda_manual_seed(0)
    results = {}
    for case in cases:
        cfg = tiny_model_cfg(**{"num_layers": 8, "layer_pattern": "KKKMKKKM", "seq_length": 16, **case["model"]})
        results[case["name"]] = run_case(cfg, P, V, case.get("num_micro", 2 * P), mbs=2,
                                         cache=case.get("cache", True), parallel=case.get("parallel"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    ps.destroy_model_parallel()
    dist.destroy_process_group()

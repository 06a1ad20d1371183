"""One training step and one validation pass, through parallel.Pipeline (megatron's schedules).

The schedule owns micro-batching, gradient accumulation and pipeline p2p; the pipeline runtime
supplies forward_step and, under AttnRes, the block-summary payloads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def train_step(pipeline, optimizer, scheduler, batches) -> dict:
    """Forward+backward over this rank's micro-batches ([B, S] dicts), optimizer step, LR step.
    Returns loss (mean over the global batch, on every rank), grad_norm and update_ok."""
    for chunk in pipeline.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = pipeline.run(batches)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    loss = _loss_on_all_ranks([d["lm loss"].item() for d in out])
    return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(ok)}


def evaluate(pipeline, batches) -> float:
    """The mean loss over `batches` (forward only, eval mode), on every rank."""
    for chunk in pipeline.chunks:
        chunk.eval()
    with torch.no_grad():
        out = pipeline.run(batches, forward_only=True)
    for chunk in pipeline.chunks:
        chunk.train()
    return _loss_on_all_ranks([d["lm loss"].item() for d in out])


def _loss_on_all_ranks(losses: list) -> float:
    """Micro-batch losses live on the last pipeline stage: average them over data-parallel ranks
    there, then share the value with the other stages."""
    value = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
        group = ps.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
        value[0] = t[0] / t[1].clamp(min=1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return value.item()

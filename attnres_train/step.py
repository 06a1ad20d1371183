"""One training step and one validation pass, through parallel.Pipeline (megatron's schedules).

The schedule owns micro-batching, gradient accumulation and pipeline p2p; the pipeline runtime
supplies forward_step and, under AttnRes, the block-summary payloads.

A step whose loss or gradients are not finite on any rank skips its update: megatron's optimizer
checks for inf/NaN only with a loss scaler (fp16), and without one a NaN gradient norm turns every
parameter into NaN through the clipping coefficient. Every rank takes part in the one all-reduce
that decides, so pipeline stages and data-parallel replicas skip the same steps and none hangs.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def train_step(pipeline, optimizer, scheduler, batches) -> dict:
    """Forward+backward over this rank's micro-batches ([B, S] dicts), then the optimizer and LR
    steps, unless the loss or a gradient is not finite somewhere (then neither runs, as megatron
    skips a step whose loss scaler found an inf). Returns loss (mean over the global batch, on every
    rank), grad_norm (nan when skipped) and update_ok."""
    for chunk in pipeline.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = pipeline.run(batches)
    loss = _loss_on_all_ranks([d["lm loss"].item() for d in out])
    if not all_finite(grad_buffers(pipeline.chunks), extra=loss):
        return {"loss": loss, "grad_norm": float("nan"), "update_ok": False}
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(ok)}


def grad_buffers(ddp_chunks: list) -> list:
    """The gradient buffers megatron's DDP accumulates into (every parameter's main_grad is a view)."""
    return [b.grad_data for chunk in ddp_chunks for b in chunk.buffers + chunk.expert_parallel_buffers]


def model_state_tensors(model_chunks: list, optimizer) -> list:
    """What a checkpoint writes of the model and optimizer: the parameters, the optimizer's own
    (master) parameters and its moments (Adam's exp_avg, exp_avg_sq), each once (without a
    separate master copy the optimizer's parameters are the model's)."""
    tensors = {id(p): p for chunk in model_chunks for p in chunk.parameters()}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors.update((id(p), p) for group in inner.param_groups for p in group["params"])
        tensors.update((id(v), v) for state in inner.state.values() for v in state.values()
                       if torch.is_tensor(v) and v.is_floating_point())
    return list(tensors.values())


def all_finite(tensors: Iterable[torch.Tensor], extra: float = 0.0) -> bool:
    """Whether every element of `tensors` (and `extra`) is finite on every rank: one all-reduce
    (on the device NCCL needs; no host sync per tensor)."""
    flag = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    if not math.isfinite(extra):
        flag += 1
    for t in tensors:
        flag += (~torch.isfinite(t)).any()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


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

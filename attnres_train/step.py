"""One training step and one validation pass through megatron-core's pipeline schedules.

The schedule (`get_forward_backward_func`) owns micro-batching, gradient accumulation and pipeline
p2p; we supply `forward_step(data_iterator, model) -> (per-token losses, loss_func)`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean token loss of one micro-batch (the schedule divides by the micro-batch count)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _mean_over_dp(values: list, group) -> float:
    """Mean of the last pipeline stage's micro-batch losses, averaged over data-parallel ranks."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return (t[0] / t[1].clamp(min=1)).item()


def _run_schedule(model_chunks, batches, *, seq_length, micro_batch_size, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=it,
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks, optimizer, scheduler, batches, *, seq_length, micro_batch_size) -> dict:
    """Forward+backward over this rank's micro-batches, optimizer step, LR step."""
    from megatron.core import parallel_state

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = _run_schedule(model_chunks, batches, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    losses = [d["lm loss"].item() for d in out] if out else []
    loss = _broadcast_from_last_stage(losses, parallel_state)
    return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(ok)}


def evaluate(model_chunks, batches, *, seq_length, micro_batch_size) -> float:
    from megatron.core import parallel_state

    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        out = _run_schedule(model_chunks, batches, seq_length=seq_length,
                            micro_batch_size=micro_batch_size, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    losses = [d["lm loss"].item() for d in out] if out else []
    return _broadcast_from_last_stage(losses, parallel_state)


def _broadcast_from_last_stage(losses: list, ps) -> float:
    """The loss lives on the last pipeline stage: average it over DP there, share it with all ranks."""
    value = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        value[0] = _mean_over_dp(losses, ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return value.item()

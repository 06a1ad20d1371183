"""megatron-core optimizer (AdamW, always megatron's distributed optimizer) and LR schedule.

The distributed optimizer serves every layout, data-parallel size 1 included, so that a checkpoint
holds one optimizer format whatever the layout it was saved on: megatron's model-space format
(each Adam moment shaped and sharded like its parameter), which reshards across TP, PP, EP and DP
as the weights do. A plain optimizer at DP=1 would save a different structure, and a run could
not move between one process and several.
"""

from __future__ import annotations

import megatron.core.optimizer as mopt  # attribute lookup at call time: cpu_compat wraps get_megatron_optimizer
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

SCHEDULES = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def wrap_chunks(model_chunks: list) -> list:
    """Each model chunk in megatron's DDP, configured for the distributed optimizer (its grad
    buffers are what the optimizer shards); fp32 gradient reduction, no overlap."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    return [DistributedDataParallel(c.config, ddp_config, c) for c in model_chunks]


def build_optimizer(train_cfg, model_chunks, *, params_dtype: torch.dtype):
    """megatron's DistributedOptimizer (a ChainedOptimizer of them when experts have their own
    parameter group) over the DDP-wrapped `model_chunks`, built with use_distributed_optimizer."""
    config = mopt.OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,  # megatron skips 1-D params (norms, AttnRes, A_log)
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=True,
    )
    optimizer = mopt.get_megatron_optimizer(config, model_chunks)
    if torch_adams(optimizer):
        _keep_adam_step_on_state_load()
    return optimizer


def torch_adams(optimizer) -> list:
    """The torch.optim Adam/AdamW instances inside a megatron optimizer (chained or not); empty
    where TE's or Apex's fused Adam runs instead."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p.optimizer for p in parts if isinstance(p.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def allocate_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam the state its first step would create (step 0,
    zero moments), leaving existing state alone.

    Why: megatron's DistributedOptimizer, without TE or Apex, reads Adam's step from that
    per-parameter state when it builds a checkpoint template (`state_dict()` asserts one step
    value), which fails on an optimizer that has not stepped yet: the state of a resume."""
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


def _keep_adam_step_on_state_load() -> None:
    """Patch DistributedOptimizer._set_main_param_and_optimizer_states (idempotent) so that a
    moment-only source leaves each parameter's Adam step as it is.

    Why: megatron-core 0.16.1 loads the model-space formats by copying every key of a torch
    Adam's per-parameter state from the checkpoint's tensors, which hold no "step" (the step comes
    from the param groups, set by load_state_dict just before): the copy raises KeyError('step').
    TE's and Apex's fused Adams keep no per-parameter step, so only the torch path needs this."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "keeps_adam_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}  # copied onto itself: kept
        return original(self, model_param, tensors)

    set_states.keeps_adam_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def untie_adam_steps(optimizer) -> None:
    """One step tensor per parameter after a load.

    Why: megatron's DistributedOptimizer.load_state_dict hands every parameter the same step
    tensor, and torch's Adam increments each parameter's step in place, so a shared one would
    advance once per parameter each step and skew the bias correction from the first update on."""
    for adam in torch_adams(optimizer):
        for state in adam.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def build_scheduler(train_cfg, optimizer):
    style = SCHEDULES[train_cfg.lr_schedule]
    steps = train_cfg.steps
    warmup = min(train_cfg.warmup_steps, steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1),
        lr_decay_style=style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(train_cfg.wsd_decay_fraction * steps)) if style == "WSD" else None,
        lr_wsd_decay_style="cosine" if style == "WSD" else None,
    )

"""megatron-core optimizer (AdamW; distributed optimizer when data-parallel > 1) and LR schedule."""

from __future__ import annotations

import megatron.core.optimizer as mopt  # attribute lookup at call time: cpu_compat wraps get_megatron_optimizer
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

SCHEDULES = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def build_optimizer(train_cfg, model_chunks, *, params_dtype: torch.dtype, dp_size: int):
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
        use_distributed_optimizer=dp_size > 1,
    )
    return mopt.get_megatron_optimizer(config, model_chunks)


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

"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) + megatron's model-parallel groups."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from attnres_train.config.validate import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world_size(world_size: int, tp: int, pp: int, ep: int) -> int:
    """Returns the data-parallel size; raises ConfigError if the sizes do not fit the world."""
    if world_size % (tp * pp):
        raise ConfigError(
            "parallel", f"tp={tp} pp={pp}",
            f"world size {world_size} is not divisible by tp*pp={tp * pp}: launch a multiple of "
            f"{tp * pp} processes or change parallel.tp / parallel.pp",
        )
    dp = world_size // (tp * pp)
    if dp % ep:
        raise ConfigError(
            "parallel.ep", ep,
            f"expert parallelism splits the data-parallel ranks: dp={dp} (world {world_size} / "
            f"tp*pp {tp * pp}) is not divisible by ep={ep}",
        )
    return dp


def init_distributed(parallel_cfg) -> None:
    """Initialise torch.distributed (single process works without torchrun) and megatron groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single-process run
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    check_world_size(dist.get_world_size(), parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.ep)
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(parallel_cfg)


def init_model_parallel(parallel_cfg) -> None:
    """megatron's model-parallel groups for these sizes (data parallel takes the rest)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp if parallel_cfg.vpp > 1 else None,
        expert_model_parallel_size=parallel_cfg.ep,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

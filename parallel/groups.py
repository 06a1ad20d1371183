"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) + megatron's model-parallel groups."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from attnres_train.errors import ConfigError


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """All ranks of the default group meet here (a no-op without torch.distributed)."""
    if is_distributed():
        dist.barrier()


def check_world_size(world_size: int, tp: int, pp: int, ep: int) -> int:
    """Returns the data-parallel size; raises ConfigError if the sizes do not fit the world."""
    if world_size % (tp * pp):
        raise ConfigError(
            "WORLD_SIZE", world_size,
            f"world size {world_size} is not divisible by tp*pp={tp * pp} (parallel.tp={tp}, "
            f"parallel.pp={pp}): launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp",
        )
    dp = world_size // (tp * pp)
    if dp % ep:
        raise ConfigError(
            "parallel.ep", ep,
            f"expert parallelism splits the data-parallel ranks: dp={dp} (world {world_size} / "
            f"tp*pp {tp * pp}) is not divisible by ep={ep}",
        )
    return dp


def gpu_for_local_rank(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The CUDA device of this rank (one GPU per rank); ConfigError where the node has fewer GPUs
    than ranks. NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
    detected"), and gloo cannot send CUDA tensors, so several pipeline stages cannot share one
    GPU: say so before anything is built, instead of an invalid-ordinal or NCCL error later."""
    if local_rank >= device_count or local_world_size > device_count:
        raise ConfigError(
            "LOCAL_WORLD_SIZE", local_world_size,
            f"this node has {device_count} visible GPU(s) but {local_world_size} ranks: NCCL needs "
            f"one GPU per rank (two ranks on one GPU are refused). Launch at most {device_count} "
            "processes per node (torchrun --nproc_per_node, attnres-train-profile --nproc), give "
            "each rank its own GPU (CUDA_VISIBLE_DEVICES), or run on CPU with gloo",
        )
    return local_rank


def init_distributed(parallel_cfg) -> None:
    """Initialise torch.distributed (single process works without torchrun) and megatron groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single-process run
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
            torch.cuda.set_device(gpu_for_local_rank(local_rank, local_world, torch.cuda.device_count()))
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

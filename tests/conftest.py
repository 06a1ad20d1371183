"""Shared pytest fixtures: a one-process megatron world on gloo (CPU) for model tests."""

from __future__ import annotations

import pytest
import torch

from attnres_train import cpu_compat  # (its package import sets the CPU environment)
from parallel.groups import free_port

cpu_compat.apply()


@pytest.fixture(scope="session")
def _gloo_world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def mcore_world(_gloo_world):
    """megatron parallel state with TP=PP=EP=1 and seeded RNG; torn down after the test."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()

"""Process settings every entry point needs before megatron is imported; runs once, on package import.

Without CUDA, megatron's `jit_fuser` (torch.compile) is slower than eager and takes seconds to warm
up, so TorchDynamo is disabled unless the caller set TORCHDYNAMO_DISABLE itself; megatron's warnings
about optional packages the CPU path does without are filtered before it prints them. `attnres_train`'s
`__init__` imports this module first, so every entry point (`attnres-train`, the profiler, test
workers, `python -m attnres_train....`) gets the same environment without repeating it.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

#: warnings megatron emits at import and on every save/load, about optional packages (TE, Apex)
#: whose absence the CPU path expects and about APIs it uses itself
QUIET_WARNINGS = (r".*(Transformer Engine|Apex).* not installed.*", r".*full scope is deprecated.*",
                  r".*ShardedTensor.*", r".*`load_state_dict` is deprecated.*")


def configure_process_environment() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def quiet_third_party() -> None:
    """megatron logs every bucket's parameter list and its config at INFO; its import-time
    warnings must be filtered before it is imported."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


configure_process_environment()
quiet_third_party()

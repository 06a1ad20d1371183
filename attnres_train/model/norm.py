"""RMSNorm for the pure-torch (CPU) path, usable under sequence parallelism.

megatron's local norm (WrappedTorchNorm) refuses sequence parallelism, which megatron requires for
MoE under tensor parallelism. The math is torch's RMSNorm; the only addition is the
`sequence_parallel` flag on the weight: under SP each TP rank normalises a slice of the tokens, so
its weight gradient is partial and finalize_model_grads sums it over the TP group.
State-dict names are unchanged (`weight`), so checkpoints are interchangeable with the local norm.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """x: [..., hidden_size] -> same shape; weight [hidden_size] (ones at init)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)

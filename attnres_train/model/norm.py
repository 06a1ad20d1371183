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


# MLA's kv latent norm (kv_a_layernorm) keeps the class default eps in Kimi Linear, as in
# DeepSeek-V3 whose MLA it takes: 1e-6, not the model's rms_norm_eps (1e-5). transformers' Kimi
# Linear builds it so too; with rms_norm_eps here the logits would differ by ~1e-4 relative.
KV_LATENT_NORM_EPS = 1e-6


def with_fixed_eps(norm: type, eps: float) -> type:
    """A subclass of the norm class `norm` that uses `eps` whatever eps its builder passes
    (megatron's MLA passes layernorm_epsilon to kv_layernorm). Handles classes that build in
    __init__ (torch norms) and factory classes that build in __new__ (megatron's TENorm)."""
    if "__new__" in vars(norm):
        def __new__(cls, config, hidden_size, eps_unused=None, **kwargs):
            kwargs.pop("eps", None)
            return norm(config=config, hidden_size=hidden_size, eps=eps, **kwargs)

        return type(f"{norm.__name__}Eps{eps:g}", (norm,), {"__new__": __new__})

    def __init__(self, config, hidden_size, *args, **kwargs):
        kwargs.pop("eps", None)
        norm.__init__(self, config, hidden_size, eps=eps, **kwargs)

    return type(f"{norm.__name__}Eps{eps:g}", (norm,), {"__init__": __init__})

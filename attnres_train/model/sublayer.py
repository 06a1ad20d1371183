"""One AttnRes sublayer's parameters, and the transformer layer that runs its two sublayers apart.

Every attention and every FFN is a sublayer with its own pseudo-query w (zero-initialised: uniform
depth weights at step 0) and key-RMSNorm gain γ (ones). The logit of source v is (w⊙γ)·v/rms(v).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor


class DepthQuery(MegatronModule):
    """Pseudo-query `query` [D] and key RMSNorm gain `key_norm_weight` [D] of one sublayer."""

    def __init__(self, config, eps: Optional[float] = None):
        super().__init__(config=config)
        d = config.hidden_size
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.query = torch.nn.Parameter(torch.empty(d, dtype=config.params_dtype))
        self.key_norm_weight = torch.nn.Parameter(torch.empty(d, dtype=config.params_dtype))
        # Replicated across TP like norm weights; under sequence parallelism each rank sees a
        # slice of the tokens, so the grads must be summed over TP (finalize_model_grads does
        # that for params flagged sequence_parallel).
        for p in (self.query, self.key_norm_weight):
            setattr(p, "sequence_parallel", config.sequence_parallel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query.device.type == "meta":
            return
        with torch.no_grad():
            self.query.zero_()
            self.key_norm_weight.fill_(1.0)


def residual_free_bda(training: bool, fused: bool):
    """Bias-dropout *without* the residual add: megatron's bda protocol, f(x_with_bias, residual, p).

    AttnRes layers return the raw sublayer output f_l(h_l); the depth mix replaces the residual.
    """

    def bda(x_with_bias, residual, prob: float) -> Tensor:
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return torch.nn.functional.dropout(x, p=prob, training=training)

    return bda


class AttnResTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer whose attention and FFN sublayers are called separately.

    The block computes each sublayer's input (the AttnRes mix) and calls `attention_sublayer` and
    `ffn_sublayer`; both reuse TransformerLayer's own helpers, so PreNorm, selective recompute,
    MoE (router, aux losses, expert bias) and the attention-module swap (KDA/MLA) keep working.
    The spec must give `self_attn_bda` and `mlp_bda` = `residual_free_bda`.
    """

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.attn_res = DepthQuery(config)
        self.mlp_res = DepthQuery(config)

    def attention_sublayer(self, h: Tensor, **kwargs) -> Tensor:
        """f(h) = Attn(PreNorm(h)) with dropout, no residual. h: [s, b, d]."""
        out, _ = self._forward_attention(h, **kwargs)
        return out

    def ffn_sublayer(self, h: Tensor, inference_context=None, padding_mask=None) -> Tensor:
        """f(h) = FFN(PreNorm(h)) (dense MLP or MoE incl. shared expert), no residual."""
        return self._forward_mlp(h, inference_context, padding_mask=padding_mask)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "AttnResTransformerLayer is driven sublayer by sublayer by AttnResTransformerBlock"
        )

"""Kimi Linear with Block Attention Residuals, on transformers' own Kimi Linear modules.

Written by attnres-train into every export of an AttnRes model (with its configuration file), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it with transformers
alone. The attention (KDA or MLA), FFN (dense or MoE), norms, embedding and LM head are
transformers' KimiLinear modules, unchanged; only the wiring between sublayers differs.

AttnRes. Every attention and every FFN is a sublayer l = 2·layer + (0 attention, 1 FFN). Instead
of the running residual sum, sublayer l reads a softmax mix over depth of its *sources*: the token
embedding, the completed block summaries, and the partial sum of the current block,

    h_l = sum_j a_j v_j,   a = softmax_j((w_l ⊙ γ_l) · v_j / rms(v_j)),

with a learned pseudo-query w_l and key-norm gain γ_l per sublayer (input-independent: nothing
is computed from the token to form the query). Its output starts the partial sum of a new block
when l is a multiple of the block size S, else it is added to the partial sum; a block's partial
sum is frozen into a block summary when the next block starts. A last mix (`model.final_res`) over
all sources feeds the final RMSNorm and the LM head. S = 1 is Full AttnRes.

Parameters (beside Kimi Linear's, in the module layout transformers' KimiLinearForCausalLM uses):
    model.layers.{i}.attn_res.query, .key_norm_weight   [hidden]  sublayer 2i (attention)
    model.layers.{i}.mlp_res.query,  .key_norm_weight   [hidden]  sublayer 2i+1 (FFN)
    model.final_res.query, .key_norm_weight             [hidden]  the final aggregate
A zero query weighs the sources uniformly (it is not the standard residual).

Caches: transformers' unchanged (MLA keys/values, KDA convolution and recurrent state). The
sources are per token, so AttnRes keeps nothing across decoding steps.
"""

import contextlib
import importlib
import sys

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_kimi_linear_attnres import KimiLinearAttnResConfig

KIMI_LINEAR_MODULE = "transformers.models.kimi_linear.modeling_kimi_linear"
KERNEL_PACKAGES = ("fla", "causal_conv1d")


def kimi_linear_modeling():
    """transformers' modeling_kimi_linear, with its PyTorch kernels where CUDA is missing.

    transformers binds its KDA and short-convolution kernels when the module is imported: fla's and
    causal_conv1d's where those packages import, else its PyTorch reference functions. fla imports
    on a machine without a GPU and then fails at its first call, so without CUDA the module is
    imported with both packages hidden (a `None` entry in sys.modules makes `import p` fail).
    """
    if KIMI_LINEAR_MODULE in sys.modules or torch.cuda.is_available():
        return importlib.import_module(KIMI_LINEAR_MODULE)
    saved = {p: sys.modules.get(p, False) for p in KERNEL_PACKAGES}
    with contextlib.ExitStack() as restore:
        for p, mod in saved.items():
            sys.modules[p] = None
            restore.callback(lambda p=p, mod=mod: sys.modules.pop(p, None) if mod is False
                             else sys.modules.__setitem__(p, mod))
        return importlib.import_module(KIMI_LINEAR_MODULE)


_kimi = kimi_linear_modeling()
KimiLinearDecoderLayer = _kimi.KimiLinearDecoderLayer
KimiLinearForCausalLM = _kimi.KimiLinearForCausalLM
KimiLinearPreTrainedModel = _kimi.KimiLinearPreTrainedModel
KimiLinearRMSNorm = _kimi.KimiLinearRMSNorm
KimiLinearTopkRouter = _kimi.KimiLinearTopkRouter
KimiLinearAttention = _kimi.KimiLinearAttention


def depth_mix(sources, query: torch.Tensor, key_norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """AttnRes over depth. sources: k tensors [B, T, D]; query, key_norm_weight: [D].

    Returns [B, T, D]: sum_j softmax_j((query ⊙ key_norm_weight) · v_j / rms(v_j)) v_j, computed in
    at least float32 (float64 stays float64) and returned in the sources' dtype.
    """
    dtype = sources[0].dtype
    compute = torch.promote_types(dtype, torch.float32)
    values = torch.stack([s.to(compute) for s in sources])  # [k, B, T, D]
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps)
    logits = keys @ (query.to(compute) * key_norm_weight.to(compute))  # [k, B, T]
    weights = torch.softmax(logits, dim=0).unsqueeze(-1)
    return (weights * values).sum(0).to(dtype)


class KimiLinearAttnResDepthQuery(nn.Module):
    """One sublayer's pseudo-query `query` [D] (zeros at init) and key-norm gain `key_norm_weight`
    [D] (ones)."""

    def __init__(self, config: KimiLinearAttnResConfig):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(config.hidden_size))
        self.key_norm_weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.rms_norm_eps

    def forward(self, sources) -> torch.Tensor:
        return depth_mix(sources, self.query, self.key_norm_weight, self.eps)


class KimiLinearAttnResDecoderLayer(KimiLinearDecoderLayer):
    """transformers' Kimi Linear layer (same attention, FFN and norms) with AttnRes between its
    two sublayers instead of the residual adds."""

    def __init__(self, config: KimiLinearAttnResConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.block_size = config.attn_res_block_size_sublayers
        self.attn_res = KimiLinearAttnResDepthQuery(config)
        self.mlp_res = KimiLinearAttnResDepthQuery(config)

    def forward(self, *sources, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs):
        """sources: the embedding, the completed block summaries and (after the first layer) the
        current block's partial sum, each [B, T, D], passed positionally (so gradient
        checkpointing sees them). Returns the sources after this layer's two sublayers."""
        blocks, partial = (list(sources), None) if self.layer_idx == 0 else (list(sources[:-1]), sources[-1])
        for kind in (0, 1):
            sublayer = 2 * self.layer_idx + kind
            if sublayer % self.block_size == 0 and partial is not None:
                blocks.append(partial)  # the previous block is complete
                partial = None
            mix = self.attn_res if kind == 0 else self.mlp_res
            h = mix(blocks if partial is None else blocks + [partial])
            if kind == 0:
                out = self._attention(self.input_layernorm(h), attention_mask, position_ids, past_key_values,
                                      use_cache, **kwargs)
            else:
                out = self.mlp(self.post_attention_layernorm(h))
            partial = out if partial is None else partial + out
        return (*blocks, partial)

    def _attention(self, x, attention_mask, position_ids, past_key_values, use_cache, **kwargs):
        if self.block_type == "linear_attention":
            return self.self_attn(hidden_states=x, cache_params=past_key_values, attention_mask=attention_mask,
                                  **kwargs)
        out, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        return out


class KimiLinearAttnResPreTrainedModel(KimiLinearPreTrainedModel):
    config_class = KimiLinearAttnResConfig
    config: KimiLinearAttnResConfig
    _no_split_modules = ["KimiLinearAttnResDecoderLayer"]
    # A layer returns its sources, not one hidden state: hidden states are not recorded.
    _can_record_outputs = {"attentions": KimiLinearAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, KimiLinearAttnResDepthQuery):
            module.query.zero_()
            module.key_norm_weight.fill_(1.0)


class KimiLinearAttnResModel(KimiLinearAttnResPreTrainedModel):
    def __init__(self, config: KimiLinearAttnResConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [KimiLinearAttnResDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_res = KimiLinearAttnResDepthQuery(config)
        self.norm = KimiLinearRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = _kimi.DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + seen
        if isinstance(attention_mask, dict):
            masks = attention_mask
        else:
            mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               past_key_values=past_key_values, position_ids=position_ids)
            masks = {"full_attention": create_causal_mask(**mask_kwargs),
                     "linear_attention": create_recurrent_attention_mask(**mask_kwargs)}
        sources = (inputs_embeds,)
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            sources = layer(*sources, attention_mask=masks[self.config.layer_types[i]], position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_states = self.norm(self.final_res(list(sources)))
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class KimiLinearAttnResForCausalLM(KimiLinearAttnResPreTrainedModel, KimiLinearForCausalLM):
    """KimiLinearForCausalLM's head, loss and generation over the AttnRes model."""

    def __init__(self, config: KimiLinearAttnResConfig):
        KimiLinearAttnResPreTrainedModel.__init__(self, config)
        self.model = KimiLinearAttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["KimiLinearAttnResPreTrainedModel", "KimiLinearAttnResModel", "KimiLinearAttnResForCausalLM"]

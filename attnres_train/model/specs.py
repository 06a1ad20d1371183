"""Layer specs: the only place that knows the [KDA KDA KDA MLA] pattern and the residual switch.

One megatron ModuleSpec per layer, as megatron's hybrid specs do. `model.residual` picks the layer
class and the bias-dropout-add: standard -> megatron's TransformerLayer with the residual add;
full/block -> AttnResTransformerLayer with a residual-free bda, so the layer never branches on it.
"""

from __future__ import annotations

import copy

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from attnres_train.model.mla import MLACoreAttention, NoPEMLASelfAttention
from attnres_train.model.norm import RMSNorm
from attnres_train.model.sublayer import AttnResTransformerLayer, residual_free_bda


def _mla_spec(backend) -> ModuleSpec:
    return ModuleSpec(
        module=NoPEMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            linear_q_down_proj=backend.column_parallel_linear(),
            linear_q_up_proj=backend.column_parallel_linear(),
            linear_kv_down_proj=backend.column_parallel_linear(),  # replaced: see mla.DuplicatedLinear
            linear_kv_up_proj=backend.column_parallel_linear(),
            core_attention=MLACoreAttention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=RMSNorm,
            kv_layernorm=RMSNorm,
        ),
    )


def _kda_spec(model_cfg) -> ModuleSpec:
    from attnres_train.model.kda.layer import KimiDeltaAttention

    return ModuleSpec(
        module=KimiDeltaAttention,
        params={"chunk_size": model_cfg.kda.chunk_size, "impl": model_cfg.kda.impl},
    )


def layer_spec(model_cfg, layer_index: int) -> ModuleSpec:
    """Spec of the 0-based global layer `layer_index`."""
    backend = LocalSpecProvider()
    is_moe = layer_index >= model_cfg.moe.first_k_dense
    attnres = model_cfg.residual != "standard"
    attention = _mla_spec(backend) if model_cfg.layer_pattern[layer_index] == "M" else _kda_spec(model_cfg)
    mlp = get_mlp_module_spec_for_backend(
        backend=backend, num_experts=model_cfg.moe.num_experts if is_moe else None, moe_grouped_gemm=False
    )
    bda = residual_free_bda if attnres else get_bias_dropout_add
    return ModuleSpec(
        module=AttnResTransformerLayer if attnres else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            self_attn_bda=bda,
            pre_mlp_layernorm=RMSNorm,
            mlp=copy.deepcopy(mlp),
            mlp_bda=bda,
        ),
    )


def block_spec(model_cfg, layer_indices) -> TransformerBlockSubmodules:
    """Block submodules holding the specs of the given (this stage's) global layer indices."""
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(model_cfg, i) for i in layer_indices],
        layer_norm=RMSNorm,
    )

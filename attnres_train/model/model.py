"""KimiLinearModel: embedding -> layers (KDA/MLA + dense/MoE) -> [final AttnRes aggregate] -> norm -> head.

It is megatron's GPTModel (embedding, output layer, loss, pipeline hooks, sharded checkpoints) with
its decoder replaced: megatron's TransformerBlock for the standard residual, AttnResTransformerBlock
for full/block AttnRes. GPTModel hard-codes its decoder class, so we build it with an empty layer
list and swap the decoder in.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from attnres_train.config.validate import validate_model
from attnres_train.model.attnres.state import effective_block_size
from attnres_train.model.block import AttnResTransformerBlock
from attnres_train.model.specs import block_spec


def transformer_config(model_cfg, parallel_cfg=None, *, params_dtype=torch.float32,
                       perform_initialization: bool = True) -> MLATransformerConfig:
    """Translate our ModelConfig (+ parallel sizes) into megatron's MLATransformerConfig."""
    tp = getattr(parallel_cfg, "tp", 1)
    pp = getattr(parallel_cfg, "pp", 1)
    vpp = getattr(parallel_cfg, "vpp", 1)
    ep = getattr(parallel_cfg, "ep", 1)
    layers_per_stage = getattr(parallel_cfg, "layers_per_stage", None)
    validate_model(model_cfg, tp=tp, ep=ep)
    moe, kda, mla = model_cfg.moe, model_cfg.kda, model_cfg.mla
    has_moe = moe.first_k_dense < model_cfg.num_layers
    kda_head_dim = kda.head_dim or model_cfg.hidden_size // kda.num_heads
    moe_kwargs = {}
    if has_moe:
        moe_kwargs = dict(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_shared_expert_intermediate_size=(
                moe.num_shared_experts * moe.ffn_hidden_size if moe.num_shared_experts else None
            ),
            moe_layer_freq=[0] * moe.first_k_dense + [1] * (model_cfg.num_layers - moe.first_k_dense),
            moe_router_score_function=moe.score_function,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=moe.bias_update_rate,
            moe_router_topk_scaling_factor=moe.routed_scaling_factor,
            moe_router_dtype="fp64" if params_dtype == torch.float64 else "fp32",  # never below fp32
            moe_router_load_balancing_type="seq_aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
        )
    return MLATransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=moe.dense_ffn_hidden_size,
        num_attention_heads=mla.num_heads,
        # NoPE MLA with a direct query projection
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_nope_head_dim,
        qk_pos_emb_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        rope_type="rope",
        apply_rope_fusion=False,
        qk_layernorm=True,  # builds MLA's kv_layernorm (Kimi's kv_a_layernorm)
        # KDA sizes in megatron's linear-attention fields (no GVA: value heads = key heads)
        linear_num_key_heads=kda.num_heads,
        linear_num_value_heads=kda.num_heads,
        linear_key_head_dim=kda_head_dim,
        linear_value_head_dim=kda_head_dim,
        linear_conv_kernel_dim=kda.conv_kernel,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=model_cfg.init_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        expert_model_parallel_size=ep,
        # megatron requires sequence parallelism with MoE under TP; it also splits the norms' and
        # AttnRes's per-token work (and the pipeline payloads) by TP
        sequence_parallel=tp > 1,
        pipeline_model_parallel_layout=megatron_pp_layout(layers_per_stage, pp, vpp),
        **recompute_kwargs(parallel_cfg),
        **moe_kwargs,
    )


def megatron_pp_layout(layers_per_stage, pp: int, vpp: int) -> Optional[list]:
    """An explicit layers-per-chunk split as megatron's pipeline_model_parallel_layout (one list of
    layer types per chunk, chunk order v·pp + p; the embedding opens chunk 0, the loss closes the
    last). None: megatron's even split."""
    if not layers_per_stage or pp * vpp == 1:
        return None
    chunks = [["decoder"] * int(n) for n in layers_per_stage]
    chunks[0].insert(0, "embedding")
    chunks[-1].append("loss")
    return chunks


def recompute_kwargs(parallel_cfg) -> dict:
    """parallel.recompute -> megatron's recompute_* fields (full: uniform groups of layers)."""
    mode = getattr(parallel_cfg, "recompute", "none")
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(parallel_cfg.recompute_modules))
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=parallel_cfg.recompute_num_layers)
    return {}


def local_layer_indices(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> range:
    """0-based global indices of the layers this (virtual) pipeline stage builds."""
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    return range(offset, offset + get_num_layers_to_build(config, vp_stage, pp_rank))


class KimiLinearModel(GPTModel):
    """GPTModel with the Kimi-Linear decoder. Forward/loss/pipeline hooks are GPTModel's."""

    def __init__(self, config, model_cfg, *, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, pg_collection=None):
        super().__init__(
            config,
            transformer_layer_spec=TransformerBlockSubmodules(layer_specs=[], layer_norm=None),
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",  # KDA carries position; MLA is NoPE
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        self.model_cfg = model_cfg
        pp_rank = self.pg_collection.pp.rank() if self.pg_collection.pp is not None else None
        spec = block_spec(model_cfg, local_layer_indices(config, vp_stage, pp_rank))
        block_kwargs = dict(pre_process=pre_process, post_process=post_process,
                            pg_collection=self.pg_collection, vp_stage=vp_stage)
        block_size = effective_block_size(model_cfg)
        if block_size is None:
            self.decoder = TransformerBlock(config, spec, **block_kwargs)
        else:
            self.decoder = AttnResTransformerBlock(
                config, spec, block_size=block_size, impl=model_cfg.attnres.impl, **block_kwargs
            )


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device: no memory, no init. megatron allocates a few buffers
    with device=torch.cuda.current_device(); point that at meta for the duration of the build."""
    orig = torch.cuda.current_device
    torch.cuda.current_device = lambda: "meta"
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.cuda.current_device = orig


def build_model(model_cfg, parallel_cfg=None, *, params_dtype=torch.float32, meta: bool = False,
                pre_process: bool = True, post_process: bool = True, vp_stage=None,
                initialize: bool = True) -> KimiLinearModel:
    """Build one model chunk. meta=True: on the meta device, uninitialised (for counting/planning).
    initialize=False: megatron's random initialisation skipped (weights about to be overwritten,
    as by an import; AttnRes's pseudo-queries and gains still start at zeros and ones)."""
    config = transformer_config(model_cfg, parallel_cfg, params_dtype=params_dtype,
                                perform_initialization=initialize and not meta)
    ctx = meta_device() if meta else contextlib.nullcontext()
    with ctx:
        return KimiLinearModel(config, model_cfg, pre_process=pre_process,
                               post_process=post_process, vp_stage=vp_stage)

"""transformers' Kimi Linear config (config.json of a `kimi_linear` model) <-> our ModelConfig.

What maps (HF field -> ours): hidden_size; num_hidden_layers; layer_types or
linear_attn_config.full_attn_layers (1-indexed) -> layer_pattern (M for full attention, K for KDA);
linear_attn_config.{num_heads, head_dim, short_conv_kernel_size} -> kda; num_attention_heads,
kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim -> mla; num_experts,
num_experts_per_token, num_shared_experts, moe_intermediate_size, first_k_dense_replace (or
mlp_layer_types), intermediate_size (the dense FFN), routed_scaling_factor -> moe; rms_norm_eps;
vocab_size. transformers' names are read under either spelling (its attribute_map aliases:
num_local_experts / num_experts, num_experts_per_tok / num_experts_per_token, n_shared_experts /
num_shared_experts, norm_topk_prob / moe_renormalize, n_group / num_expert_group).

Refused, by name, because our model computes something else: a query LoRA (q_lora_rank set),
grouped routing with more than one group, un-normalised top-k weights (or top-1, where megatron
does not renormalise), an activation other than SiLU, attention biases, tied embeddings, KV heads
fewer than the heads, a rotary MLA, and MoE layers that are not "the first k dense, the rest sparse".
"""

from __future__ import annotations

from typing import Any, Optional

from attnres_train.choices import Residual
from attnres_train.config.schema import ModelConfig
from attnres_train.convert import hf_attnres
from attnres_train.model.structure import layer_kinds

MODEL_TYPE = "kimi_linear"


class UnsupportedConfig(ValueError):
    """A Kimi Linear config field whose value our model cannot reproduce: `field` names it."""

    def __init__(self, field: str, value: Any, why: str):
        self.field, self.value = field, value
        super().__init__(f"config.json field {field}={value!r}: {why}")


def _get(hf: dict, *names: str, default: Any = None) -> Any:
    """The first of `names` present in `hf` (a field and its transformers aliases)."""
    for name in names:
        if name in hf:
            return hf[name]
    return default


def _layer_types(hf: dict, num_layers: int) -> list:
    """"full_attention" / "linear_attention" per layer, as transformers derives them."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    linear = hf.get("linear_attn_config") or {}
    if "full_attn_layers" in linear:
        full = set(linear["full_attn_layers"])
        bad = [i for i in full if not 1 <= i <= num_layers]
        if bad:
            raise UnsupportedConfig("linear_attn_config.full_attn_layers", sorted(full),
                                    f"layers are 1-indexed in [1, {num_layers}]; {bad} is outside")
        return ["full_attention" if i + 1 in full else "linear_attention" for i in range(num_layers)]
    return ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(num_layers)]


def _first_k_dense(hf: dict, num_layers: int) -> int:
    mlp_types = hf.get("mlp_layer_types")
    if not mlp_types:
        return int(_get(hf, "first_k_dense_replace", default=1))
    k = next((i for i, t in enumerate(mlp_types) if t != "dense"), len(mlp_types))
    if len(mlp_types) != num_layers or any(t != "sparse" for t in mlp_types[k:]):
        raise UnsupportedConfig("mlp_layer_types", mlp_types,
                                "only the first k layers dense and every later one sparse (MoE) is supported")
    return k


def _check_supported(hf: dict) -> None:
    if hf.get("model_type", MODEL_TYPE) not in (MODEL_TYPE, ATTNRES_MODEL_TYPE):
        raise UnsupportedConfig("model_type", hf.get("model_type"), f"expected {MODEL_TYPE!r}")
    refusals = [
        ("q_lora_rank", hf.get("q_lora_rank") is not None, "a low-rank query projection is not supported "
         "(Kimi Linear projects queries directly: null)"),
        ("n_group", int(_get(hf, "n_group", "num_expert_group", default=1) or 1) != 1,
         "grouped top-k routing with more than one group is not supported (use 1)"),
        ("topk_group", int(_get(hf, "topk_group", default=1) or 1) != 1, "grouped routing is not supported (use 1)"),
        ("norm_topk_prob", not _get(hf, "norm_topk_prob", "moe_renormalize", default=True),
         "un-normalised top-k weights are not supported: megatron renormalises them"),
        ("hidden_act", _get(hf, "hidden_act", default="silu") != "silu", "only silu (SwiGLU) is supported"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "attention biases are not supported"),
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)),
         "tied embeddings are not supported: the LM head is its own matrix"),
        ("mla_use_output_gate", bool(hf.get("mla_use_output_gate", False)), "the MLA output gate is not supported"),
        ("moe_router_activation_func", _get(hf, "moe_router_activation_func", default="sigmoid") != "sigmoid",
         "only the sigmoid router is supported"),
    ]
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    refusals.append(("num_key_value_heads", kv_heads is not None and kv_heads != heads,
                     f"MLA expands keys to every head: it must equal num_attention_heads={heads}"))
    refusals.append(("qk_rope_head_dim", int(_get(hf, "qk_rope_head_dim", default=64)) == 0,
                     "0 is not supported: the shared key slice (never rotated) needs at least one channel"))
    if _get(hf, "num_experts_per_tok", "num_experts_per_token", default=8) == 1:
        refusals.append(("num_experts_per_tok", True, "top-1 routing is not supported: megatron does not "
                         "renormalise a single expert's weight, transformers does"))
    for field, refused, why in refusals:
        if refused:
            raise UnsupportedConfig(field, hf.get(field), why)


def from_hf(hf: dict, *, name: str = "hf", seq_length: int = 4096) -> ModelConfig:
    """Our ModelConfig (residual=standard; block/full for our AttnRes export) of a Kimi Linear
    config.json dict. Raises UnsupportedConfig naming the first field we cannot reproduce."""
    _check_supported(hf)
    num_layers = int(hf["num_hidden_layers"])
    types = _layer_types(hf, num_layers)
    pattern = "".join("M" if t == "full_attention" else "K" for t in types)
    linear = hf.get("linear_attn_config") or {}
    cfg = ModelConfig(
        name=name, num_layers=num_layers, layer_pattern=pattern, hidden_size=int(hf["hidden_size"]),
        vocab_size=int(hf["vocab_size"]), seq_length=seq_length,
        norm_eps=float(_get(hf, "rms_norm_eps", default=1e-5)),
        init_std=float(_get(hf, "initializer_range", default=0.02)),
    )
    cfg.residual = Residual(hf.get("attn_res_mode", "standard")) if hf.get("model_type") == ATTNRES_MODEL_TYPE \
        else Residual.standard
    if cfg.residual != Residual.standard:
        cfg.attnres.block_size = int(hf["attn_res_block_size_sublayers"])
    cfg.kda.num_heads = int(_get(linear, "num_heads", default=_get(hf, "linear_num_heads", default=32)))
    cfg.kda.head_dim = int(_get(linear, "head_dim", default=_get(hf, "linear_head_dim", default=128)))
    cfg.kda.conv_kernel = int(_get(linear, "short_conv_kernel_size",
                                   default=_get(hf, "linear_conv_kernel_dim", default=4)))
    cfg.mla.num_heads = int(hf["num_attention_heads"])
    cfg.mla.q_lora_rank = None
    cfg.mla.kv_lora_rank = int(hf["kv_lora_rank"])
    cfg.mla.qk_nope_head_dim = int(hf["qk_nope_head_dim"])
    cfg.mla.qk_rope_head_dim = int(hf["qk_rope_head_dim"])
    cfg.mla.v_head_dim = int(hf["v_head_dim"])
    cfg.moe.num_experts = int(_get(hf, "num_experts", "num_local_experts"))
    cfg.moe.top_k = int(_get(hf, "num_experts_per_token", "num_experts_per_tok"))
    cfg.moe.num_shared_experts = int(_get(hf, "num_shared_experts", "n_shared_experts", default=1))
    cfg.moe.ffn_hidden_size = int(hf["moe_intermediate_size"])
    cfg.moe.first_k_dense = _first_k_dense(hf, num_layers)
    cfg.moe.dense_ffn_hidden_size = int(hf["intermediate_size"])
    cfg.moe.routed_scaling_factor = float(_get(hf, "routed_scaling_factor", default=1.0))
    return cfg


def to_hf(cfg: ModelConfig, *, bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
          pad_token_id: Optional[int] = None, torch_dtype: str = "float32") -> dict:
    """The config.json dict of our model as transformers' Kimi Linear (model_type kimi_linear for
    residual=standard; the AttnRes model type otherwise, see hf_attnres)."""
    kinds = layer_kinds(cfg)
    full = [k.index + 1 for k in kinds if k.is_mla]
    hf = {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe.dense_ffn_hidden_size,
        "moe_intermediate_size": cfg.moe.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.mla.num_heads,
        "num_key_value_heads": cfg.mla.num_heads,
        "kv_lora_rank": cfg.mla.kv_lora_rank,
        "q_lora_rank": None,
        "qk_nope_head_dim": cfg.mla.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.mla.qk_rope_head_dim,
        "v_head_dim": cfg.mla.v_head_dim,
        "mla_use_nope": True,
        "num_experts": cfg.moe.num_experts,
        "num_experts_per_token": cfg.moe.top_k,
        "num_shared_experts": cfg.moe.num_shared_experts,
        "first_k_dense_replace": cfg.moe.first_k_dense,
        "routed_scaling_factor": cfg.moe.routed_scaling_factor,
        "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid",
        "num_expert_group": 1,
        "topk_group": 1,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "linear_attn_config": {
            "full_attn_layers": full,
            "kda_layers": [k.index + 1 for k in kinds if not k.is_mla],
            "num_heads": cfg.kda.num_heads,
            "head_dim": cfg.kda.head_dim if cfg.kda.head_dim is not None else cfg.hidden_size // cfg.kda.num_heads,
            "short_conv_kernel_size": cfg.kda.conv_kernel,
        },
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if cfg.residual != Residual.standard:
        hf.update(attnres_fields(cfg))
    return hf


# -- the AttnRes model type (transformers has none: ours, loaded with trust_remote_code) ------------
ATTNRES_MODEL_TYPE = hf_attnres.MODEL_TYPE


def attnres_fields(cfg: ModelConfig) -> dict:
    """What the AttnRes config adds to Kimi Linear's: the mode and the block size in sublayers."""
    block = 1 if cfg.residual == Residual.full else cfg.attnres.block_size
    return {"model_type": ATTNRES_MODEL_TYPE, "architectures": [hf_attnres.ARCHITECTURE],
            "auto_map": dict(hf_attnres.AUTO_MAP),
            "attn_res_mode": Residual(cfg.residual).value,
            "attn_res_block_size_sublayers": block}

"""What layer i is and what a parameter is: the one place that reads the layer pattern.

Layer kinds. `model.layer_pattern` holds one letter per layer, K (Kimi Delta Attention) or M
(MLA); the first `model.moe.first_k_dense` layers have a dense FFN, the others a MoE (routed
experts + shared experts + router). Specs, backend selection, counting, planning, profiling and
the MFU estimate all ask `layer_kind` rather than reading the pattern themselves.

Parameter roles. Parameter (and counted buffer) names are megatron's, of a GPTModel chunk:

    embedding.word_embeddings.weight
    decoder.layers.<i>.{input_layernorm, self_attention, pre_mlp_layernorm, mlp, attn_res, mlp_res}...
        mlp.experts.local_experts.<e>...   routed experts     mlp.shared_experts...  shared expert
        mlp.router.weight, mlp.router.expert_bias (a buffer, counted: it is checkpointed state)
    decoder.final_layernorm.weight, decoder.final_res... (the final AttnRes aggregate), output_layer.weight

`<i>` is the chunk-local layer index; `first_layer` (the chunk's first global layer) maps it to
the global index the pattern is indexed by. For the whole, unsplit model it is 0.

Active parameters: a token touches every parameter except the routed experts it is not sent to;
all routed experts have one size, so the routed experts count top_k / num_experts of their size.

No megatron import here: pure functions of the ModelConfig and of parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Attention = Literal["kda", "mla"]
FFN = Literal["dense", "moe"]

PATTERN_LETTER = {"kda": "K", "mla": "M"}  # model.layer_pattern's letters
_ATTENTION_OF_LETTER = {letter: attention for attention, letter in PATTERN_LETTER.items()}

ROUTED_EXPERTS = "moe routed experts"  # the table row of the routed experts (the active-share rule)


# -- layers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerKind:
    """Global 0-based layer `index`: its attention sublayer ("kda" | "mla") and FFN ("dense" | "moe")."""

    index: int
    attention: Attention
    ffn: FFN

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def is_moe(self) -> bool:
        return self.ffn == "moe"

    @property
    def letter(self) -> str:
        """The layer's letter in model.layer_pattern (K / M)."""
        return PATTERN_LETTER[self.attention]


def layer_kind(model_cfg, index: int) -> LayerKind:
    """The kind of the 0-based global layer `index` (validate_config has checked the pattern)."""
    if not 0 <= index < model_cfg.num_layers:
        raise IndexError(f"layer {index} of a {model_cfg.num_layers}-layer model")
    return LayerKind(index, _ATTENTION_OF_LETTER[model_cfg.layer_pattern[index]],
                     "dense" if index < model_cfg.moe.first_k_dense else "moe")


def layer_index(layer) -> int:
    """The 0-based global index of a built layer module (megatron's `layer_number` is 1-based)."""
    return layer.layer_number - 1


def sublayer_index(index: int, ffn: bool) -> int:
    """Global sublayer index of layer `index`'s attention (ffn=False) or FFN: every layer has two."""
    return 2 * index + int(ffn)


def layer_kinds(model_cfg) -> list:
    """[LayerKind] of every layer, in order."""
    return [layer_kind(model_cfg, i) for i in range(model_cfg.num_layers)]


def has_kda(model_cfg) -> bool:
    return any(k.attention == "kda" for k in layer_kinds(model_cfg))


def num_mla_layers(model_cfg) -> int:
    return sum(k.is_mla for k in layer_kinds(model_cfg))


# -- parameters ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRole:
    """What a parameter is.

    category: its row in the parameter table (counting.format_table, plan.json's params_by_module).
    piece: "embedding", "layer" (then `layer` is the global index) or "head" (the LM head, the
        final norm and the final AttnRes aggregate: what the last pipeline chunk adds)."""

    category: str
    piece: Literal["embedding", "layer", "head"]
    layer: Optional[int] = None

    @property
    def routed_expert(self) -> bool:
        return self.category == ROUTED_EXPERTS


def _category(name: str, layer: Optional[LayerKind]) -> str:
    # order matters: an MLA layer's kv_layernorm is attention, not "norms"
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "lm_head"
    if ".attn_res." in name or ".mlp_res." in name or "final_res." in name:
        return "attnres (query + key norm)"
    if name.startswith("decoder.final_layernorm") or ".input_layernorm." in name \
            or ".pre_mlp_layernorm." in name:
        return "norms"
    if ".self_attention." in name and layer is not None:
        return f"{layer.attention.upper()} attention"
    if ".mlp.experts." in name:
        return ROUTED_EXPERTS
    if ".mlp.shared_experts." in name:
        return "moe shared expert"
    if ".mlp.router." in name:
        return "moe router (+ expert bias)"
    if ".mlp." in name:
        return "dense ffn"
    return "other"


def param_role(name: str, model_cfg, first_layer: int = 0) -> ParamRole:
    """The role of parameter/buffer `name` of a model chunk whose first layer is global layer
    `first_layer` (0 for the whole model)."""
    if name.startswith("embedding."):
        return ParamRole(_category(name, None), "embedding")
    if name.startswith("decoder.layers."):
        index = first_layer + int(name.split(".")[2])
        return ParamRole(_category(name, layer_kind(model_cfg, index)), "layer", index)
    return ParamRole(_category(name, None), "head")  # output_layer, decoder.final_*: post_process


def counted_tensors(model) -> list:
    """(name, tensor) of what the parameter counts include: every parameter, plus the MoE routers'
    `expert_bias` buffers (persistent, checkpointed state; megatron registers it as a buffer)."""
    return (list(model.named_parameters())
            + [(n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")])


def active_count(numel: int, role: ParamRole, model_cfg) -> int:
    """How many of `numel` parameters of this role a token touches: top_k / num_experts of routed
    experts (all experts have one size), all of anything else."""
    if role.routed_expert:
        return numel * model_cfg.moe.top_k // model_cfg.moe.num_experts
    return numel

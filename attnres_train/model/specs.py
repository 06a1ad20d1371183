"""Layer specs: each layer kind (model/structure.py) and the residual switch turned into megatron ModuleSpecs.

One megatron ModuleSpec per layer, as megatron's hybrid specs do. `model.residual` picks the layer
class and the bias-dropout-add: standard -> megatron's TransformerLayer with the residual add;
full/block -> AttnResTransformerLayer with a residual-free bda, so the layer never branches on it.

Two builds of the same modules (attnres_train.model.backend decides which):
- local (CPU, or CUDA without transformer-engine): megatron's Column/RowParallelLinear, our torch
  RMSNorm, MLACoreAttention; MLA's key/value down projection becomes mla.DuplicatedLinear.
- te: megatron's TESpecProvider: TEColumnParallelLinear / TERowParallelLinear, TENorm (TE's
  RMSNorm), TEDotProductAttention, and for MLA's down projections TELinear in "duplicated" mode,
  as megatron's own MLA TE spec (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec).
  Unlike that spec, norms stay separate modules (no TELayerNormColumnParallelLinear): AttnRes
  layers call input_layernorm / pre_mlp_layernorm themselves, and the parameter names stay those
  of the local build. Experts: SequentialMLP with TE linears (no grouped GEMM, as the config's
  moe_grouped_gemm=False). The KDA layer builds its own (local) linears in both builds.

Checkpoints: every parameter has the same name and shape in both builds (TE linears and TE norms
call theirs `weight`; no biases). The one difference is `_extra_state` (FP8 metadata; an empty
tensor without FP8): megatron's local linears already carry one (None, "for TE compatibility"),
but the TE-only modules add theirs where the local build has none: the norms (input_layernorm,
pre_mlp_layernorm, MLA's kv_layernorm, the final layernorm), MLA's core_attention and
linear_kv_down_proj (TELinear; DuplicatedLinear has none). So a local (CPU) state dict loads into
a TE model with strict=False, the missing keys being exactly those `_extra_state`s, and a TE one
into a local model with strict=False (unexpected: the same keys). A dist-checkpoint saved by the
local build lacks those ShardedObjects, so resuming it in a TE build needs them dropped from the
load request (or a non-strict load); the reverse direction leaves them unread. Initial values
differ between the builds (TE initialises each rank's shard itself), so compare builds by copying
weights, not by seeding.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from attnres_train.choices import LinearBackend, Residual
from attnres_train.model.backend import linear_for_build
from attnres_train.model.mla import MLACoreAttention, NoPEMLASelfAttention
from attnres_train.model.norm import KV_LATENT_NORM_EPS, RMSNorm, with_fixed_eps
from attnres_train.model.structure import layer_kind
from attnres_train.model.sublayer import AttnResTransformerLayer, residual_free_bda


class _LocalProvider(LocalSpecProvider):
    """megatron's local provider with our SP-capable torch RMSNorm as the norm."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm


def _te_provider():
    """megatron's TESpecProvider with the norms kept apart from the linears, and the MoE experts
    as a SequentialMLP of TE linears (what TESpecProvider gives without grouped GEMM, minus its
    TE-version probe, so the spec can also be built, though not instantiated, without TE)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class _TEProvider(TESpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return False

        def column_parallel_layer_norm_linear(self):
            return None

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
            return super().layer_norm(rms_norm=True, for_qk=False)  # TENorm; RMSNorm by config

        def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
            if moe_use_grouped_gemm:
                raise ValueError("grouped-GEMM experts are not wired up: moe_grouped_gemm must be False")
            return SequentialMLP, MLPSubmodules(linear_fc1=self.column_parallel_linear(),
                                                linear_fc2=self.row_parallel_linear())

    return _TEProvider()


def _provider(linear: str):
    """The spec provider of a resolved linear backend ("te" or "local", never "auto")."""
    if linear == LinearBackend.te:
        return _te_provider()
    if linear == LinearBackend.local:
        return _LocalProvider()
    raise ValueError(f"linear backend {linear!r}: use te or local")


def _mla_spec(backend, linear: str) -> ModuleSpec:
    if linear == "te":
        # as megatron's MLA TE spec: the down projections replicated (TELinear, "duplicated");
        # the core attention is TE's (fused/flash kernels in bf16, its unfused path in fp32)
        down, core = backend.linear(), backend.core_attention()
    else:
        # column-parallel, the only kind megatron's MLA takes without TE; NoPEMLASelfAttention
        # swaps the kv one for mla.DuplicatedLinear after construction
        down, core = backend.column_parallel_linear(), MLACoreAttention
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=NoPEMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            linear_q_down_proj=down,
            linear_q_up_proj=backend.column_parallel_linear(),
            linear_kv_down_proj=down,
            linear_kv_up_proj=backend.column_parallel_linear(),
            core_attention=core,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=norm,
            kv_layernorm=with_fixed_eps(norm, KV_LATENT_NORM_EPS),
        ),
    )


def _kda_spec(model_cfg) -> ModuleSpec:
    from attnres_train.model.kda.layer import KimiDeltaAttention

    return ModuleSpec(
        module=KimiDeltaAttention,
        params={"chunk_size": model_cfg.kda.chunk_size, "impl": model_cfg.kda.impl},
    )


def layer_spec(model_cfg, layer_index: int, linear: str = "local") -> ModuleSpec:
    """Spec of the 0-based global layer `layer_index`, with "local" or "te" linears and norms."""
    backend = _provider(linear)
    norm = backend.layer_norm(rms_norm=True)
    is_moe = layer_kind(model_cfg, layer_index).is_moe
    attnres = model_cfg.residual != Residual.standard
    attention = (_mla_spec(backend, linear) if layer_kind(model_cfg, layer_index).is_mla
                 else _kda_spec(model_cfg))
    mlp = get_mlp_module_spec_for_backend(
        backend=backend, num_experts=model_cfg.moe.num_experts if is_moe else None, moe_grouped_gemm=False
    )
    bda = residual_free_bda if attnres else get_bias_dropout_add
    return ModuleSpec(
        module=AttnResTransformerLayer if attnres else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=bda,
            pre_mlp_layernorm=norm,
            mlp=mlp,  # built afresh for every layer, shared with none
            mlp_bda=bda,
        ),
    )


def block_spec(model_cfg, layer_indices, linear: str | None = None) -> TransformerBlockSubmodules:
    """Block submodules holding the specs of the given (this stage's) global layer indices.

    linear: "local" or "te"; None resolves model.linear through attnres_train.model.backend
    (ATTNRES_LINEAR, CUDA, TE; always "local" while building on the meta device)."""
    linear = linear or linear_for_build(model_cfg.linear)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(model_cfg, i, linear) for i in layer_indices],
        layer_norm=_provider(linear).layer_norm(rms_norm=True),
    )

"""NoPE Multi-head Latent Attention on megatron-core's MLASelfAttention.

Kimi Linear's MLA layers use no positional encoding (position comes from the KDA layers' decay
and short convolutions), a direct query projection (q_lora_rank=None) and kv_lora compression.
megatron-core 0.16.1 always rotates the `qk_pos_emb_head_dim` slice; we give it an all-zero
frequency table instead, so the "rotation" is cos=1, sin=0: exactly the identity. (megatron's MLA
path also interleaves that slice's channels, identically for q and k, which leaves q·k unchanged.)
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class NoPositionEmbedding(RotaryEmbedding):
    """Stands in for MLA's RotaryEmbedding: same sequence-length logic, zero frequencies."""

    def __init__(self, dim: int, cp_group=None):
        super().__init__(dim, rotary_percent=1.0, use_cpu_initialization=True, cp_group=cp_group)
        self.dim = dim
        # Follows the module across .to()/.cuda() so the zeros land on the right device.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        """[max_seq_len, 1, 1, dim] zeros: cos(0)=1, sin(0)=0, i.e. no rotation."""
        return torch.zeros(max_seq_len, 1, 1, self.dim, device=self._anchor.device)


class NoPEMLASelfAttention(MLASelfAttention):
    """MLASelfAttention whose rope slice is never rotated (Kimi's `mla_use_nope`)."""

    def __init__(self, config, submodules, layer_number, attn_mask_type, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection, **kwargs)
        if config.rope_type != "rope" or config.apply_rope_fusion:
            raise ValueError("NoPE MLA needs rope_type='rope' and apply_rope_fusion=False")
        self.rotary_pos_emb = NoPositionEmbedding(config.qk_pos_emb_head_dim, self.pg_collection.cp)
        # built column-parallel (the only kind megatron's MLA takes without TE), used replicated;
        # the TE spec builds it replicated already (TELinear, "duplicated")
        if isinstance(self.linear_kv_down_proj, ColumnParallelLinear):
            self.linear_kv_down_proj = DuplicatedLinear.from_column_parallel(
                config, self.linear_kv_down_proj, self.pg_collection.tp)


class MLACoreAttention(DotProductAttention):
    """megatron's local DotProductAttention, accepting the k/v head sizes MLA passes.

    The local class rejects `k_channels`/`v_channels`; its forward already handles a value head
    size different from the query/key one once the output width is set from `v_channels`.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition



class DuplicatedLinear(MegatronModule):
    """A linear layer replicated on every tensor-parallel rank (megatron's "duplicated" mode),
    for MLA's key/value down projection. weight: [out, in]; x [..., in] -> ([..., out], None).

    Why. megatron's MLA accepts only TE's duplicated linear or a column-parallel one here, and
    without TE (our local spec) only the column-parallel one, whose gathered output's backward
    keeps this rank's slice of the rope-key gradient. Every TP rank computes that gradient only
    partially (for its own heads), so under TP>1 the down projection gets wrong gradients.
    Replicated, the rope key goes through megatron's sequence-parallel gather instead, whose
    backward sums the partials. Under sequence parallelism each rank sees a slice of the tokens:
    the weight is flagged for finalize_model_grads' TP sum.
    """

    def __init__(self, config, weight: torch.Tensor):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(weight)
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    @classmethod
    def from_column_parallel(cls, config, layer, tp_group) -> "DuplicatedLinear":
        """The full weight of a column-parallel layer (shards gathered over TP), replicated."""
        w = layer.weight.detach()
        if tp_group is not None and tp_group.size() > 1 and w.device.type != "meta":
            shards = [torch.empty_like(w) for _ in range(tp_group.size())]
            torch.distributed.all_gather(shards, w.contiguous(), group=tp_group)
            w = torch.cat(shards, dim=0)
        elif tp_group is not None and tp_group.size() > 1:
            w = w.new_empty(w.shape[0] * tp_group.size(), w.shape[1])
        return cls(config, w.clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None

"""Kimi Delta Attention as a megatron-core attention module.

Design notes: docs/kda.md (the layer, the recurrence, the numerics, the fla conventions).

Used as ``self_attention`` of megatron's ``TransformerLayer``: built with
``build_module(spec, config=..., layer_number=..., pg_collection=..., **extra)`` and called as
``forward(hidden_states [s, b, d], attention_mask, ...) -> (out [s, b, d], None)``.

Parameter names follow the released HF checkpoint (P = H*K, d_v = K; TP shards P and H):

    q_proj, k_proj, v_proj      ColumnParallelLinear d -> P             weight [P/tp, d]
    q_conv1d, k_conv1d, v_conv1d depthwise causal conv, SiLU after       weight [P/tp, 1, w]
    f_a_proj, g_a_proj          ColumnParallelLinear d -> K, gathered   weight [K/tp, d]
    f_b_proj, g_b_proj          ColumnParallelLinear K -> P             weight [P/tp, K]
    dt_bias                     fp32                                    [P/tp]
    A_log                       fp32                                    [H/tp]
    b_proj                      ColumnParallelLinear d -> H             weight [H/tp, d]
    o_norm                      gated RMSNorm over K, shared by heads   weight [K] (replicated)
    o_proj                      RowParallelLinear P -> d                weight [d, P/tp]

Flow (per token x)::

    q = l2norm(silu(conv(q_proj x)))        k likewise;  v = silu(conv(v_proj x))
    g = -exp(A_log) * softplus(f_b(f_a x) + dt_bias)          (fp32, log-space decay <= 0)
    beta = sigmoid(b_proj x)
    o = KDA(q, k, v, g, beta, scale=K^-0.5)                   (state in fp32)
    out = o_proj(RMSNorm_K(o) * o_norm.weight * sigmoid(g_b(g_a x)))

Everything between the projections is computed in fp32 (fp64 stays fp64) and cast back to the
input dtype before ``o_proj``.  The attention mask is ignored (causal by construction), as in
megatron's GatedDeltaNet; packed sequences and inference caches are not supported yet.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from attnres_train.choices import KDAImpl
from attnres_train.model.kda import kda

L2NORM_EPS = 1e-6  # inside fla's l2norm, which the HF model uses (use_qk_l2norm_in_kernel)
A_INIT_RANGE = (1.0, 16.0)  # A = exp(A_log) ~ U(1, 16)
DT_INIT_RANGE = (1e-3, 0.1)  # dt ~ logU[1e-3, 0.1]; dt_bias = softplus^-1(dt)
DT_INIT_FLOOR = 1e-4
CONV_NAMES = ("q_conv1d", "k_conv1d", "v_conv1d")


def kda_param_count(d: int, H: int, K: int, conv: int) -> int:
    """Parameters of one KDA layer (d_v = K, no biases).

    ``kda_param_count(2304, 32, 128, 4) == 39_514_272`` (Kimi-Linear-48B-A3B).
    """
    P = H * K
    return (
        3 * d * P  # q/k/v projections
        + 3 * P * conv  # depthwise convs
        + 2 * (d * K + K * P)  # f_a/f_b and g_a/g_b low-rank pairs
        + P  # dt_bias
        + H  # A_log
        + d * H  # b_proj
        + K  # o_norm
        + P * d  # o_proj
    )


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise causal 1-D convolution along the sequence, no bias.

    ``weight`` is ``[channels, 1, kernel]`` (nn.Conv1d / HF layout); output at position t sees
    inputs t-kernel+1 .. t (zero before the start).  Works on ``[s, b, channels]``.
    """

    def __init__(self, channels: int, kernel: int, dtype: torch.dtype):
        super().__init__()
        self.channels, self.kernel = channels, kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, b, channels] -> [s, b, channels]`` in x's dtype."""
        w = self.weight.to(x.dtype)
        s = x.shape[0]
        # Shift-and-add along the (outermost, contiguous-slab) sequence dim: for kernel 4 this
        # is 4 fused multiply-adds over the tensor, faster on CPU than a depthwise conv1d,
        # and it needs no [s,b,c] -> [b,c,s] transposes.
        xp = torch.cat([x.new_zeros(self.kernel - 1, *x.shape[1:]), x], dim=0)
        out = xp[self.kernel - 1 :] * w[:, 0, self.kernel - 1]
        for j in range(self.kernel - 1):
            out = torch.addcmul(out, xp[j : j + s], w[:, 0, j])
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel={self.kernel}, causal"


class GatedRMSNorm(nn.Module):
    """``RMSNorm(o) * weight * sigmoid(gate)`` over the last dim (head_dim), weight shared by heads.

    The weight is replicated over tensor-parallel ranks while each rank only sees its own
    heads, so its gradient must be summed over TP: the forward passes it through
    ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), because
    megatron's finalize_model_grads only sums TP grads of sequence-parallel / qk-layernorm
    params (docs/kda.md).
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, tp_group=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self._tp_group = tp_group

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``o, gate [..., dim] -> [..., dim]`` in o's dtype (computed in o's dtype)."""
        w = self.weight
        if self._tp_group is not None and self._tp_group.size() > 1:
            w = copy_to_tensor_model_parallel_region(w, group=self._tp_group)
        y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * w.to(o.dtype) * torch.sigmoid(gate.to(o.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, gate=sigmoid"


class KimiDeltaAttention(MegatronModule):
    """Kimi Delta Attention layer (see module docstring).

    Args:
        config: megatron TransformerConfig; sizes from ``linear_num_key_heads`` (H),
            ``linear_key_head_dim`` (K = d_v), ``linear_conv_kernel_dim``, eps from
            ``layernorm_epsilon``.  Value heads/dims must equal key heads/dims (no GVA in Kimi).
        submodules: ignored (accepted for ``build_module``).
        layer_number: 1-based layer index (stored only).
        pg_collection: megatron ProcessGroupCollection; its ``tp`` group is used, else
            megatron's global tensor-parallel group.
        chunk_size: chunk length of the chunked KDA algorithm (fla allows 32/64).
        impl: KDA implementation, "auto" | "chunk" | "recurrent" | "fla" (see ``kda``).
        **kwargs: ignored (e.g. ``attn_mask_type``, ``cp_comm_type`` from TransformerLayer).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules=None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        chunk_size: int = 64,
        impl: str = "auto",
        **kwargs,
    ):
        super().__init__(config=config)
        H, K = config.linear_num_key_heads, config.linear_key_head_dim
        if H is None or K is None or config.linear_conv_kernel_dim is None:
            raise ValueError(
                "KimiDeltaAttention needs config.linear_num_key_heads, linear_key_head_dim "
                "and linear_conv_kernel_dim"
            )
        if config.linear_value_head_dim not in (None, K):
            raise ValueError(
                f"KDA needs linear_value_head_dim == linear_key_head_dim (d_v = d_k), got "
                f"{config.linear_value_head_dim} != {K}"
            )
        if config.linear_num_value_heads not in (None, H):
            raise ValueError(
                f"KDA has no grouped-value heads: linear_num_value_heads must equal "
                f"linear_num_key_heads, got {config.linear_num_value_heads} != {H}"
            )
        impl = KDAImpl.parse(impl, "KDA impl")  # availability of "fla" is checked at call time
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

        self.layer_number = layer_number
        self.chunk_size, self.impl = chunk_size, impl
        self.recompute_core = config.recompute_granularity == "selective" and "core_attn" in (
            config.recompute_modules or ())
        if pg_collection is not None:
            self.tp_group = pg_collection.tp
        else:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        # sequence parallel: hidden_states arrive as [s/tp, b, d]; the column-parallel
        # projections gather the sequence, o_proj reduce-scatters it back
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        if H % self.tp_size or K % self.tp_size:
            raise ValueError(
                f"heads ({H}) and head_dim ({K}) must be divisible by TP size {self.tp_size}"
            )

        d = config.hidden_size
        P = H * K
        self.hidden_size, self.num_heads, self.head_dim, self.proj_dim = d, H, K, P
        self.num_heads_local = H // self.tp_size
        self.proj_dim_local = P // self.tp_size
        self.conv_kernel = config.linear_conv_kernel_dim

        def col(i, o, gather=False):
            return tensor_parallel.ColumnParallelLinear(
                i,
                o,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=gather,
                skip_bias_add=True,
                is_expert=False,
                tp_group=self.tp_group,
            )

        self.q_proj, self.k_proj, self.v_proj = col(d, P), col(d, P), col(d, P)
        pdt = config.params_dtype
        self.q_conv1d = CausalDepthwiseConv1d(self.proj_dim_local, self.conv_kernel, pdt)
        self.k_conv1d = CausalDepthwiseConv1d(self.proj_dim_local, self.conv_kernel, pdt)
        self.v_conv1d = CausalDepthwiseConv1d(self.proj_dim_local, self.conv_kernel, pdt)
        # low-rank (rank K) forget-gate and output-gate paths: the rank-K activation is
        # gathered, so the second projection sees all of it on every TP rank
        self.f_a_proj, self.f_b_proj = col(d, K, gather=True), col(K, P)
        self.g_a_proj, self.g_b_proj = col(d, K, gather=True), col(K, P)
        self.b_proj = col(d, H)
        # fp32 whatever params_dtype is (decay parameters stay fp32: docs/kda.md)
        self.dt_bias = nn.Parameter(torch.empty(self.proj_dim_local, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.num_heads_local, dtype=torch.float32))
        self.o_norm = GatedRMSNorm(K, config.layernorm_epsilon, pdt, tp_group=self.tp_group)
        self.o_proj = tensor_parallel.RowParallelLinear(
            P,
            d,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_group=self.tp_group,
        )

        for p in (self.dt_bias, self.A_log, *(getattr(self, n).weight for n in CONV_NAMES)):
            set_tensor_model_parallel_attributes(p, True, 0, 1)
        for p in (self.dt_bias, self.A_log):
            p._no_weight_decay = True

        if config.perform_initialization:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def _rank_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's contiguous dim-0 shard of a full-size tensor."""
        rank = self.tp_group.rank() if self.tp_size > 1 else 0
        n = full.shape[0] // self.tp_size
        return full[rank * n : (rank + 1) * n]

    def reset_parameters(self) -> None:
        """Initialise the raw parameters (the linears initialise themselves in megatron).

        Each tensor is drawn at full (TP=1) size from the default generator and sliced to this
        rank's shard, so the model is identical for every TP size.  Nothing here reads data,
        so it also runs on the meta device.
        """
        P, H, w = self.proj_dim, self.num_heads, self.conv_kernel
        with torch.no_grad():
            # like nn.Conv1d: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
            # fan_in = in_channels/groups * kernel = kernel
            bound = 1.0 / math.sqrt(w)
            for name in CONV_NAMES:
                full = torch.empty(P, 1, w, dtype=torch.float32).uniform_(-bound, bound)
                getattr(self, name).weight.copy_(self._rank_slice(full))
            A = torch.empty(H, dtype=torch.float32).uniform_(*A_INIT_RANGE)
            self.A_log.copy_(self._rank_slice(torch.log(A)))
            lo, hi = (math.log(x) for x in DT_INIT_RANGE)
            dt = torch.exp(torch.empty(P, dtype=torch.float32).uniform_(lo, hi))
            dt = dt.clamp(min=DT_INIT_FLOOR)
            # inverse softplus: softplus(dt_bias) = dt
            self.dt_bias.copy_(self._rank_slice(dt + torch.log(-torch.expm1(-dt))))
            self.o_norm.reset_parameters()

    # --------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states: Optional[torch.Tensor] = None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        **kwargs,
    ):
        """``hidden_states [s, b, d]`` -> ``(out [s, b, d], None)``.

        The mask and rotary arguments are ignored (causal by construction; NoPE).
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("KimiDeltaAttention has no inference (conv/state) cache yet")
        if packed_seq_params is not None:
            raise NotImplementedError("KimiDeltaAttention does not support packed sequences yet")
        if key_value_states is not None:
            raise NotImplementedError("KimiDeltaAttention is self-attention only")

        in_dtype = hidden_states.dtype
        cdt = torch.promote_types(in_dtype, torch.float32)  # compute dtype: fp32 or wider
        x = hidden_states

        def proj(layer, inp=x):
            return layer(inp)[0]

        def low_rank(a_layer, b_layer):  # d -> K (gathered) -> P/tp
            return proj(b_layer, self._rank_k_input(proj(a_layer)))

        def conv_silu(layer, name):
            return F.silu(getattr(self, name)(proj(layer).to(cdt)))

        q = conv_silu(self.q_proj, "q_conv1d")  # [s, b, P/tp]
        k = conv_silu(self.k_proj, "k_conv1d")
        v = conv_silu(self.v_proj, "v_conv1d")
        s, b = q.shape[:2]
        Hl, K = self.num_heads_local, self.head_dim
        q = l2norm(q.view(s, b, Hl, K))
        k = l2norm(k.view(s, b, Hl, K))
        v = v.view(s, b, Hl, K)

        f = low_rank(self.f_a_proj, self.f_b_proj).to(cdt).view(s, b, Hl, K)
        # log-space decay per channel, <= 0: -exp(A_log[h]) * softplus(f + dt_bias)
        g = -torch.exp(self.A_log.to(cdt))[:, None] * F.softplus(
            f + self.dt_bias.to(cdt).view(Hl, K)
        )
        beta = torch.sigmoid(proj(self.b_proj).to(cdt))  # [s, b, H/tp]

        def core(q, k, v, g, beta):
            return kda(q, k, v, g, beta, scale=K ** -0.5, chunk_size=self.chunk_size, impl=self.impl)[0]

        # KDA works on [b, s, H, *]; these are views, the chunked form copies once internally
        args = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.transpose(0, 1), beta.transpose(0, 1))
        if self.recompute_core and self.training:
            # selective recompute ("core_attn"): keep only the kernel's inputs, rerun it in backward
            o = tensor_parallel.checkpoint(core, False, *args)
        else:
            o = core(*args)
        o = o.to(cdt).transpose(0, 1)  # [s, b, H/tp, K]

        gate = low_rank(self.g_a_proj, self.g_b_proj).view(s, b, Hl, K)
        o = self.o_norm(o, gate).reshape(s, b, Hl * K).to(in_dtype)
        out, _ = self.o_proj(o)
        return out, None

    def _rank_k_input(self, a: torch.Tensor) -> torch.Tensor:
        """The gathered rank-K activation ``[s, b, K]`` as input of f_b/g_b.  Under sequence
        parallelism those column-parallel layers all-gather their input along the sequence, so
        hand them this rank's sequence shard (scatter forward, all-gather backward)."""
        if self.sequence_parallel:
            return scatter_to_sequence_parallel_region(a, group=self.tp_group)
        return a

    # ------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, tp_group=None):
        """Distributed-checkpoint dict: the raw TP-sharded params (``A_log``, ``dt_bias``,
        conv weights) are sharded along axis 0; the linears shard themselves; ``o_norm`` is
        replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = tp_group if tp_group is not None else self.tp_group
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {"A_log": 0, "dt_bias": 0},
            sharded_offsets,
            tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            if name in CONV_NAMES:
                sub = make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True),
                    f"{prefix}{name}.",
                    {"weight": 0},
                    sharded_offsets,
                    tp_group=tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
            else:
                sub = sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                )
            sharded.update(sub)
        return sharded

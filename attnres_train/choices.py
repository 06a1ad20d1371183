"""The closed sets of config values: one enum per choice, the only list of its names.

The schema (attnres_train.config.schema) types its fields with these, so omegaconf refuses an
unknown value while composing the config (listing the allowed ones); the code that acts on a
choice (kernels, backend selection, model) imports the same enum. Like attnres_train.errors this
module imports nothing of the project, so every layer can use it without import cycles.

Each is a str-valued Enum whose member names equal their values. That makes a member behave as
its plain string everywhere the config travels: omegaconf validates and serialises members by
name (config.yaml says ``residual: block``, ``${model.residual}`` interpolates to ``block``), and a
member compares and hashes equal to its value (``cfg.model.residual == "block"``, dict lookups),
formats as it (``__str__``/``__format__`` below; Python 3.11's StrEnum does the same, but
requires-python is 3.10) and json-encodes as it (a str subclass).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """Base of the config enums: a member is its value wherever a string is expected."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls: type[C], value: Any, what: str) -> C:
        """``value`` (a member or its string) as a member; ValueError naming ``what`` and the
        valid values otherwise. For callers outside the config (kernels called directly)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(cls.values())}") from None


class Residual(Choice):
    """model.residual: how a sublayer's input is formed from the earlier ones."""

    standard = "standard"  # the usual residual sum (baseline)
    full = "full"  # Full AttnRes: softmax over the embedding and every earlier sublayer output
    block = "block"  # Block AttnRes: over the embedding and block sums (model.attnres.block_size)


class AttnResImpl(Choice):
    """model.attnres.impl: how the depth mix is computed (both exact)."""

    two_phase = "two_phase"  # batched inter-block pass + online-softmax merge, lean custom backward
    naive = "naive"  # one softmax over all sources per sublayer, plain autograd (reference)


class AttnResKernel(Choice):
    """model.attnres.kernel: the kernels the two-phase op runs on (env ATTNRES_KERNEL overrides)."""

    auto = "auto"  # triton for CUDA tensors when installed and its self-check passes, else torch
    torch = "torch"
    triton = "triton"


class LinearBackend(Choice):
    """model.linear: linears, norms and core attention (env ATTNRES_LINEAR overrides)."""

    auto = "auto"  # te with CUDA and an importable transformer-engine, else local
    te = "te"  # transformer-engine, through megatron's TESpecProvider
    local = "local"  # megatron's local layers and our torch RMSNorm


class KDAImpl(Choice):
    """model.kda.impl: the KDA core."""

    auto = "auto"  # fla on CUDA when installed (chunk_size 32 or 64), else chunk
    chunk = "chunk"  # chunked pure torch
    recurrent = "recurrent"  # token-by-token reference recurrence
    fla = "fla"  # flash-linear-attention's chunk_kda


class ScoreFunction(Choice):
    """model.moe.score_function: router scores."""

    sigmoid = "sigmoid"
    softmax = "softmax"


class Recompute(Choice):
    """parallel.recompute: activation recomputation."""

    none = "none"
    selective = "selective"  # the modules in parallel.recompute_modules
    full = "full"  # whole layers, parallel.recompute_num_layers at a time


class RecomputeModule(Choice):
    """parallel.recompute_modules: megatron's names (its moe_act needs grouped-GEMM experts,
    which this model does not use)."""

    core_attn = "core_attn"
    mla_up_proj = "mla_up_proj"
    layernorm = "layernorm"
    mlp = "mlp"
    moe = "moe"
    shared_experts = "shared_experts"


class LRSchedule(Choice):
    """train.lr_schedule: after the linear warmup."""

    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay: train.wsd_decay_fraction of the steps decays
    constant = "constant"


class DType(Choice):
    """train.dtype: parameter and compute dtype."""

    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(Choice):
    """logging.wandb.mode."""

    offline = "offline"
    online = "online"
    disabled = "disabled"

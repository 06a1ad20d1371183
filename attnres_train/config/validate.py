"""Config validation: runs before anything heavy and raises ConfigError naming key, value and fix."""

from __future__ import annotations

from typing import Any

from attnres_train.config.schema import RESIDUAL_MODES

ATTNRES_IMPLS = ("two_phase", "naive")
KDA_IMPLS = ("auto", "chunk", "recurrent", "fla")


class ConfigError(ValueError):
    """A user-facing configuration mistake: `key` is the dotted config path."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


def num_sublayers(model) -> int:
    """Every layer has two sublayers: its attention (KDA or MLA) and its FFN (dense or MoE)."""
    return 2 * model.num_layers


def effective_block_size(model) -> int | None:
    """Sublayers per AttnRes block: None for the standard residual, 1 for Full AttnRes."""
    return {"standard": None, "full": 1}.get(model.residual, model.attnres.block_size)


def validate_model(model, tp: int = 1, ep: int = 1) -> None:
    if model.residual not in RESIDUAL_MODES:
        raise ConfigError("model.residual", model.residual, f"use one of {', '.join(RESIDUAL_MODES)}")
    if model.num_layers < 1:
        raise ConfigError("model.num_layers", model.num_layers, "need at least one layer")
    pattern = model.layer_pattern
    if len(pattern) != model.num_layers or set(pattern) - {"K", "M"}:
        raise ConfigError(
            "model.layer_pattern", pattern,
            f"give one letter per layer (K = KDA, M = MLA): {model.num_layers} letters for "
            f"model.num_layers={model.num_layers}, e.g. {_default_pattern(model.num_layers)!r}",
        )
    sublayers = num_sublayers(model)
    if model.residual == "block":
        s = model.attnres.block_size
        if not 1 <= s <= sublayers:
            raise ConfigError(
                "model.attnres.block_size", s,
                f"block size counts sublayers (attention and FFN each count one): choose 1..{sublayers} "
                f"for {model.num_layers} layers ({sublayers} sublayers); 1 is Full AttnRes",
            )
    if model.attnres.impl not in ATTNRES_IMPLS:
        raise ConfigError("model.attnres.impl", model.attnres.impl, f"use one of {', '.join(ATTNRES_IMPLS)}")
    if model.kda.impl not in KDA_IMPLS:
        raise ConfigError("model.kda.impl", model.kda.impl, f"use one of {', '.join(KDA_IMPLS)}")
    if "K" in pattern:
        if model.kda.head_dim is None and model.hidden_size % model.kda.num_heads:
            raise ConfigError(
                "model.kda.num_heads", model.kda.num_heads,
                f"model.hidden_size={model.hidden_size} is not divisible by it: pick a divisor or set "
                "model.kda.head_dim explicitly",
            )
        if model.kda.num_heads % tp:
            raise ConfigError("model.kda.num_heads", model.kda.num_heads, f"must be divisible by parallel.tp={tp}")
        if model.kda.chunk_size < 1:
            raise ConfigError("model.kda.chunk_size", model.kda.chunk_size, "must be >= 1 (64 is the default)")
    if "M" in pattern and model.mla.num_heads % tp:
        raise ConfigError("model.mla.num_heads", model.mla.num_heads, f"must be divisible by parallel.tp={tp}")
    moe = model.moe
    if not 0 <= moe.first_k_dense <= model.num_layers:
        raise ConfigError("model.moe.first_k_dense", moe.first_k_dense, f"choose 0..{model.num_layers}")
    if moe.first_k_dense < model.num_layers:
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError("model.moe.top_k", moe.top_k, f"choose 1..model.moe.num_experts={moe.num_experts}")
        if moe.num_experts % ep:
            raise ConfigError("model.moe.num_experts", moe.num_experts, f"must be divisible by parallel.ep={ep}")
        if moe.score_function not in ("sigmoid", "softmax"):
            raise ConfigError("model.moe.score_function", moe.score_function, "use sigmoid or softmax")


def validate_vocab(model_vocab: int, tokenizer_vocab: int) -> None:
    if model_vocab < tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size", model_vocab,
            f"the tokenizer has {tokenizer_vocab} tokens: set model.vocab_size>={tokenizer_vocab}",
        )


def validate_config(cfg) -> None:
    for key in ("tp", "pp", "vpp", "ep"):
        if getattr(cfg.parallel, key) < 1:
            raise ConfigError(f"parallel.{key}", getattr(cfg.parallel, key), "must be >= 1")
    validate_model(cfg.model, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    validate_recompute(cfg.parallel, cfg.model.num_layers)
    from parallel.layout import split_layers

    split_layers(cfg.model.num_layers, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.layers_per_stage)


RECOMPUTE_MODES = ("none", "selective", "full")
# (megatron's moe_act needs grouped-GEMM experts, which this model does not use)
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "shared_experts")


def validate_recompute(parallel, num_layers: int) -> None:
    if parallel.recompute not in RECOMPUTE_MODES:
        raise ConfigError("parallel.recompute", parallel.recompute, f"use one of {', '.join(RECOMPUTE_MODES)}")
    if parallel.recompute == "selective":
        bad = [m for m in parallel.recompute_modules if m not in RECOMPUTE_MODULES]
        if bad or not parallel.recompute_modules:
            raise ConfigError("parallel.recompute_modules", list(parallel.recompute_modules),
                              f"choose from {', '.join(RECOMPUTE_MODULES)} (e.g. [core_attn,layernorm])")
    if parallel.recompute == "full" and not 1 <= parallel.recompute_num_layers <= num_layers:
        raise ConfigError("parallel.recompute_num_layers", parallel.recompute_num_layers,
                          f"layers recomputed as one group: choose 1..model.num_layers={num_layers}")


def _default_pattern(num_layers: int) -> str:
    """Kimi's rule: MLA at every 4th layer (1-indexed) and at the last layer."""
    return "".join("M" if (i + 1) % 4 == 0 or i + 1 == num_layers else "K" for i in range(num_layers))

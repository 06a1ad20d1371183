"""Config validation: runs before anything heavy and raises ConfigError naming key, value and fix.

What the schema can say by itself it says there: types, and the allowed values of each choice
(the enums of attnres_train.choices), which omegaconf enforces while composing. This module
checks what relates several values (a block size against the layer count, heads against tp, ...).
"""

from __future__ import annotations

from attnres_train.choices import RecomputeModule
from attnres_train.errors import ConfigError
from attnres_train.model.attnres.state import num_sublayers
from parallel.layout import split_layers


def validate_model(model, tp: int = 1, ep: int = 1) -> None:
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
    split_layers(cfg.model.num_layers, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.layers_per_stage)
    validate_environment_keys(cfg)


def validate_recompute(parallel, num_layers: int) -> None:
    if parallel.recompute == "selective" and not parallel.recompute_modules:
        raise ConfigError("parallel.recompute_modules", [],
                          f"selective recompute needs modules: choose from {', '.join(RecomputeModule.values())} "
                          "(e.g. [core_attn,layernorm])")
    if parallel.recompute == "full" and not 1 <= parallel.recompute_num_layers <= num_layers:
        raise ConfigError("parallel.recompute_num_layers", parallel.recompute_num_layers,
                          f"layers recomputed as one group: choose 1..model.num_layers={num_layers}")


def validate_environment_keys(cfg) -> None:
    """The keys that stand in for what the machine or the launch says (null: ask them)."""
    if cfg.logging.peak_flops is not None and not cfg.logging.peak_flops > 0:
        raise ConfigError("logging.peak_flops", cfg.logging.peak_flops,
                          "the device's peak FLOP/s must be > 0 (e.g. 989e12 for an H100 in bf16), or null")
    world, tp_pp = cfg.train.dry_run_world_size, cfg.parallel.tp * cfg.parallel.pp
    if world is not None and (world < 1 or world % tp_pp):
        raise ConfigError("train.dry_run_world_size", world,
                          f"plan for a positive multiple of parallel.tp*parallel.pp={tp_pp} processes, or null")


def _default_pattern(num_layers: int) -> str:
    """Kimi's rule: MLA at every 4th layer (1-indexed) and at the last layer."""
    return "".join("M" if (i + 1) % 4 == 0 or i + 1 == num_layers else "K" for i in range(num_layers))

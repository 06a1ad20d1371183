"""Config validation: runs before anything heavy and raises ConfigError naming key, value and fix.

What the schema can say by itself it says there: types, and the allowed values of each choice
(the enums of attnres_train.choices), which omegaconf enforces while composing. This module
checks the range of each numeric key (DOMAINS, one row per key) and what relates several values
(a block size against the layer count, heads against tp, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from attnres_train.choices import RecomputeModule
from attnres_train.errors import ConfigError
from attnres_train.model.attnres.state import num_sublayers
from parallel.layout import split_layers


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; a side that is None is unbounded. Written as the message says it."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False

    def __contains__(self, value: Any) -> bool:
        # comparisons written so that NaN falls outside every range
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return bool(above and below)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1): Adam's betas, the validation share


@dataclass(frozen=True)
class Domain:
    """One numeric key's allowed values: `key` is the dotted path under Config."""

    key: str
    range: Range
    note: str = ""  # what a boundary value means (e.g. "0: keep every checkpoint")
    nullable: bool = False  # null is allowed too (it means a default)

    def fix(self) -> str:
        """The ConfigError's fix: 'must be >= 0 (0: keep every checkpoint)[, or null]'."""
        note = f" ({self.note})" if self.note else ""
        return f"must be {self.range}{note}{', or null' if self.nullable else ''}"


# Every numeric key whose domain is its own. Keys bounded by other values are checked below
# instead: model.num_layers, model.attnres.block_size, model.moe.top_k/first_k_dense,
# parallel.recompute_num_layers, train.dry_run_world_size, logging.peak_flops (and train.min_lr <= lr).
DOMAINS = (
    Domain("model.hidden_size", AT_LEAST_1),
    Domain("model.vocab_size", AT_LEAST_1),
    Domain("model.seq_length", AT_LEAST_1),
    Domain("model.norm_eps", POSITIVE),
    Domain("model.init_std", POSITIVE),
    Domain("model.kda.num_heads", AT_LEAST_1),
    Domain("model.kda.head_dim", AT_LEAST_1, "null: model.hidden_size // model.kda.num_heads", nullable=True),
    Domain("model.kda.conv_kernel", AT_LEAST_1),
    Domain("model.kda.chunk_size", AT_LEAST_1, "fla's kernel needs 32 or 64"),
    Domain("model.mla.num_heads", AT_LEAST_1),
    Domain("model.mla.q_lora_rank", AT_LEAST_1, "null: a direct query projection", nullable=True),
    Domain("model.mla.kv_lora_rank", AT_LEAST_1),
    Domain("model.mla.qk_nope_head_dim", AT_LEAST_1),
    Domain("model.mla.qk_rope_head_dim", NON_NEGATIVE, "it is never rotated (NoPE); 0: no such slice"),
    Domain("model.mla.v_head_dim", AT_LEAST_1),
    Domain("model.moe.num_experts", AT_LEAST_1),
    Domain("model.moe.ffn_hidden_size", AT_LEAST_1),
    Domain("model.moe.num_shared_experts", NON_NEGATIVE, "0: none"),
    Domain("model.moe.dense_ffn_hidden_size", AT_LEAST_1),
    Domain("model.moe.routed_scaling_factor", POSITIVE),
    Domain("model.moe.bias_update_rate", NON_NEGATIVE, "0: the expert bias stays put"),
    Domain("model.moe.aux_loss_coeff", NON_NEGATIVE, "0: no auxiliary loss"),
    Domain("parallel.tp", AT_LEAST_1),
    Domain("parallel.pp", AT_LEAST_1),
    Domain("parallel.vpp", AT_LEAST_1),
    Domain("parallel.ep", AT_LEAST_1),
    Domain("data.valid_fraction", FRACTION, "the last fraction of lines/records is validation; 0: none"),
    Domain("data.vocab_size", AT_LEAST_1),
    # numpy's RandomState (megatron's dataset shuffle) takes 32-bit seeds
    Domain("train.seed", Range(0, 2**32 - 1)),
    Domain("train.steps", AT_LEAST_1),
    Domain("train.micro_batch_size", AT_LEAST_1),
    Domain("train.global_batch_size", AT_LEAST_1),
    Domain("train.lr", POSITIVE),
    Domain("train.min_lr", NON_NEGATIVE),
    Domain("train.warmup_steps", NON_NEGATIVE),
    Domain("train.wsd_decay_fraction", Range(0, 1)),
    Domain("train.weight_decay", NON_NEGATIVE),
    Domain("train.adam_beta1", FRACTION),
    Domain("train.adam_beta2", FRACTION),
    Domain("train.adam_eps", POSITIVE),
    Domain("train.clip_grad", NON_NEGATIVE, "0: no clipping"),
    Domain("train.max_bad_steps", AT_LEAST_1),
    Domain("train.eval_interval", NON_NEGATIVE, "0: only at the end"),
    Domain("train.eval_batches", NON_NEGATIVE, "0: the whole validation split"),
    Domain("train.save_interval", NON_NEGATIVE, "0: only at the end"),
    Domain("train.keep_last", NON_NEGATIVE, "0: keep every checkpoint"),
    Domain("train.exit_interval", NON_NEGATIVE, "0: never"),
    Domain("logging.log_interval", AT_LEAST_1),
    Domain("logging.diag_interval", NON_NEGATIVE, "0: off"),
)


def check_domains(cfg, under: str = "") -> None:
    """Refuse the first value outside its DOMAINS row. `cfg` is the Config, or with under="model"
    the ModelConfig (then only the model.* rows apply)."""
    prefix = f"{under}." if under else ""
    for domain in DOMAINS:
        if not domain.key.startswith(prefix):
            continue
        value = functools.reduce(getattr, domain.key.removeprefix(prefix).split("."), cfg)
        if value is None and domain.nullable:
            continue
        if value is None or value not in domain.range:
            raise ConfigError(domain.key, value, domain.fix())


def validate_model(model, tp: int = 1, ep: int = 1) -> None:
    # first the ranges, so that e.g. a zero head count is not a ZeroDivisionError below
    check_domains(model, under="model")
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
    # validate_model repeats the model rows for its direct callers (the model builds): cheap
    check_domains(cfg)
    validate_schedule(cfg.train)
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


def validate_schedule(train) -> None:
    """megatron's LR scheduler asserts max_lr >= min_lr: say it as a ConfigError first."""
    if train.min_lr > train.lr:
        raise ConfigError("train.min_lr", train.min_lr,
                          f"must be <= train.lr={train.lr} (the schedule decays from train.lr down to it)")


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

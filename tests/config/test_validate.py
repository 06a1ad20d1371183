"""Clear errors for bad configs: each names the key (or the environment variable) and the fix.
The choices are enums the schema enforces; the defaults live in the schema alone."""

import dataclasses
import functools
import json
import re
import typing

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from attnres_train.choices import Residual
from attnres_train.config import Config, ModelConfig
from attnres_train.config.compose import CONFIG_DIR, check_overrides, compose_config
from attnres_train.config.validate import DOMAINS, validate_config, validate_model, validate_vocab
from attnres_train.errors import ConfigError
from parallel.groups import check_world_size, gpu_for_local_rank
from tests.helpers import model_cfg, tiny_model_cfg

MODELS = ["tiny", "mini", "small", "kimi_linear_48b_a3b", "paper_194m", "paper_241m", "paper_296m",
          "paper_436m", "paper_528m"]


def test_defaults_are_valid():
    for name in MODELS:
        validate_model(model_cfg(name))


# ------------------------------------------------------------------------- choices (enums)

@pytest.mark.parametrize("override,allowed", [
    ("model.residual=dense", "standard, full, block"),
    ("model.attnres.impl=torch", "two_phase, naive"),
    ("model.attnres.kernel=cuda", "auto, torch, triton"),
    ("model.linear=apex", "auto, te, local"),
    ("model.kda.impl=triton", "auto, chunk, recurrent, fla"),
    ("model.moe.score_function=tanh", "sigmoid, softmax"),
    ("parallel.recompute=partial", "none, selective, full"),
    ("train.lr_schedule=linear", "cosine, wsd, constant"),
    ("train.dtype=fp16", "auto, fp32, bf16"),
    ("logging.wandb.mode=cloud", "offline, online, disabled"),
])
def test_bad_choice_is_refused_by_the_config_layer(override, allowed):
    """The schema refuses a value outside a choice while composing, and check_overrides (what the
    entry point runs first) turns that into one ConfigError naming the key and the allowed values."""
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        check_overrides([override])
    assert str(err.value) == f"{key}={value!r}: use one of {allowed}"
    assert err.value.key == key
    # the same refusal without hydra (the test helpers' path)
    if key.startswith("model."):
        with pytest.raises(ValidationError, match=rf"Invalid value '{value}', expected one of \[{allowed}\]"):
            tiny_model_cfg(**{key.removeprefix("model."): value})


def test_bad_list_choice_and_bad_type_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^parallel.recompute_modules\[0\]='moe_act': use one of core_attn, "
                                          r"mla_up_proj, layernorm, mlp, moe, shared_experts$"):
        check_overrides(["parallel.recompute=selective", "parallel.recompute_modules=[moe_act]"])
    with pytest.raises(ConfigError, match=r"^train.steps='abc': Value 'abc' of type 'str' could not be "
                                          r"converted to Integer$"):
        check_overrides(["train.steps=abc"])


def test_check_overrides_leaves_the_rest_to_hydra():
    """Good overrides pass; hydra flags, unknown keys and missing files are hydra's to report."""
    check_overrides(["model=mini", "model.residual=standard", "hydra.run.dir=/tmp/x"])
    check_overrides(["train.stepz=1"])
    check_overrides(["model=bogus"])
    check_overrides(["--multirun", "model.residual=bogus"])


def test_choice_values_behave_as_plain_strings():
    """An enum value compares, hashes, formats and serialises as its string: the run dir, the
    saved config.yaml, json and every `== "block"` in the code see the plain value."""
    cfg = compose_config(["model.residual=standard"])
    assert cfg.model.residual is Residual.standard
    assert cfg.model.residual == "standard" and {"standard": 1}[cfg.model.residual] == 1
    assert f"{cfg.model.residual}" == str(cfg.model.residual) == "standard"
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert "  residual: standard\n" in text and "  impl: two_phase\n" in text
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["model"]["residual"] == "standard"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=["model=mini"], return_hydra_config=True)
    assert hydra_cfg.hydra.run.dir.startswith("runs/mini-block/")


def test_choice_parse_for_direct_callers():
    assert Residual.parse("full", "residual") is Residual.full
    with pytest.raises(ValueError, match=r"^unknown residual 'dense'; valid: standard, full, block$"):
        Residual.parse("dense", "residual")


# ------------------------------------------------------------------------ defaults, one place

def test_defaults_live_in_the_schema():
    """The group YAMLs and tiny.yaml hold no values: composing the packaged config without
    overrides gives exactly the dataclass defaults, and ModelConfig's defaults are the tiny model."""
    assert compose_config() == Config()
    assert model_cfg("tiny") == ModelConfig()
    assert Config().train.steps == 600
    for group in ("data", "logging", "parallel", "train"):
        assert set(OmegaConf.load(f"{CONFIG_DIR}/{group}/default.yaml")) == {"defaults"}, group
    assert set(OmegaConf.load(f"{CONFIG_DIR}/model/tiny.yaml")) == {"defaults"}


def test_round_trip_through_the_saved_config():
    """config.yaml as the trainer writes it loads back into the schema as the same config."""
    for name in MODELS:
        cfg = compose_config([f"model={name}", "parallel.recompute=selective", "train.lr_schedule=wsd"])
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
        assert back == cfg, name


# -------------------------------------------------------------------- keys replacing the environment

def test_environment_keys_validated():
    cfg = Config()
    validate_config(cfg)
    with pytest.raises(ConfigError, match=r"logging.peak_flops=0.0: .* must be > 0"):
        validate_config(dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, peak_flops=0.0)))
    pp2 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=2))
    validate_config(dataclasses.replace(pp2, train=dataclasses.replace(cfg.train, dry_run_world_size=8)))
    with pytest.raises(ConfigError, match=r"train.dry_run_world_size=3: .*multiple of parallel.tp\*parallel.pp=2"):
        validate_config(dataclasses.replace(pp2, train=dataclasses.replace(cfg.train, dry_run_world_size=3)))


@pytest.mark.parametrize("bs", [0, -1, 9])
def test_block_size_out_of_range(bs):
    # tiny: 4 layers = 8 sublayers
    with pytest.raises(ConfigError, match=r"model.attnres.block_size.*choose 1..8"):
        validate_model(tiny_model_cfg(**{"attnres.block_size": bs}))


def test_block_size_ignored_for_standard():
    validate_model(tiny_model_cfg(residual="standard", **{"attnres.block_size": 0}))


def test_head_dim_must_divide():
    with pytest.raises(ConfigError, match=r"model.kda.num_heads=3.*hidden_size=128 is not divisible"):
        validate_model(tiny_model_cfg(**{"kda.num_heads": 3, "kda.head_dim": None}))


def test_heads_vs_tp():
    with pytest.raises(ConfigError, match=r"model.kda.num_heads=2.*parallel.tp=4"):
        validate_model(tiny_model_cfg(), tp=4)


def test_vocab_smaller_than_tokenizer():
    with pytest.raises(ConfigError, match=r"model.vocab_size=512.*tokenizer has 4096.*>=4096"):
        validate_vocab(512, 4096)
    validate_vocab(4096, 4096)


@pytest.mark.parametrize("pattern", ["KKK", "KKKMM", "KKXM"])
def test_layer_pattern_must_match_layer_count(pattern):
    with pytest.raises(ConfigError, match=r"model.layer_pattern.*4 letters for model.num_layers=4"):
        validate_model(tiny_model_cfg(layer_pattern=pattern))


def test_moe_topk_and_ep():
    with pytest.raises(ConfigError, match=r"model.moe.top_k=17"):
        validate_model(tiny_model_cfg(**{"moe.top_k": 17}))
    with pytest.raises(ConfigError, match=r"model.moe.num_experts=16.*parallel.ep=3"):
        validate_model(tiny_model_cfg(), ep=3)


def test_world_size_vs_parallel_sizes():
    assert check_world_size(8, tp=2, pp=2, ep=2) == 2
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE=6: world size 6 is not divisible by tp\*pp=4 "
                                          r"\(parallel.tp=2, parallel.pp=2\)"):
        check_world_size(6, tp=2, pp=2, ep=1)
    with pytest.raises(ConfigError, match=r"dp=2.*not divisible by ep=4"):
        check_world_size(4, tp=1, pp=2, ep=4)


def test_one_gpu_per_rank():
    """Several ranks on one GPU (e.g. PP stages sharing a device) are refused before anything is
    built, for every rank of the node, with the fix named."""
    assert gpu_for_local_rank(3, 8, 8) == 3
    for rank in (0, 1):
        with pytest.raises(ConfigError, match=r"1 visible GPU\(s\) but 2 ranks.*one GPU per rank"
                                              r".*--nproc"):
            gpu_for_local_rank(rank, 2, 1)
    with pytest.raises(ConfigError, match=r"^LOCAL_WORLD_SIZE=2: "):
        gpu_for_local_rank(0, 2, 1)
    with pytest.raises(ConfigError, match="0 visible GPU"):
        gpu_for_local_rank(0, 1, 0)


# ------------------------------------------------------------------------ numeric ranges (DOMAINS)

# one bad value per DOMAINS row, and the allowed range its message must name
BAD_VALUES = [
    ("model.hidden_size", 0, ">= 1"),
    ("model.vocab_size", 0, ">= 1"),
    ("model.seq_length", 0, ">= 1"),
    ("model.norm_eps", 0.0, "> 0"),
    ("model.init_std", -0.02, "> 0"),
    ("model.kda.num_heads", 0, ">= 1"),
    ("model.kda.head_dim", 0, ">= 1"),
    ("model.kda.conv_kernel", 0, ">= 1"),
    ("model.kda.chunk_size", 0, ">= 1"),
    ("model.mla.num_heads", 0, ">= 1"),
    ("model.mla.q_lora_rank", 0, ">= 1"),
    ("model.mla.kv_lora_rank", 0, ">= 1"),
    ("model.mla.qk_nope_head_dim", 0, ">= 1"),
    ("model.mla.qk_rope_head_dim", -1, ">= 0"),
    ("model.mla.v_head_dim", 0, ">= 1"),
    ("model.moe.num_experts", 0, ">= 1"),
    ("model.moe.ffn_hidden_size", 0, ">= 1"),
    ("model.moe.num_shared_experts", -1, ">= 0"),
    ("model.moe.dense_ffn_hidden_size", 0, ">= 1"),
    ("model.moe.routed_scaling_factor", 0.0, "> 0"),
    ("model.moe.bias_update_rate", -1e-3, ">= 0"),
    ("model.moe.aux_loss_coeff", -0.1, ">= 0"),
    ("parallel.tp", 0, ">= 1"),
    ("parallel.pp", 0, ">= 1"),
    ("parallel.vpp", 0, ">= 1"),
    ("parallel.ep", -1, ">= 1"),
    ("data.valid_fraction", 1.0, "in [0, 1)"),
    ("data.vocab_size", 0, ">= 1"),
    ("train.seed", -1, "in [0, 4294967295]"),
    ("train.steps", 0, ">= 1"),
    ("train.micro_batch_size", 0, ">= 1"),
    ("train.global_batch_size", 0, ">= 1"),
    ("train.lr", -1.0, "> 0"),
    ("train.min_lr", -1e-4, ">= 0"),
    ("train.warmup_steps", -1, ">= 0"),
    ("train.wsd_decay_fraction", 1.5, "in [0, 1]"),
    ("train.weight_decay", -0.1, ">= 0"),
    ("train.adam_beta1", 1.0, "in [0, 1)"),
    ("train.adam_beta2", -0.5, "in [0, 1)"),
    ("train.adam_eps", 0.0, "> 0"),
    ("train.clip_grad", -1.0, ">= 0"),
    ("train.max_bad_steps", 0, ">= 1"),
    ("train.eval_interval", -1, ">= 0"),
    ("train.eval_batches", -1, ">= 0"),
    ("train.save_interval", -1, ">= 0"),
    ("train.keep_last", -1, ">= 0"),
    ("train.exit_interval", -1, ">= 0"),
    ("logging.log_interval", 0, ">= 1"),
    ("logging.diag_interval", -1, ">= 0"),
]

# the boundary values each range admits (and null where a key allows it)
EDGE_VALUES = [
    ("train.keep_last", 0), ("train.save_interval", 0), ("train.exit_interval", 0), ("train.eval_interval", 0), ("train.eval_batches", 0),
    ("train.warmup_steps", 0), ("train.clip_grad", 0.0), ("train.weight_decay", 0.0), ("train.min_lr", 0.0),
    ("train.adam_beta1", 0.0), ("train.wsd_decay_fraction", 0.0), ("train.wsd_decay_fraction", 1.0),
    ("train.seed", 0), ("train.seed", 2**32 - 1), ("train.steps", 1), ("train.max_bad_steps", 1),
    ("train.micro_batch_size", 1), ("train.global_batch_size", 1), ("train.lr", 3e-4),  # = min_lr
    ("logging.log_interval", 1), ("logging.diag_interval", 0), ("data.valid_fraction", 0.0),
    ("model.mla.qk_rope_head_dim", 0), ("model.mla.q_lora_rank", None), ("model.kda.head_dim", None),
    ("model.moe.num_shared_experts", 0), ("model.moe.bias_update_rate", 0.0), ("model.moe.aux_loss_coeff", 0.0),
]


def config_with(key: str, value) -> Config:
    """The default Config with the dotted `key` set to `value`."""
    cfg = Config()
    *parents, leaf = key.split(".")
    setattr(functools.reduce(getattr, parents, cfg), leaf, value)
    return cfg


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_value_outside_its_range_is_one_config_error(key, value, allowed):
    """Each numeric key's bad value is refused before anything is built, naming the key, the value
    and the allowed range (not a ZeroDivisionError or an optimizer's ValueError later)."""
    with pytest.raises(ConfigError) as err:
        validate_config(config_with(key, value))
    assert (err.value.key, err.value.value) == (key, value)
    assert str(err.value).startswith(f"{key}={value!r}: must be {allowed}")
    if key.startswith("model."):  # the model builds run the same rows
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}="):
            validate_model(config_with(key, value).model)


@pytest.mark.parametrize("key,value", EDGE_VALUES, ids=[f"{k}={v}" for k, v in EDGE_VALUES])
def test_boundary_values_are_accepted(key, value):
    validate_config(config_with(key, value))


def test_every_numeric_key_has_a_range():
    """Each int/float field of the schema has a DOMAINS row (and a bad-value case above) or is one
    of the keys checked against other values."""
    checked_elsewhere = {"model.num_layers", "model.attnres.block_size", "model.moe.top_k", "model.moe.first_k_dense",
                         "parallel.recompute_num_layers", "train.dry_run_world_size", "logging.peak_flops"}
    numeric = set(numeric_keys(Config)) - checked_elsewhere
    assert numeric == {d.key for d in DOMAINS}
    assert {case[0] for case in BAD_VALUES} == numeric


def numeric_keys(cls, prefix: str = ""):
    """Dotted paths of the int/float (or Optional of those) fields of dataclass `cls`, nested included."""
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from numeric_keys(hint, f"{prefix}{name}.")
        elif {a for a in typing.get_args(hint) or (hint,) if a is not type(None)} <= {int, float}:
            yield f"{prefix}{name}"


def test_nan_and_min_lr_above_lr_are_refused():
    with pytest.raises(ConfigError, match=r"^train.lr=nan: must be > 0$"):
        validate_config(config_with("train.lr", float("nan")))
    with pytest.raises(ConfigError, match=r"^train.min_lr=0.01: must be <= train.lr=0.003 \(the schedule decays"):
        validate_config(config_with("train.min_lr", 1e-2))
    with pytest.raises(ConfigError, match=r"^model.kda.head_dim=0: must be >= 1 \(null: .*\), or null$"):
        validate_config(config_with("model.kda.head_dim", 0))

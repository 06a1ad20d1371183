"""Clear errors for bad model/parallel configs: each names the key and the fix."""

import pytest

from attnres_train.config.validate import ConfigError, validate_model, validate_vocab
from parallel.groups import check_world_size, gpu_for_local_rank
from tests.helpers import model_cfg, tiny_model_cfg


def test_defaults_are_valid():
    for name in ["tiny", "mini", "small", "kimi_linear_48b_a3b", "paper_194m", "paper_241m",
                 "paper_296m", "paper_436m", "paper_528m"]:
        validate_model(model_cfg(name))


def test_unknown_residual_mode():
    with pytest.raises(ConfigError, match=r"model.residual='dense'.*standard, full, block"):
        validate_model(tiny_model_cfg(residual="dense"))


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
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp\*pp=4"):
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
    with pytest.raises(ConfigError, match="0 visible GPU"):
        gpu_for_local_rank(0, 1, 0)

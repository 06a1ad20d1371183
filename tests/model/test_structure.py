"""attnres_train/model/structure.py: the kind of every layer and the role of every parameter, for the
tiny and the 48B configs."""

from __future__ import annotations

import pytest

from attnres_train.model.model import build_model
from attnres_train.model.structure import (
    ParamRole,
    active_count,
    counted_tensors,
    has_kda,
    layer_index,
    layer_kind,
    layer_kinds,
    num_mla_layers,
    param_role,
    sublayer_index,
)
from tests.helpers import model_cfg, tiny_model_cfg

PATTERN_48B = "KKKMKKKMKKKMKKKMKKKMKKKMKKM"


def test_tiny_layer_kinds():
    kinds = layer_kinds(tiny_model_cfg())  # KKKM, first_k_dense = 1
    assert [(k.index, k.attention, k.ffn) for k in kinds] == [
        (0, "kda", "dense"), (1, "kda", "moe"), (2, "kda", "moe"), (3, "mla", "moe")]
    assert "".join(k.letter for k in kinds) == "KKKM"
    assert [k.is_mla for k in kinds] == [False, False, False, True]
    assert [k.is_moe for k in kinds] == [False, True, True, True]


def test_48b_layer_kinds():
    cfg = model_cfg("kimi_linear_48b_a3b")
    kinds = layer_kinds(cfg)
    assert len(kinds) == 27 and "".join(k.letter for k in kinds) == PATTERN_48B
    assert [k.index for k in kinds if k.is_mla] == [3, 7, 11, 15, 19, 23, 26]
    assert [k.index for k in kinds if not k.is_moe] == [0]
    assert num_mla_layers(cfg) == 7 and has_kda(cfg)


def test_pattern_and_dense_prefix_are_read_from_the_config():
    cfg = tiny_model_cfg(layer_pattern="MMMM", **{"moe.first_k_dense": 2})
    assert [(k.attention, k.ffn) for k in layer_kinds(cfg)] == [("mla", "dense")] * 2 + [("mla", "moe")] * 2
    assert not has_kda(cfg) and num_mla_layers(cfg) == 4
    with pytest.raises(IndexError):
        layer_kind(cfg, 4)


def test_layer_and_sublayer_index():
    class Layer:
        layer_number = 4  # megatron's, 1-based

    assert layer_index(Layer()) == 3
    assert (sublayer_index(3, ffn=False), sublayer_index(3, ffn=True)) == (6, 7)


TINY_ROLES = [
    ("embedding.word_embeddings.weight", ParamRole("embedding", "embedding")),
    ("decoder.layers.0.input_layernorm.weight", ParamRole("norms", "layer", 0)),
    ("decoder.layers.0.self_attention.q_conv1d.weight", ParamRole("KDA attention", "layer", 0)),
    ("decoder.layers.0.mlp.linear_fc1.weight", ParamRole("dense ffn", "layer", 0)),
    ("decoder.layers.0.attn_res.query", ParamRole("attnres (query + key norm)", "layer", 0)),
    ("decoder.layers.1.pre_mlp_layernorm.weight", ParamRole("norms", "layer", 1)),
    ("decoder.layers.1.mlp.router.weight", ParamRole("moe router (+ expert bias)", "layer", 1)),
    ("decoder.layers.1.mlp.router.expert_bias", ParamRole("moe router (+ expert bias)", "layer", 1)),
    ("decoder.layers.1.mlp.experts.local_experts.15.linear_fc2.weight", ParamRole("moe routed experts", "layer", 1)),
    ("decoder.layers.2.mlp.shared_experts.linear_fc1.weight", ParamRole("moe shared expert", "layer", 2)),
    ("decoder.layers.3.self_attention.linear_q_proj.weight", ParamRole("MLA attention", "layer", 3)),
    # MLA's own norm is attention, not "norms"
    ("decoder.layers.3.self_attention.kv_layernorm.weight", ParamRole("MLA attention", "layer", 3)),
    ("decoder.layers.3.mlp_res.key_norm_weight", ParamRole("attnres (query + key norm)", "layer", 3)),
    ("decoder.final_layernorm.weight", ParamRole("norms", "head")),
    ("decoder.final_res.query", ParamRole("attnres (query + key norm)", "head")),
    ("output_layer.weight", ParamRole("lm_head", "head")),
]


@pytest.mark.parametrize("name,role", TINY_ROLES)
def test_tiny_param_roles(name, role):
    assert param_role(name, tiny_model_cfg()) == role
    assert role.routed_expert == (role.category == "moe routed experts")


def test_chunk_local_layer_index_maps_to_the_global_layer():
    # a pipeline chunk holding layers 3.. names its first layer decoder.layers.0
    cfg = tiny_model_cfg()
    assert param_role("decoder.layers.0.self_attention.linear_proj.weight", cfg, first_layer=3) == \
        ParamRole("MLA attention", "layer", 3)
    assert param_role("decoder.layers.0.self_attention.o_proj.weight", cfg, first_layer=2) == \
        ParamRole("KDA attention", "layer", 2)


def test_48b_param_roles():
    cfg = model_cfg("kimi_linear_48b_a3b")
    assert param_role("decoder.layers.26.self_attention.linear_kv_up_proj.weight", cfg).category == "MLA attention"
    assert param_role("decoder.layers.25.self_attention.b_proj.weight", cfg).category == "KDA attention"
    assert param_role("decoder.layers.0.mlp.linear_fc2.weight", cfg) == ParamRole("dense ffn", "layer", 0)
    routed = param_role("decoder.layers.5.mlp.experts.local_experts.255.linear_fc1.weight", cfg)
    assert routed == ParamRole("moe routed experts", "layer", 5) and routed.routed_expert
    # 256 experts, top 8: a token touches 1/32 of the routed weights
    assert active_count(2 * 1024 * 2304, routed, cfg) == 2 * 1024 * 2304 // 32
    shared = param_role("decoder.layers.5.mlp.shared_experts.linear_fc1.weight", cfg)
    assert active_count(2 * 1024 * 2304, shared, cfg) == 2 * 1024 * 2304


def test_tiny_model_pieces(mcore_world):
    """Every counted tensor of the built tiny model: the rows each piece holds."""
    cfg = tiny_model_cfg()
    rows: dict = {}
    for name, tensor in counted_tensors(build_model(cfg, meta=True)):
        role = param_role(name, cfg)
        rows.setdefault((role.piece, role.layer), set()).add(role.category)
        assert active_count(tensor.numel(), role, cfg) == (
            tensor.numel() * 4 // 16 if ".mlp.experts." in name else tensor.numel())  # top 4 of 16
    common = {"norms", "attnres (query + key norm)"}
    moe = {"moe router (+ expert bias)", "moe routed experts", "moe shared expert"}
    assert rows == {
        ("embedding", None): {"embedding"},
        ("layer", 0): common | {"KDA attention", "dense ffn"},
        ("layer", 1): common | {"KDA attention"} | moe,
        ("layer", 2): common | {"KDA attention"} | moe,
        ("layer", 3): common | {"MLA attention"} | moe,
        ("head", None): common | {"lm_head"},
    }

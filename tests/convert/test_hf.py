"""Hugging Face Kimi Linear in and out, against transformers' own implementation (CPU).

transformers' KimiLinearForCausalLM (its torch fallbacks for KDA and the short convolution) is the
reference: random tiny configs saved with save_pretrained are imported, and our model's logits
must equal transformers' on the same tokens: in float64 to 1e-10 relative (both sides without
their float32 casts: tests/convert/float64.py), in float32 within FP32_RTOL. Non-trivial weights:
the router bias, A_log, dt_bias and the norm gains are randomised, so routing and decay matter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attnres_train.config.schema import ParallelConfig
from attnres_train.convert import hf_config, hf_weights
from attnres_train.convert.convert import fill_from_hf, hf_tensors, import_hf, streamed_hf_tensors
from attnres_train.convert.hf_config import UnsupportedConfig, from_hf
from attnres_train.convert.hf_files import HFFormatError, HFReader, HFWriter, read_config
from attnres_train.convert.hf_runtime import modeling
from attnres_train.model.model import build_model
from tests.convert.float64 import KeepFloat64
from tests.e2e.conftest import ROOT
from tests.helpers import logits

KIMI = modeling()  # before anything imports it: transformers' torch kernels on CPU
FIXTURES = ROOT / "tests" / "convert" / "fixtures"
FP64_RTOL = 1e-10
FP32_RTOL = 2e-6  # measured <= 3.7e-7 (float32 reassociation: KDA chunks of 16 vs 64, the fused fc1)

# (full-attention layers (1-indexed), first dense layers, experts, top-k, shared, scaling,
#  KDA heads, KDA head dim, MLA heads / nope / rope / v / kv_lora, tokens)
CASES = {
    "mla_middle": ([2], 1, 8, 2, 1, 2.446, 4, 16, (4, 16, 8, 16, 32), 40),
    "mla_first_no_dense": ([1], 0, 6, 3, 2, 1.0, 2, 32, (2, 24, 8, 16, 16), 33),
    "mla_last_two_dense": ([4], 2, 4, 2, 1, 0.5, 8, 8, (4, 8, 4, 8, 24), 17),
    "mla_first_and_last": ([1, 4], 1, 8, 4, 1, 2.0, 4, 16, (2, 16, 16, 32, 32), 70),
}


def hf_model(case, dtype=torch.float32, seed=0):
    full, dense, experts, top_k, shared, scale, kda_heads, kda_dim, (mh, nope, rope, v, kv), _ = case
    torch.manual_seed(seed)
    cfg = KIMI.KimiLinearConfig(
        vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=mh, num_key_value_heads=mh,
        intermediate_size=96, moe_intermediate_size=32, num_experts=experts, num_experts_per_token=top_k,
        num_shared_experts=shared, first_k_dense_replace=dense, kv_lora_rank=kv, q_lora_rank=None,
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, routed_scaling_factor=scale,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, experts_implementation="eager",
        linear_attn_config={"full_attn_layers": full, "kda_layers": [i for i in range(1, 5) if i not in full],
                            "num_heads": kda_heads, "head_dim": kda_dim, "short_conv_kernel_size": 4})
    model = KIMI.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KIMI.KimiLinearTopkRouter):
                m.e_score_correction_bias.normal_(0, 0.5)
            if isinstance(m, KIMI.KimiLinearForgetGate):
                m.A_log.uniform_(-1, 2)
                m.dt_bias.normal_(0, 1)
            if isinstance(m, (KIMI.KimiLinearRMSNorm, KIMI.KimiLinearRMSNormGated)):
                m.weight.normal_(1, 0.2)
    return model.to(dtype)


def load_hf(path, dtype):
    return KIMI.KimiLinearForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def ours_from(path, dtype, **overrides):
    cfg = from_hf(read_config(path), seq_length=128)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = build_model(cfg, ParallelConfig(), params_dtype=dtype).eval()
    kept = fill_from_hf(model, cfg, HFReader(path))
    return model, cfg, kept


def ids_for(case, seed=1):
    return torch.randint(0, 384, (2, case[-1]), generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case saved once with save_pretrained (float32)."""
    root = tmp_path_factory.mktemp("hf")
    for name, case in CASES.items():
        hf_model(case).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_equal_transformers_in_float64_and_float32(mcore_world, saved, name):
    case, path = CASES[name], saved / name
    ids = ids_for(case)
    ref, (ours, _, kept) = load_hf(path, torch.float64), ours_from(path, torch.float64)
    assert kept == []
    with torch.no_grad(), KeepFloat64():
        a, b = ref(ids).logits, logits(ours, ids)
    assert rel(a, b) <= FP64_RTOL, rel(a, b)
    ref, (ours, _, _) = load_hf(path, torch.float32), ours_from(path, torch.float32)
    with torch.no_grad():
        a, b = ref(ids).logits, logits(ours, ids)
    assert rel(a, b) <= FP32_RTOL, rel(a, b)


def test_round_trip_hf_ours_hf_is_bit_identical(mcore_world, saved, tmp_path):
    path = saved / "mla_middle"
    ours, cfg, _ = ours_from(path, torch.float32)
    writer = HFWriter(tmp_path / "out", max_shard_bytes=200_000)  # several shards + an index
    for name, tensor in hf_tensors(ours, cfg):
        writer.add(name, tensor)
    assert writer.close() is not None
    hf = read_config(path)
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf_config.to_hf(
        cfg, bos_token_id=hf["bos_token_id"], eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"])))
    original, again = HFReader(path), HFReader(tmp_path / "out")
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        a, b = original.get(name), again.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # and transformers loads the sharded result with the same logits
    ids = ids_for(CASES["mla_middle"])
    with torch.no_grad():
        assert torch.equal(load_hf(path, torch.float32)(ids).logits, load_hf(tmp_path / "out", torch.float32)(ids).logits)


def test_export_reads_the_checkpoint_a_batch_at_a_time(mcore_world, saved, tmp_path):
    """Export streams: batches of about max_shard_bytes (never splitting one checkpoint key, such
    as a layer's stacked experts), the same tensors as from the whole model in memory."""
    path = saved / "mla_first_and_last"
    import_hf(path, tmp_path / "ckpt", log=lambda *_: None)
    ours, cfg, _ = ours_from(path, torch.float32)
    whole = dict(hf_tensors(ours, cfg))
    batches = []
    streamed = dict(streamed_hf_tensors(cfg, tmp_path / "ckpt", batch_bytes=100_000,
                                        progress=lambda done, total: batches.append((done, total))))
    assert len(batches) > 3 and batches[-1][0] == batches[-1][1]
    assert streamed.keys() == whole.keys()
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_transformers_module_layout_and_the_released_dense_names_import_the_same(mcore_world, saved, tmp_path):
    """The two other spellings of a checkpoint: transformers' in-memory names (stacked experts,
    one conv1d, forget_gate.*) and the released files' `mlp` for dense FFNs (save_pretrained
    writes `block_sparse_moe` there)."""
    case, path = CASES["mla_last_two_dense"], saved / "mla_last_two_dense"
    ids = ids_for(case)
    base, _, _ = ours_from(path, torch.float32)
    modules = tmp_path / "modules"
    modules.mkdir()
    state = {k: v.contiguous() for k, v in load_hf(path, torch.float32).state_dict().items()}
    save_file(state, str(modules / "model.safetensors"))
    (modules / "config.json").write_text((path / "config.json").read_text())
    assert hf_weights.detect_layout(state) == "transformers"
    released = tmp_path / "released"
    released.mkdir()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        renamed = {k.replace(".layers.0.block_sparse_moe.", ".layers.0.mlp.")
                   .replace(".layers.1.block_sparse_moe.", ".layers.1.mlp."): f.get_tensor(k) for k in f.keys()}
    assert any(".layers.0.mlp.gate_proj" in k for k in renamed)
    save_file(renamed, str(released / "model.safetensors"))
    (released / "config.json").write_text((path / "config.json").read_text())
    with torch.no_grad():
        want = logits(base, ids)
        for other in (modules, released):
            model, _, _ = ours_from(other, torch.float32)
            assert torch.equal(logits(model, ids), want), other.name


def test_attnres_added_on_import_starts_as_the_uniform_average(mcore_world, saved):
    """--residual block: the AttnRes parameters are not in the HF checkpoint; they keep their
    initial values (zero queries: every sublayer reads the uniform average of its sources, which is
    not the PreNorm residual sum), and everything else is imported."""
    ours, cfg, kept = ours_from(saved / "mla_middle", torch.float32, residual="block")
    # a query and a key-norm gain per sublayer (2 per layer, 4 layers) and for the final aggregate
    assert len(kept) == 2 * (2 * 4 + 1)
    assert all(n.rsplit(".", 2)[-2] in ("attn_res", "mlp_res", "final_res") for n in kept)
    state = ours.state_dict()
    assert all(torch.count_nonzero(state[n]) == 0 for n in kept if n.endswith("query"))


REFUSED = [
    ({"q_lora_rank": 16}, "q_lora_rank"),
    ({"n_group": 2}, "n_group"),
    ({"topk_group": 2}, "topk_group"),
    ({"moe_renormalize": False}, "norm_topk_prob"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim"),
    ({"num_experts_per_token": 1}, "num_experts_per_tok"),
    ({"mlp_layer_types": ["sparse", "dense", "sparse", "sparse"]}, "mlp_layer_types"),
    ({"model_type": "llama"}, "model_type"),
]


@pytest.mark.parametrize("change,field", REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_config_fields_are_refused_by_name(change, field):
    hf = {**json.loads((FIXTURES / "kimi_linear_48b_a3b_config.json").read_text()), **change}
    with pytest.raises(UnsupportedConfig) as err:
        from_hf(hf)
    assert err.value.field == field and str(err.value).startswith(f"config.json field {field}=")


def test_the_released_48b_config_is_our_48b_model(mcore_world):
    """The published config.json fields map to kimi_linear_48b_a3b (residual aside), both ways."""
    from tests.helpers import model_cfg

    hf = json.loads((FIXTURES / "kimi_linear_48b_a3b_config.json").read_text())
    ours, released = from_hf(hf, name="kimi_linear_48b_a3b"), model_cfg("kimi_linear_48b_a3b")
    # not in an HF config: the residual (standard on import), the sequence length and KDA's chunk size
    released.residual, released.attnres, released.seq_length = ours.residual, ours.attnres, ours.seq_length
    released.kda.chunk_size = ours.kda.chunk_size
    assert ours == released
    back = hf_config.to_hf(ours, bos_token_id=163584, eos_token_id=163586, pad_token_id=163839,
                           torch_dtype="bfloat16")
    assert {k: back[k] for k in hf} == hf


def test_bad_checkpoints_are_clear_errors(mcore_world, saved, tmp_path):
    path = saved / "mla_middle"
    # weights of another shape than the config says
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    hf = json.loads((path / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**hf, "hidden_size": 32}))
    (wrong / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(HFFormatError, match=r"model.embed_tokens.weight has shape \[\(384, 64\)\].*does not match"):
        _fill_unsplit(wrong)
    # a shard named in the index is missing
    sharded = tmp_path / "sharded"
    writer = HFWriter(sharded, max_shard_bytes=200_000)
    reader = HFReader(path)
    for name in reader.names():
        writer.add(name, reader.get(name))
    writer.close()
    (sharded / "config.json").write_text(json.dumps(hf))
    (sharded / "model-00002-of-{:05d}.safetensors".format(len(list(sharded.glob("model-*"))))).unlink()
    with pytest.raises(HFFormatError, match=r"shard model-00002-of-\d+\.safetensors named in "
                                            r"model\.safetensors\.index\.json is missing"):
        HFReader(sharded)
    with pytest.raises(HFFormatError, match="config.json does not exist"):
        read_config(tmp_path)


def _fill_unsplit(path):
    cfg = from_hf(read_config(path), seq_length=64)
    fill_from_hf(build_model(cfg, ParallelConfig(), params_dtype=torch.float32), cfg, HFReader(path))


@pytest.mark.slow
def test_cli_import_then_export_loads_in_transformers_with_equal_logits(saved, tmp_path):
    """attnres-train-convert import (a weights-only distributed checkpoint) and export (config.json +
    safetensors) as a user runs them; transformers loads the export, logits bit-identical."""
    path = saved / "mla_first_and_last"
    env = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

    def convert(*args):
        proc = subprocess.run([sys.executable, "-m", "attnres_train.convert.cli", *map(str, args)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    assert "imported" in convert("import", path, tmp_path / "ckpt").stdout
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["kind"] == "weights"
    convert("export", tmp_path / "ckpt", tmp_path / "hf", "--max-shard-size", "150KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = ids_for(CASES["mla_first_and_last"])
    with torch.no_grad():
        assert torch.equal(load_hf(path, torch.float32)(ids).logits, load_hf(tmp_path / "hf", torch.float32)(ids).logits)
    # refused input: one line, exit code 2, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**read_config(path), "q_lora_rank": 8}))
    proc = subprocess.run([sys.executable, "-m", "attnres_train.convert.cli", "import", str(bad), str(tmp_path / "x")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("attnres-train-convert: error: config.json field q_lora_rank=8")
    assert not (tmp_path / "x").exists()

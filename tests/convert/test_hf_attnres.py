"""Our AttnRes models in transformers: the exported modeling file (trust_remote_code) against ours.

An imported Kimi Linear is given Block or Full AttnRes with random (non-zero) pseudo-queries and
key-norm gains, exported with the AttnRes model's code, and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`: its logits equal our model's
(float64 <= 1e-10 relative, float32 within FP32_RTOL), greedy `generate` with transformers' caches
equals greedy decoding that re-runs the whole prefix, and importing the export gives back our
tensors bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from attnres_train.config.schema import ParallelConfig
from attnres_train.convert import hf_attnres
from attnres_train.convert.convert import fill_from_hf, our_state, write_hf
from attnres_train.convert.hf_config import ATTNRES_MODEL_TYPE, from_hf
from attnres_train.convert.hf_files import HFReader, read_config
from attnres_train.model.model import build_model
from tests.convert.float64 import KeepFloat64
from tests.convert.test_hf import CASES, FP64_RTOL, hf_model, ids_for, rel
from tests.helpers import logits

CASE = "mla_middle"  # MLA in layer 2 of 4, one dense layer, 8 experts top-2
MODES = {"block": 3, "full": 1}  # residual -> block size in sublayers (3: blocks straddle layers)
# float32 reassociation is amplified by the depth softmax: here our own float32 model is 3.0e-6
# (block) and 8.6e-7 (full) from its float64 logits, transformers' float32 as far again.
FP32_ATTNRES_RTOL = 2e-5


@pytest.fixture(scope="module")
def world(_gloo_world):
    """megatron's groups of one process for the whole module (the exports are module fixtures)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi") / CASE
    hf_model(CASES[CASE]).save_pretrained(path)
    return path


def attnres_model(kimi_dir, residual, dtype):
    """Our model from the Kimi Linear checkpoint, with AttnRes and random AttnRes parameters."""
    cfg = from_hf(read_config(kimi_dir), seq_length=128)
    cfg.residual, cfg.attnres.block_size = residual, MODES[residual]
    model = build_model(cfg, ParallelConfig(), params_dtype=dtype).eval()
    kept = fill_from_hf(model, cfg, HFReader(kimi_dir))
    gen = torch.Generator().manual_seed(7)
    state = our_state(model)
    with torch.no_grad():
        for name in kept:
            noise = torch.randn(state[name].shape, generator=gen, dtype=torch.float64)
            state[name].copy_(0.5 * noise if name.endswith("query") else 1 + 0.2 * noise)
    return model, cfg


def load_remote(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True,
                                                experts_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(MODES))
def exported(request, world, kimi_dir, tmp_path_factory):
    residual = request.param
    model, cfg = attnres_model(kimi_dir, residual, torch.float64)
    out = tmp_path_factory.mktemp(f"attnres_{residual}")
    write_hf(model, cfg, out, max_shard_bytes=300_000)
    return residual, model, cfg, out


def test_export_carries_the_model_code_and_its_config(exported):
    residual, _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ATTNRES_MODEL_TYPE
    assert config["attn_res_mode"] == residual and config["attn_res_block_size_sublayers"] == MODES[residual]
    assert config["auto_map"] == hf_attnres.AUTO_MAP
    assert (out / hf_attnres.MODELING_FILE).is_file() and (out / hf_attnres.CONFIG_FILE).is_file()
    remote = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert remote.model_type == ATTNRES_MODEL_TYPE == hf_attnres.MODEL_TYPE
    assert remote.attn_res_block_size_sublayers == MODES[residual]


def test_transformers_logits_equal_ours_in_float64_and_float32(exported, kimi_dir):
    residual, ours, _, out = exported
    ids = ids_for(CASES[CASE])
    theirs = load_remote(out, torch.float64)
    with torch.no_grad(), KeepFloat64():
        a, b = theirs(ids).logits, logits(ours, ids)
    rel64 = rel(a, b)
    assert rel64 <= FP64_RTOL, rel64
    # the AttnRes parameters matter: zero queries change the logits by far more than the bound
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(".query"):
                p.zero_()
        assert rel(theirs(ids).logits, a) > 1e-3
    ours32 = attnres_model(kimi_dir, residual, torch.float32)[0]
    with torch.no_grad():
        a, b = load_remote(out, torch.float32)(ids).logits, logits(ours32, ids)
    print(f"{residual}: float64 {rel64:.2e}, float32 {rel(a, b):.2e}")
    assert rel(a, b) <= FP32_ATTNRES_RTOL, rel(a, b)


def test_greedy_generate_with_caches_equals_rerunning_the_prefix(exported):
    _, _, _, out = exported
    model = load_remote(out, torch.float32)
    prompt = ids_for(CASES[CASE])[:, :11]
    new = 8
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                                return_dict_in_generate=True, output_logits=True)
        tokens, steps = prompt, []
        for _ in range(new):
            step = model(tokens, use_cache=False).logits[:, -1]
            steps.append(step)
            allowed = step.clone()
            if model.config.eos_token_id is not None:  # as min_new_tokens does in generate
                allowed[:, model.config.eos_token_id] = -float("inf")
            tokens = torch.cat([tokens, allowed.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached.sequences, tokens)
    for a, b in zip(cached.logits, steps):
        assert rel(b, a) <= FP32_ATTNRES_RTOL, rel(b, a)


def test_importing_the_export_gives_back_our_tensors_bit_for_bit(exported):
    residual, ours, cfg, out = exported
    back_cfg = from_hf(read_config(out), seq_length=128)
    assert (back_cfg.residual, back_cfg.attnres.block_size) == (cfg.residual, MODES[residual])
    back = build_model(back_cfg, ParallelConfig(), params_dtype=torch.float64)
    assert fill_from_hf(back, back_cfg, HFReader(out)) == []
    mine, theirs = our_state(ours), our_state(back)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_registered_in_this_process_it_loads_without_remote_code(exported):
    """hf_attnres.register(): the Auto classes know the model type, so this process loads an
    export with our own classes, trust_remote_code not needed."""
    from attnres_train.convert.hf_attnres.modeling_kimi_linear_attnres import KimiLinearAttnResForCausalLM

    _, _, _, out = exported
    hf_attnres.register()
    hf_attnres.register()  # idempotent
    model = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert type(model) is KimiLinearAttnResForCausalLM

"""Export of checkpoints attnres-train wrote (the `make train` model, a few steps) to transformers.

For model.residual=standard the export is transformers' own `kimi_linear` (KimiLinearForCausalLM);
for block and full it is our AttnRes model type, loaded by AutoModelForCausalLM with
trust_remote_code from the files the export carries. Logits equal our model's on the same
tokens, and the run's tokenizer ships with the export: AutoTokenizer encodes as the run did.
"""

from __future__ import annotations

import json

import pytest
import torch

from attnres_train.checkpoint import load_weights, resolve_checkpoint
from attnres_train.config.schema import ParallelConfig
from attnres_train.convert.convert import export_hf, model_config_of
from attnres_train.convert.hf_runtime import modeling
from attnres_train.data.tokenizer import BPETokenizer
from attnres_train.model.model import build_model
from tests.helpers import logits

FP32_RTOL = 2e-5  # as tests/convert/test_hf_attnres.py: AttnRes's depth softmax amplifies float32 rounding


@pytest.mark.parametrize("residual", ["standard", "block", "full"])
def test_a_trained_checkpoint_exports_to_transformers(trained_run, tmp_path, mcore_world, residual):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained_run(residual)
    out = tmp_path / "hf"
    export_hf(run, out, log=lambda *_: None)  # the run dir: its newest checkpoint and its tokenizer
    config = json.loads((out / "config.json").read_text())
    tokenizer = BPETokenizer.from_file(run / "tokenizer.json")
    assert config["eos_token_id"] == tokenizer.eod
    if residual == "standard":
        assert config["model_type"] == "kimi_linear" and "auto_map" not in config
        theirs = modeling().KimiLinearForCausalLM.from_pretrained(out, experts_implementation="eager")
    else:
        assert config["attn_res_mode"] == residual
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, experts_implementation="eager")
    ckpt = resolve_checkpoint(run)
    cfg = model_config_of(json.loads((ckpt / "meta.json").read_text()))
    ours = build_model(cfg, ParallelConfig(), params_dtype=torch.float32).eval()
    load_weights([ours], ckpt, what="test")
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = torch.tensor([tokenizer.tokenize(text)])
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        a, b = theirs.eval()(ids).logits, logits(ours, ids)
    assert ((a - b).abs().max() / a.abs().max()).item() <= FP32_RTOL

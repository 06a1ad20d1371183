"""attnres-train-generate and the in-memory transformers model of a checkpoint.

Greedy generation with transformers' caches equals greedy decoding that re-runs the whole prefix
(token ids, and logits within float32 bounds) for the standard residual and Block AttnRes; the
same command gives the same samples twice; and a tiny model trained by the test writes text (temperature 0.7)
its own loss rates below what a unigram model of the corpus scores on held-out text (an untrained
model's samples score about ln V, above it).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from attnres_train.inference.hf_model import load
from tests.e2e.conftest import ROOT, _env

FP32_RTOL = 2e-5  # the depth softmax amplifies float32 rounding (tests/convert/test_hf_attnres.py)


def rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_greedy_with_caches_equals_rerunning_the_prefix(trained_run, mcore_world, residual):
    loaded = load(trained_run(residual), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompt = tok("ROMEO:\nWhat light", return_tensors="pt")["input_ids"]
    new = 10
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                                output_logits=True, pad_token_id=tok.pad_token_id)
        tokens, steps = prompt, []
        for _ in range(new):
            steps.append(model(tokens, use_cache=False).logits[:, -1])
            allowed = steps[-1].clone()
            allowed[:, tok.eos_token_id] = -float("inf")  # what min_new_tokens does to generate's scores
            tokens = torch.cat([tokens, allowed.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached.sequences, tokens)
    assert max(rel(b, a) for a, b in zip(cached.logits, steps)) <= FP32_RTOL


def generate_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "attnres_train.inference.generate", *map(str, args)], cwd=ROOT,
                          env=_env(ROOT), capture_output=True, text=True, timeout=300)
    return proc


def test_the_same_seed_gives_the_same_samples(trained_run):
    # mid-sentence and a little above temperature 1: a sample rarely ends at once (an end-of-document
    # token stops it, and two samples stopped there would read the same)
    prompt = "KING: My lord, the"
    args = (trained_run("block"), "--prompt", prompt, "--num-samples", "2", "--max-new-tokens", "12", "--seed", "5",
            "--temperature", "1.2")
    first, second = generate_cli(*args), generate_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout
    samples = first.stdout.split("### prompt 1, sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith(prompt) for s in samples)
    assert samples[0].split("\n", 1)[1] != samples[1].split("\n", 1)[1]  # seeds 5 and 6



def test_out_of_range_flags_are_one_line_errors(capsys, tmp_path):
    from attnres_train.inference.generate import main

    for flag, value in (("--top-p", "0"), ("--max-new-tokens", "0"), ("--temperature", "-1")):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path), "--prompt", "x", flag, value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"attnres-train-generate: error: {flag}=")


def tokens_of(prefix) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix.prefix, multimodal=False, mmap=True)
    return [int(t) for i in range(len(ds)) for t in ds[i]]


def test_a_trained_model_writes_text_it_rates_above_a_unigram_model(trained_run, mcore_world, data_cache):
    """Samples (temperature 0.7) of the trained tiny model: their per-token loss under the model
    is below the unigram model's loss on the held-out split. An untrained model's distribution is
    nearly flat: its samples cost about ln V under it, at any temperature."""
    from attnres_train.config.schema import DataConfig
    from attnres_train.data.dataset import prepare_data

    loaded = load(trained_run("block"), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prepared = prepare_data(DataConfig(), cache_dir=data_cache)
    train, valid = tokens_of(prepared.train[0]), tokens_of(prepared.valid[0])
    counts = Counter(train)
    total, vocab = sum(counts.values()), tok.vocab_size  # add-one smoothing over the vocabulary
    unigram = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in valid) / len(valid)
    torch.manual_seed(0)
    start = torch.full((8, 1), tok.eos_token_id)
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=48, do_sample=True,
                             temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        logits = model(out).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), out[:, 1:].reshape(-1)).item()
    print(f"samples: {loss:.3f} nats/token under the model; unigram on held-out text: {unigram:.3f}")
    assert loss < unigram, (loss, unigram)
    assert unigram < math.log(vocab) - 1  # the bar is below an untrained model's ~ln V

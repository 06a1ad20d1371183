"""The assembled model: AttnRes vs the PreNorm baseline, two-phase vs naive, NoPE, counts.

References: the baseline model with the same weights (megatron's own TransformerLayer with the
residual add), and the naive AttnRes path.
"""

from __future__ import annotations

import pytest
import torch

from attnres_train.model.attnres.state import state_after
from attnres_train.model.model import build_model
from tests.helpers import logits, tiny_model_cfg, tokens, with_residual


def _copy_weights(src, dst):
    """Load every weight of `src` into `dst`; the only keys left over must be AttnRes params."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    assert all(k.endswith((".query", ".key_norm_weight")) for k in missing), missing
    return missing


def _scale_prenorm_eps(baseline, block_size: int, num_layers: int):
    """Multiply every PreNorm's eps by k², k = number of sources its AttnRes twin mixes.

    With zero queries the mix is the mean of the k sources = (residual stream)/k, and
    RMSNorm(x/k; eps) = RMSNorm(x; k²·eps).
    """
    for layer in baseline.decoder.layers:
        for kind, norm in ((0, layer.input_layernorm), (1, layer.pre_mlp_layernorm)):
            k = state_after(2 * (layer.layer_number - 1) + kind, block_size).num_tensors
            norm.eps = norm.eps * k ** 2
    baseline.decoder.final_layernorm.eps *= state_after(2 * num_layers, block_size).num_tensors ** 2


@pytest.mark.parametrize("residual,block_size", [("block", 2), ("block", 3), ("block", 8), ("full", 1)],
                         ids=["block-S2", "block-S3-uneven", "block-one-block", "full"])
def test_zero_queries_equal_baseline_with_scaled_eps(mcore_world, residual, block_size):
    cfg = tiny_model_cfg(residual=residual, **{"attnres.block_size": block_size})
    base_cfg = with_residual(cfg, "standard")
    torch.manual_seed(0)
    baseline = build_model(base_cfg)
    model = build_model(cfg)
    _copy_weights(baseline, model)
    ids = tokens(cfg)
    plain = logits(baseline, ids)
    _scale_prenorm_eps(baseline, block_size, cfg.num_layers)
    ref = logits(baseline, ids)
    out = logits(model, ids)
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 2e-5 * scale
    # ...and the eps scaling matters at init (embedding RMS ~ init std), so the test can tell.
    assert (out - plain).abs().max() > 1e-3 * scale


def test_tiny_eps_equals_plain_baseline(mcore_world):
    cfg = tiny_model_cfg(norm_eps=1e-12)
    baseline = build_model(with_residual(cfg, "standard"))
    model = build_model(cfg)
    _copy_weights(baseline, model)
    ids = tokens(cfg)
    ref, out = logits(baseline, ids), logits(model, ids)
    assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = logits(model, ids)
    loss = out.float().pow(2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("residual,block_size", [("block", 3), ("full", 1)])
def test_two_phase_equals_naive_in_model(mcore_world, residual, block_size):
    cfg = tiny_model_cfg(residual=residual, **{"attnres.block_size": block_size})
    two_phase = build_model(cfg)
    naive_cfg = tiny_model_cfg(residual=residual, **{"attnres.block_size": block_size, "attnres.impl": "naive"})
    naive = build_model(naive_cfg)
    with torch.no_grad():  # non-zero queries and gains so every path carries gradient
        g = torch.Generator().manual_seed(3)
        for n, p in two_phase.named_parameters():
            if n.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith(".key_norm_weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    naive.load_state_dict(two_phase.state_dict())
    ids = tokens(cfg)
    out_a, grads_a = _loss_and_grads(two_phase, ids)
    out_b, grads_b = _loss_and_grads(naive, ids)
    # fp32 with sharp (randn) depth softmaxes: agreement to ~1e-5 of the logit scale; a wrong mix
    # or merge is off by O(1e-1)
    assert (out_a - out_b).abs().max() <= 1e-4 * out_b.abs().max()
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        a, b = grads_a[name], grads_b[name]
        assert (a - b).abs().max() <= 1e-3 * (b.abs().max() + 1e-12), name
    # every AttnRes parameter receives a gradient (first sublayer: exactly zero, but present)
    q_grads = {n: g for n, g in grads_a.items() if n.endswith(".query")}
    assert len(q_grads) == 2 * cfg.num_layers + 1
    assert q_grads["decoder.layers.0.attn_res.query"].abs().max() == 0
    assert all(g.abs().max() > 0 for n, g in q_grads.items() if n != "decoder.layers.0.attn_res.query")


def test_attnres_adds_2d_per_sublayer_plus_final(mcore_world):
    cfg = tiny_model_cfg()
    n_std = sum(p.numel() for p in build_model(with_residual(cfg, "standard")).parameters())
    for residual in ("block", "full"):
        n = sum(p.numel() for p in build_model(with_residual(cfg, residual)).parameters())
        assert n - n_std == 2 * cfg.hidden_size * (2 * cfg.num_layers + 1)


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_mla_is_nope(mcore_world, residual):
    """Without positional encoding a causal MLA layer sees earlier tokens as a set: permuting them
    leaves the last token's logits unchanged (with RoPE they change by O(1))."""
    cfg = tiny_model_cfg(residual=residual, num_layers=1, layer_pattern="M", **{"attnres.block_size": 2})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():  # larger weights: make position effects visible
            if p.dim() == 2:
                p.mul_(10)
    ids = tokens(cfg, batch=1, seq=16)
    perm = torch.cat([torch.randperm(15, generator=torch.Generator().manual_seed(1)), torch.tensor([15])])
    a = logits(model, ids)[0, -1]
    b = logits(model, ids[:, perm])[0, -1]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert not torch.allclose(logits(model, ids)[0, 5], logits(model, ids[:, perm])[0, 5])


def test_moe_layers_and_dense_first_layer(mcore_world):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_model(tiny_model_cfg())
    kinds = [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]
    assert kinds == [False, True, True, True]
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape == (2 * 320, 128)  # SwiGLU, 320


def test_layout_independent_init_equals_the_unsplit_model(mcore_world, tmp_path):
    """build_chunks(layout_independent_init=True) gives the weights one process gets from the seed,
    through the resharding checkpoint, with a scratch dir (trainer) and without (a temp dir)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from attnres_train.config.schema import ParallelConfig
    from attnres_train.train import build_chunks

    cfg = tiny_model_cfg()
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    want = build_model(cfg).state_dict()
    for scratch in (tmp_path, None):
        torch.manual_seed(123)  # the chunks' own init draws differ: only the loaded weights count
        (chunk,) = build_chunks(cfg, ParallelConfig(), torch.float32, layout_independent_init=True,
                                seed=5, scratch_dir=scratch)
        got = chunk.state_dict()
        params = [n for n, _ in chunk.named_parameters()]
        assert params and all(torch.equal(got[n], want[n]) for n in params)
    assert not (tmp_path / ".unsplit-init").exists()  # removed after loading


class _RecordingIO:
    """A StageIO that packs every source (the naive hand-over) and records what it saw."""

    def __init__(self):
        self.sent = None  # (state, payload)

    def receive(self, payload):
        raise AssertionError("a first chunk receives nothing")

    def send(self, state):
        self.sent = (state, torch.cat(state.sources(), dim=0))
        return self.sent[1]


@pytest.mark.parametrize("residual,block_size", [("block", 3), ("full", 1)])
def test_non_last_chunk_returns_the_payload_its_stage_io_sends(mcore_world, residual, block_size):
    """GPTModel without post_process returns the decoder's output unchanged: the tensor the
    StageIO packed is what megatron's schedule sends (and receives the gradient of)."""
    cfg = tiny_model_cfg(residual=residual, **{"attnres.block_size": block_size})
    chunk = build_model(cfg, post_process=False)
    io = _RecordingIO()
    chunk.decoder.set_stage_io(io)
    ids = tokens(cfg)
    out = logits(chunk, ids)
    state, payload = io.sent
    assert out is payload
    shape = state_after(2 * cfg.num_layers, block_size)
    assert (len(state.blocks), state.partial is not None) == shape
    assert out.shape == (shape.num_tensors * ids.shape[1], ids.shape[0], cfg.hidden_size)
    out.sum().backward()  # the payload carries the whole chunk's graph
    assert chunk.embedding.word_embeddings.weight.grad.abs().max() > 0


@pytest.mark.parametrize("pre,post,match", [(False, True, "a non-first pipeline chunk"),
                                            (True, False, "a non-last pipeline chunk")])
def test_split_chunk_without_stage_io_fails_clearly(mcore_world, pre, post, match):
    cfg = tiny_model_cfg(residual="block", **{"attnres.block_size": 2})
    chunk = build_model(cfg, pre_process=pre, post_process=post)
    ids = tokens(cfg)
    if not pre:  # what megatron's schedule delivers to a non-first chunk
        chunk.set_input_tensor(torch.zeros(2 * ids.shape[1], ids.shape[0], cfg.hidden_size))
    with pytest.raises(RuntimeError, match=match + r".*StageIO: run it through parallel.Pipeline"):
        logits(chunk, ids) if pre else chunk(None, None, None)

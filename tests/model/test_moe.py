"""MoE routing as configured for Kimi: sigmoid scores, selection-only expert bias, renormalised
top-k times the routed scaling factor, aux-loss-free bias updates (megatron's router)."""

from __future__ import annotations

import torch

from attnres_train.model.model import build_model
from tests.helpers import tiny_model_cfg


def _router(scaling=1.0):
    model = build_model(tiny_model_cfg(**{"moe.routed_scaling_factor": scaling}))
    return model, model.decoder.layers[1].mlp.router


def _expected_probs(logits, routing_map, scaling):
    s = torch.sigmoid(logits.reshape(-1, logits.shape[-1]).float())
    chosen = torch.where(routing_map, s, torch.zeros_like(s))
    return chosen / chosen.sum(-1, keepdim=True) * scaling


def test_bias_changes_selection_not_weights(mcore_world):
    _, router = _router(scaling=2.446)
    logits = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs0, map0 = router.routing(logits)
        router.expert_bias.zero_()
        router.expert_bias[3] = 10.0  # forces expert 3 into every token's top-k
        probs1, map1 = router.routing(logits)
    assert map0.sum(-1).eq(4).all() and map1.sum(-1).eq(4).all()
    assert map1[:, 3].all() and not map0[:, 3].all()
    # weights: the *unbiased* sigmoid scores of the chosen experts, renormalised, times 2.446
    assert torch.allclose(probs1, _expected_probs(logits, map1, 2.446), atol=1e-6)
    assert torch.allclose(probs1.sum(-1), torch.full((16,), 2.446), atol=1e-5)
    # the bias of expert 3 is nowhere in the weights: its weight is its plain sigmoid score share
    s = torch.sigmoid(logits.reshape(-1, 16))
    tok = (~map0[:, 3]).nonzero()[0, 0]
    assert torch.allclose(probs1[tok, 3], s[tok, 3] / s[tok][map1[tok]].sum() * 2.446, atol=1e-6)


def test_bias_update_moves_load_toward_balance(mcore_world):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    model, router = _router()
    g = torch.Generator().manual_seed(1)
    # skewed logits: low-index experts are preferred by every token
    logits = torch.randn(64, 4, 16, generator=g) + torch.linspace(3, -3, 16)
    rate = model.config.moe_router_bias_update_rate
    assert rate == 1e-3

    def load():
        router.local_tokens_per_expert.zero_()
        router.routing(logits)  # counts tokens per expert (grad mode on)
        return router.local_tokens_per_expert.clone()

    with torch.no_grad():
        router.expert_bias.zero_()
    first = load()
    imbalance0 = (first.max() / first.mean()).item()
    _update_router_expert_bias([model], model.config)
    # one step: overloaded experts' bias goes down by `rate`, underloaded ones up by `rate`
    mean = first.float().mean()
    expected = torch.sign(mean - first.float()) * rate
    assert torch.allclose(router.expert_bias, expected)
    for _ in range(400):
        load()
        _update_router_expert_bias([model], model.config)
    final = load()
    imbalance = (final.max() / final.mean()).item()
    assert imbalance0 > 2.5 and imbalance < 0.5 * imbalance0, (imbalance0, imbalance)

"""Numerical tests of the AttnRes core op (attnres_train.model.attnres).

The plain-autograd ``attnres_naive`` is the ground truth; the memory-lean custom Functions
(``attnres_lean``, ``attnres_phase1``, ``attnres_merge``) and the two-phase Block-AttnRes chain
must match it in fp64 to 1e-10, forward and backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnres_train.model.attnres import (
    attnres,
    attnres_lean,
    attnres_merge,
    attnres_naive,
    attnres_phase1,
    block_attnres_chain_naive,
    block_attnres_chain_two_phase,
)

EPS = 1e-6
F64 = torch.float64
TOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sources(k: int, shape: tuple[int, ...], seed: int, dtype=F64) -> list[torch.Tensor]:
    """k random sources with very different per-source scales, so the key RMSNorm matters."""
    g = _gen(seed)
    out = []
    for _ in range(k):
        scale = 10 ** (2 * torch.rand((), generator=g, dtype=F64).item() - 1)  # 0.1 .. 10
        out.append((scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype).requires_grad_())
    return out


def _query_gamma(dim: int, seed: int, rows: int | None = None, dtype=F64):
    """Random non-zero query and gain (zero queries would make the key gradients vanish)."""
    g = _gen(seed)
    shape = (dim,) if rows is None else (rows, dim)
    query = torch.randn(shape, generator=g, dtype=F64).to(dtype).requires_grad_()
    gamma = (1 + 0.5 * torch.randn(shape, generator=g, dtype=F64)).to(dtype).requires_grad_()
    return query, gamma


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- lean vs naive


@pytest.mark.parametrize("k", [1, 2, 5, 10], ids=lambda k: f"k{k}")
@pytest.mark.parametrize(
    "shape", [(7, 16), (5, 3, 32), (2, 3, 2, 8)], ids=lambda s: "x".join(map(str, s))
)
def test_lean_matches_naive_fp64(k, shape):
    sources = _sources(k, shape, seed=k * 100 + len(shape))
    query, gamma = _query_gamma(shape[-1], seed=k + 7)
    cot = torch.randn(shape, generator=_gen(3), dtype=F64)
    inputs = [*sources, query, gamma]

    ref = attnres_naive(sources, query, gamma, EPS)
    out = attnres_lean(sources, query, gamma, EPS)
    assert out.dtype == F64 and out.shape == shape
    assert _max_abs(out, ref) <= TOL

    g_ref = torch.autograd.grad((ref * cot).sum(), inputs)
    g_out = torch.autograd.grad((out * cot).sum(), inputs)
    for name, a, b in zip([f"src{j}" for j in range(k)] + ["query", "gamma"], g_out, g_ref):
        assert _max_abs(a, b) <= TOL, name
    if k > 1:  # the test is only meaningful if the key path actually carries gradient
        assert g_ref[-2].abs().max() > 1e-3 and g_ref[-1].abs().max() > 1e-3


def test_dispatch_matches_and_rejects_unknown_impl():
    sources = _sources(3, (4, 8), seed=1)
    query, gamma = _query_gamma(8, seed=2)
    a = attnres(sources, query, gamma, EPS, impl="two_phase")
    b = attnres(sources, query, gamma, EPS, impl="naive")
    assert _max_abs(a, b) <= TOL
    with pytest.raises(ValueError, match=r"unknown AttnRes impl 'bogus'.*valid: two_phase, naive"):
        attnres(sources, query, gamma, EPS, impl="bogus")


def test_phase1_and_merge_gradcheck():
    """Finite-difference check of both Functions, including the lse output's gradient path."""
    blocks = _sources(3, (2, 3, 6), seed=11)
    queries, gammas = _query_gamma(6, seed=12, rows=4)
    assert torch.autograd.gradcheck(
        lambda q, g, *b: attnres_phase1(b, q, g, EPS), (queries, gammas, *blocks)
    )
    out, partial = _sources(1, (5, 6), 13)[0], _sources(1, (5, 6), 14)[0]
    lse = torch.randn(5, generator=_gen(16), dtype=F64).requires_grad_()
    query, gamma = _query_gamma(6, seed=15)
    assert torch.autograd.gradcheck(
        lambda *t: attnres_merge(*t, EPS), (out, lse, partial, query, gamma)
    )


def test_merge_equals_softmax_over_all_sources():
    blocks = _sources(4, (6, 16), seed=21)
    partial = _sources(1, (6, 16), seed=22)[0]
    queries, gammas = _query_gamma(16, seed=23, rows=3)
    out, lse = attnres_phase1(blocks, queries, gammas, EPS)
    assert out.shape == (3, 6, 16) and lse.shape == (3, 6)
    for s in range(3):
        merged = attnres_merge(out[s], lse[s], partial, queries[s], gammas[s], EPS)
        ref = attnres_naive(blocks + [partial], queries[s], gammas[s], EPS)
        assert _max_abs(merged, ref) <= TOL
        assert _max_abs(out[s], attnres_naive(blocks, queries[s], gammas[s], EPS)) <= TOL


# --------------------------------------------------------------------------- chains


class _Sublayer(nn.Module):
    """Small fp64 stand-in for attention / MLP: tanh(Linear(x))."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, dim, dtype=F64)

    def forward(self, x):
        return torch.tanh(self.lin(x))


# (L, block_size): block_size=1 is Full AttnRes; N = ceil(L / S) blocks, last one may be short.
CHAIN_CASES = [(1, 1), (4, 1), (7, 1), (7, 3), (8, 4), (6, 6), (5, 2), (9, 2), (4, 8)]


def _chain_id(case):
    num_layers, size = case
    kind = "full" if size == 1 else "block"
    return f"{kind}-L{num_layers}-S{size}-N{math.ceil(num_layers / size)}"


def _chain_setup(num_layers: int, dim: int = 12, shape=(3, 2), seed: int = 0):
    layers = nn.ModuleList(_Sublayer(dim, seed + 1000 + i) for i in range(num_layers))
    embedding = torch.randn(*shape, dim, generator=_gen(seed), dtype=F64).requires_grad_()
    queries, gammas = _query_gamma(dim, seed=seed + 1, rows=num_layers + 1)
    return layers, embedding, queries, gammas


@pytest.mark.parametrize("case", CHAIN_CASES, ids=_chain_id)
def test_two_phase_chain_matches_naive_fp64(case):
    num_layers, size = case
    layers, embedding, queries, gammas = _chain_setup(num_layers, seed=num_layers * 10 + size)
    params = [embedding, queries, gammas, *layers.parameters()]
    names = ["embedding", "queries", "gammas"] + [n for n, _ in layers.named_parameters()]

    def run(chain):
        inputs, final = chain(embedding, list(layers), queries, gammas, size, EPS)
        g = _gen(99)
        loss = sum((h * torch.randn(h.shape, generator=g, dtype=F64)).sum() for h in inputs)
        loss = loss + (final * torch.randn(final.shape, generator=g, dtype=F64)).sum()
        return inputs, final, torch.autograd.grad(loss, params)

    h_ref, f_ref, g_ref = run(block_attnres_chain_naive)
    h_two, f_two, g_two = run(block_attnres_chain_two_phase)
    assert len(h_two) == len(h_ref) == num_layers
    for layer, (a, b) in enumerate(zip(h_two, h_ref)):
        assert _max_abs(a, b) <= TOL, f"h_{layer}"
    assert _max_abs(f_two, f_ref) <= TOL
    for name, a, b in zip(names, g_two, g_ref):
        assert _max_abs(a, b) <= TOL, name
    assert g_ref[1].abs().max() > 1e-3  # queries receive a real gradient


@pytest.mark.parametrize("num_layers", [3, 6], ids=lambda n: f"L{n}")
def test_block_size_one_is_full_attnres(num_layers):
    """Full AttnRes written out directly: sublayer l attends over [emb, f_0(h_0), ..., f_{l-1}]."""
    layers, embedding, queries, gammas = _chain_setup(num_layers, seed=5)

    sources = [embedding]
    expected = []
    for layer in range(num_layers + 1):
        values = torch.stack(sources)  # [k, ..., D]
        keys = values / torch.sqrt(values.pow(2).mean(-1, keepdim=True) + EPS)
        logits = torch.einsum("k...d,d->k...", keys, queries[layer] * gammas[layer])
        weights = torch.softmax(logits, dim=0)
        hidden = torch.einsum("k...,k...d->...d", weights, values)
        expected.append(hidden)
        if layer < num_layers:
            sources.append(layers[layer](hidden))

    for chain in (block_attnres_chain_naive, block_attnres_chain_two_phase):
        inputs, final = chain(embedding, list(layers), queries, gammas, 1, EPS)
        for layer in range(num_layers):
            assert _max_abs(inputs[layer], expected[layer]) <= TOL, (chain.__name__, layer)
        assert _max_abs(final, expected[-1]) <= TOL


@pytest.mark.parametrize("chain", [block_attnres_chain_naive, block_attnres_chain_two_phase],
                         ids=["naive", "two_phase"])
def test_single_block_zero_queries_is_half_residual(chain):
    """One block + zero queries: two sources [emb, partial] with equal weight 1/2, so
    h_l = (emb + sum_{i<l} f_i) / 2, half the standard PreNorm residual stream."""
    num_layers = 5
    layers, embedding, _, gammas = _chain_setup(num_layers, seed=9)
    queries = torch.zeros(num_layers + 1, embedding.shape[-1], dtype=F64)
    outputs = []

    def record(layer):
        def fn(h):
            out = layers[layer](h)
            outputs.append(out)
            return out
        return fn

    inputs, final = chain(
        embedding, [record(i) for i in range(num_layers)], queries, gammas, num_layers, EPS
    )
    assert torch.equal(inputs[0], embedding)
    for layer in range(1, num_layers):
        stream = embedding + sum(outputs[:layer])
        assert _max_abs(inputs[layer], 0.5 * stream) <= 1e-12, layer
    assert _max_abs(final, 0.5 * (embedding + sum(outputs))) <= 1e-12


@pytest.mark.parametrize("impl", ["two_phase", "naive"])
def test_first_sublayer_single_source_is_identity(impl):
    embedding = torch.randn(4, 2, 8, generator=_gen(31), dtype=F64, requires_grad=True)
    query, gamma = _query_gamma(8, seed=32)
    out = attnres([embedding], query, gamma, EPS, impl=impl)
    assert torch.equal(out, embedding)
    cot = torch.randn(out.shape, generator=_gen(33), dtype=F64)
    g_emb, g_q, g_g = torch.autograd.grad((out * cot).sum(), [embedding, query, gamma])
    assert torch.equal(g_emb, cot)
    assert torch.equal(g_q, torch.zeros_like(g_q)) and torch.equal(g_g, torch.zeros_like(g_g))


def test_chain_first_sublayer_query_grad_is_zero():
    layers, embedding, queries, gammas = _chain_setup(4, seed=33)
    for chain in (block_attnres_chain_naive, block_attnres_chain_two_phase):
        inputs, final = chain(embedding, list(layers), queries, gammas, 2, EPS)
        assert torch.equal(inputs[0], embedding)
        loss = sum(h.sum() for h in inputs) + final.sum()
        (g_q,) = torch.autograd.grad(loss, [queries])
        assert torch.equal(g_q[0], torch.zeros_like(g_q[0])), chain.__name__
        assert g_q[1:].abs().min() > 0  # every other sublayer's query does get a gradient


# --------------------------------------------------------------------------- precision


def test_bf16_inputs_fp32_stats():
    """bf16 sources: lse is fp32 and matches fp64 to fp32 accuracy (1e-4, would be ~1e-2 if the
    statistics ran in bf16); outputs and grads match the fp64 reference on the *same*
    bf16-rounded inputs to bf16 tolerance: elementwise rtol 2e-2 / atol 2e-2 for the output, and
    a relative L2 error <= 2e-2 for the gradients (the key path of a small-norm source amplifies
    the bf16 rounding of the incoming gradient on a few elements)."""
    shape, dim = (64, 2), 128
    blocks = _sources(6, (*shape, dim), seed=41, dtype=torch.bfloat16)
    partial = _sources(1, (*shape, dim), seed=42, dtype=torch.bfloat16)[0]
    queries, gammas = _query_gamma(dim, seed=43, rows=3, dtype=torch.float32)

    out, lse = attnres_phase1(blocks, queries, gammas, EPS)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    hidden = attnres_merge(out[2], lse[2], partial, queries[2], gammas[2], EPS)
    assert hidden.dtype == torch.bfloat16

    b64 = [b.detach().double().requires_grad_() for b in blocks]
    p64 = partial.detach().double().requires_grad_()
    q64, g64 = queries.detach().double(), gammas.detach().double()
    w = q64 * g64
    logits = torch.stack(
        [(b * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + EPS)) @ w.t() for b in b64]
    )  # [n, ..., S]
    lse_ref = torch.logsumexp(logits, 0).movedim(-1, 0)
    assert _max_abs(lse.double(), lse_ref) <= 1e-4
    ref = attnres_naive(b64 + [p64], q64[2], g64[2], EPS)
    torch.testing.assert_close(hidden.double(), ref, rtol=2e-2, atol=2e-2)

    cot = torch.randn(hidden.shape, generator=_gen(44), dtype=F64)
    grads = torch.autograd.grad((hidden.double() * cot).sum(), [*blocks, partial])
    grads_ref = torch.autograd.grad((ref * cot).sum(), [*b64, p64])
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).norm() / b.norm()).item() <= 2e-2


# --------------------------------------------------------------------------- memory


def _record_saved(fn):
    """Run fn() and return (result, tensors packed for backward)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def _non_input_saved(saved, inputs):
    """Saved tensors that are not (views of the full extent of) one of ``inputs``."""
    def is_input(t):
        return any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for x in inputs)
    return [t for t in saved if not is_input(t)]


def test_phase1_saves_no_activation_sized_tensor():
    """Phase 1 may save the inputs and per-(query, token) stats only. With D=64 > S*n=12, a
    saved normalised key ([..., D] or [n, ..., D]) or output o ([S, ..., D]) breaks both
    bounds; the plain-autograd op is checked to break them, so the check has teeth."""
    n, num_q, shape, dim = 4, 3, (5, 2), 64
    tokens = math.prod(shape)
    blocks = _sources(n, (*shape, dim), seed=51)
    queries, gammas = _query_gamma(dim, seed=52, rows=num_q)
    inputs = [*blocks, queries, gammas]

    def violations(saved):
        extra = _non_input_saved(saved, inputs)
        too_big = [tuple(t.shape) for t in extra if t.numel() >= tokens * dim]
        total = sum(t.numel() for t in extra)
        return too_big, total

    (out, lse), saved = _record_saved(lambda: attnres_phase1(blocks, queries, gammas, EPS))
    assert len(saved) >= n + 2  # hooks did see the Function's save_for_backward
    too_big, total = violations(saved)
    assert too_big == [] and total <= num_q * n * tokens, (too_big, total)
    # and the lean op does not keep its result alive through the graph either
    assert not any(t.data_ptr() == out.data_ptr() for t in saved)

    _, saved_naive = _record_saved(
        lambda: [attnres_naive(blocks, queries[s], gammas[s], EPS) for s in range(num_q)]
    )
    too_big_naive, total_naive = violations(saved_naive)
    assert too_big_naive and total_naive > num_q * n * tokens


def test_merge_saves_only_inputs():
    blocks = _sources(2, (6, 32), seed=61)
    partial = _sources(1, (6, 32), seed=62)[0]
    queries, gammas = _query_gamma(32, seed=63, rows=2)
    out, lse = attnres_phase1(blocks, queries, gammas, EPS)
    o1, l1 = out[1], lse[1]
    h, saved = _record_saved(lambda: attnres_merge(o1, l1, partial, queries[1], gammas[1], EPS))
    assert len(saved) == 5
    assert _non_input_saved(saved, [o1, l1, partial, queries[1], gammas[1]]) == []

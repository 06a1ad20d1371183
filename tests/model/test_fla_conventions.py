"""Our fla integrations speak fla's conventions, checked on CPU against fla's own references.

fla's Triton kernels (``chunk_kda``, ``fused_attnres``) run only on a GPU, but fla ships pure-torch
reference implementations of the same ops (``fla.ops.kda.naive``, ``fla.ops.attnres.naive``)
that define what the kernels compute. Here the kernel entry points are replaced by those
references, so everything on our side of the call — the KDA adapter (argument order, log-space
gate, scale, state layout ``[B, H, K, V]`` and dtype, the "in kernel" switches), the layer's
``impl="fla"`` path and the ``fla`` variant of the op benchmark — runs on CPU in fp64 and must
match our pure-torch paths (exactly, or to fp32 rounding where fla's reference computes in fp32).
A convention mismatch (a transposed state, a gate passed
before its activation, a temperature) fails here instead of on a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fla") is None, reason="fla-core is not installed (dev extra)"
)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def _rel(a, b):
    """max |a - b| relative to max |b|."""
    return _maxdiff(a, b) / b.abs().max().item()


# ------------------------------------------------------------------------------------ KDA


def _kda_inputs(b=2, t=45, h=3, k=16, v=8, seed=0):
    """q, k l2-normalised, g = logsigmoid (log-space decay, <= 0), beta in (0, 1), h0; fp64.
    The state h0 is fp32-representable because the adapter hands fla an fp32 state."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [
        F.normalize(r(b, t, h, k), dim=-1),
        F.normalize(r(b, t, h, k), dim=-1),
        r(b, t, h, v),
        F.logsigmoid(r(b, t, h, k)),
        torch.sigmoid(r(b, t, h)),
        r(b, h, k, v).float().double(),
    ]


@pytest.fixture
def fla_kda_on_cpu(monkeypatch):
    """Route ``fla.ops.kda.chunk_kda`` to fla's recurrent reference and let the adapter run on
    CPU. Records the keyword arguments of each call."""
    import fla.ops.kda
    from fla.ops.kda.naive import naive_recurrent_kda

    from attnres_train.model import kda as kda_pkg
    from attnres_train.model.kda import fla as kda_fla_mod

    calls = []

    def chunk_kda_reference(q, k, v, g, beta, *, scale, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, chunk_size, **rest):
        calls.append(dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                          chunk_size=chunk_size, rest=rest,
                          state_dtype=None if initial_state is None else initial_state.dtype))
        # fla's kernel keeps the state in fp32 and returns it in fp32; the reference follows the
        # inputs' dtype, which here is fp64 so that the comparison is exact
        h0 = None if initial_state is None else initial_state.to(q.dtype)
        o, final = naive_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=h0,
                                       output_final_state=output_final_state)
        return o, final

    monkeypatch.setattr(fla.ops.kda, "chunk_kda", chunk_kda_reference)
    monkeypatch.setattr(kda_fla_mod, "fla_available", lambda: True)
    monkeypatch.setattr(kda_pkg, "fla_available", lambda: True)
    return calls


@pytest.mark.parametrize("with_state", [True, False])
def test_kda_adapter_matches_fla_reference(fla_kda_on_cpu, with_state):
    """``kda(impl="fla")`` through fla's reference == our fp64 chunked form: output, final state
    and the gradients of all inputs to 2e-6 relative (fla's reference computes in fp32; any
    convention error is O(1)); the adapter switches fla's in-kernel norm and
    gate off (our caller already applied them) and hands it an fp32 state."""
    from attnres_train.model.kda import kda

    xs = [x.requires_grad_() for x in _kda_inputs()]
    ys = [x.detach().clone().requires_grad_() for x in xs]
    h0_x = xs[5] if with_state else None
    h0_y = ys[5] if with_state else None
    o_f, s_f = kda(*xs[:5], scale=0.3, initial_state=h0_x, output_final_state=True, impl="fla",
                   chunk_size=32)
    o_c, s_c = kda(*ys[:5], scale=0.3, initial_state=h0_y, output_final_state=True, impl="chunk",
                   chunk_size=16)
    assert _rel(o_f, o_c) <= 2e-6 and _rel(s_f, s_c) <= 2e-6

    (call,) = fla_kda_on_cpu
    assert call["use_qk_l2norm_in_kernel"] is False and call["chunk_size"] == 32
    assert call["scale"] == 0.3 and call["rest"] == {}
    assert call["state_dtype"] == (torch.float32 if with_state else None)

    gen = torch.Generator().manual_seed(1)
    wo = torch.randn(o_c.shape, generator=gen, dtype=torch.float64)
    ws = torch.randn(s_c.shape, generator=gen, dtype=torch.float64)
    ((o_f * wo).sum() + (s_f * ws).sum()).backward()
    ((o_c * wo).sum() + (s_c * ws).sum()).backward()
    for i, (a, b) in enumerate(zip(xs, ys)):
        if i == 5 and not with_state:
            continue
        assert _rel(a.grad, b.grad) <= 2e-6, f"grad of input {i}"


def test_kda_adapter_rejects_fla_unsupported_chunk(fla_kda_on_cpu):
    from attnres_train.model.kda import kda, resolve_impl

    xs = _kda_inputs(t=8)
    with pytest.raises(ValueError, match="chunk_size 32 or 64"):
        kda(*xs[:5], impl="fla", chunk_size=16)
    # auto never picks fla on CPU, even where fla imports
    assert resolve_impl("auto", torch.device("cpu"), 64) == "chunk"


def test_kda_layer_fla_path_matches_chunk(mcore_world, fla_kda_on_cpu):
    """The whole KDA layer with ``impl="fla"`` (through fla's fp32 reference) == ``impl="chunk"``
    in fp64: output and every parameter gradient to 1e-5 relative."""
    from tests.model.test_kda import _layer

    layer = _layer(chunk_size=32, impl="fla", hidden_size=64, linear_key_head_dim=16,
                   linear_value_head_dim=16).double()
    x = torch.randn(41, 2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(impl):
        layer.zero_grad()
        layer.impl = impl
        out, _ = layer(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    out_f, grads_f = run("fla")
    assert len(fla_kda_on_cpu) == 1  # the layer really went through the adapter
    out_c, grads_c = run("chunk")
    assert _rel(out_f, out_c) <= 1e-5
    for n, g in grads_c.items():
        assert _rel(grads_f[n], g) <= 1e-5, n


# -------------------------------------------------------------------------------- AttnRes


def test_attnres_op_matches_fla_reference():
    """Our AttnRes op (query and key-norm gain separate, no temperature, RMSNorm eps inside the
    root) computes fla's ``naive_attnres`` with ``scale=1``, with a non-unit gain: to 1e-6 relative
    (fla's reference computes in fp32; a temperature or a misplaced gain is O(1))."""
    from fla.ops.attnres.naive import naive_attnres

    from attnres_train.model.attnres import attnres_naive

    gen = torch.Generator().manual_seed(0)
    sources = [(1 + j) * torch.randn(5, 3, 32, generator=gen, dtype=torch.float64)
               for j in range(4)]
    query = 0.3 * torch.randn(32, generator=gen, dtype=torch.float64)
    gamma = 1 + 0.5 * torch.randn(32, generator=gen, dtype=torch.float64)
    ours = attnres_naive(sources, query, gamma, 1e-6)
    theirs = naive_attnres(query, sources, gamma, rms_eps=1e-6)
    assert _rel(theirs, ours) <= 1e-6


def test_op_benchmark_fla_variant_computes_the_same(monkeypatch):
    """The op benchmark's ``fla`` variant (the peer row of the table) produces the same sublayer
    inputs as our two-phase variant when fla's op is its reference: the peer is timed on the
    same computation."""
    from fla.ops.attnres.naive import naive_attnres

    import bench.attnres_op as bench

    monkeypatch.setattr(bench, "_fla_fused_attnres", lambda: naive_attnres)

    class Args:
        tokens, dim, blocks, sublayers = 12, 32, 3, 4

    problem = bench.make_problem(Args, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        problem["gammas"].add_(0.25 * torch.randn(problem["gammas"].shape, dtype=torch.float64))
    ref = bench.run_two_phase(problem)
    peer = bench.run_fla(problem)
    assert len(ref) == len(peer) == Args.sublayers
    for a, b in zip(ref, peer):
        assert _rel(b, a) <= 1e-6


def test_the_stand_ins_have_the_kernels_signatures():
    """The references replace the real entry points only if our calls bind to both alike: the
    adapter's call binds to the real ``chunk_kda``, and ``fused_attnres`` takes the reference's
    arguments (names and order) plus kernel-only options."""
    import inspect

    from fla.ops.attnres import fused_attnres
    from fla.ops.attnres.naive import naive_attnres
    from fla.ops.kda import chunk_kda

    x = object()
    inspect.signature(chunk_kda).bind(x, x, x, x, x, scale=0.1, initial_state=None,
                                      output_final_state=True, use_qk_l2norm_in_kernel=False,
                                      chunk_size=64)
    fused = list(inspect.signature(fused_attnres).parameters)
    naive = list(inspect.signature(naive_attnres).parameters)
    assert fused[:len(naive)] == naive

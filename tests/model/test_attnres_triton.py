"""The fused Triton AttnRes kernels (attnres_train.model.attnres.triton_kernels) vs the torch ops.

On CPU the kernels run in Triton's interpreter on tiny shapes. TRITON_INTERPRET has to be set
before triton is first imported in a process (triton's own ``tl.*`` helpers are ``@jit``
functions built at import time, and megatron/torch may import triton early), so the interpreter
tests (marked ``interp``) run in a child pytest process started with TRITON_INTERPRET=1 by
:func:`test_interpreter_suite`; in the parent process they are skipped, and nothing of the
interpreter leaks into the rest of the suite. Running this file directly under
``TRITON_INTERPRET=1`` runs them in-process. The ``gpu``-marked tests check the compiled kernels
at the Kimi-48B shapes and skip without CUDA.

References: the torch Functions (``attnres_phase1`` / ``attnres_merge``, themselves tested
against plain autograd in test_attnres_op.py), evaluated in fp64. Tolerances: fp64 kernels
1e-10 absolute; fp32 1e-5 relative to the largest reference value; bf16 inputs the bounds of
test_attnres_op.py's bf16 test (output rtol/atol 2e-2, lse 1e-4, gradients 2e-2 relative L2).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import attnres_train.model.attnres as attnres_pkg  # noqa: E402
from attnres_train.model.attnres import attnres_merge, attnres_phase1  # noqa: E402

MOD = "attnres_train.model.attnres.triton_kernels"
EPS = 1e-6
F64 = torch.float64
BF16 = torch.bfloat16
REPO = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")
interp = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process (test_interpreter_suite)")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.skipif(INTERPRET, reason="this is the child process")
def test_interpreter_suite():
    """Run this file's interpreter tests in a child pytest with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}
    env.pop("ATTNRES_KERNEL", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-m", "not gpu", "-k", "not test_interpreter_suite and not compile_for_h100", "-rfEs",
           str(Path(__file__).relative_to(REPO))]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = (f"{' '.join(cmd)} ({time.perf_counter() - t0:.1f} s)\n"
              f"{res.stdout[-8000:]}\n{res.stderr[-4000:]}")
    assert res.returncode == 0, report
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, report  # nothing silently skipped
    print(report)


@pytest.fixture
def tk(monkeypatch):
    """The interpreted kernel module, with small tiles (D=48 takes two D chunks)."""
    mod = importlib.import_module(MOD)
    for name in ("FWD_TILE", "BWD_TILE", "MERGE_TILE"):
        monkeypatch.setattr(mod, name, (16, 32, 4))
    return mod


def _sources(k, shape, seed, dtype=F64, device="cpu"):
    """k random sources with very different per-source scales (0.1 .. 10)."""
    g = _gen(seed)
    out = []
    for _ in range(k):
        scale = 10 ** (2 * torch.rand((), generator=g, dtype=F64).item() - 1)
        t = scale * torch.randn(shape, generator=g, dtype=F64)
        out.append(t.to(device=device, dtype=dtype).requires_grad_())
    return out


def _query_gamma(dim, seed, rows=None, dtype=F64, device="cpu"):
    g = _gen(seed)
    shape = (dim,) if rows is None else (rows, dim)
    query = torch.randn(shape, generator=g, dtype=F64)
    gamma = 1 + 0.5 * torch.randn(shape, generator=g, dtype=F64)
    return (query.to(device=device, dtype=dtype).requires_grad_(),
            gamma.to(device=device, dtype=dtype).requires_grad_())


def _f64(ts):
    return [t.detach().double().requires_grad_() for t in ts]


def _rel(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _phase1_run(fn, blocks, queries, gammas, cot_o, cot_l):
    """Outputs and gradients (blocks..., queries, gammas) of sum(o*cot_o) + sum(lse*cot_l)."""
    o, lse = fn(blocks, queries, gammas, EPS)
    loss = 0
    if cot_o is not None:
        loss = loss + (o.double() * cot_o).sum()
    if cot_l is not None:
        loss = loss + (lse.double() * cot_l).sum()
    grads = torch.autograd.grad(loss, [*blocks, queries, gammas])
    return o, lse, grads


# --------------------------------------------------------------------------- phase 1

# (leading shape, D, n sources, S queries): D=48 is not a power of two (masked second chunk),
# T=13/37 leave a partial token tile, n=5 and S=3 pad to 8 and 4.
PHASE1_CASES = [((13,), 32, 1, 1), ((37,), 48, 2, 3), ((4, 16), 48, 5, 4)]


def _case_id(c):
    lead, dim, n, s = c
    return f"T{'x'.join(map(str, lead))}-D{dim}-n{n}-S{s}"


@interp
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", PHASE1_CASES, ids=_case_id)
def test_phase1_matches_torch(tk, case, dtype):
    lead, dim, n, num_q = case
    blocks = _sources(n, (*lead, dim), seed=n * 10 + dim, dtype=dtype)
    queries, gammas = _query_gamma(dim, seed=dim + num_q, rows=num_q, dtype=dtype)
    g = _gen(7)
    cot_o = torch.randn(num_q, *lead, dim, generator=g, dtype=F64)
    cot_l = torch.randn(num_q, *lead, generator=g, dtype=F64)

    o, lse, grads = _phase1_run(tk.attnres_phase1_triton, blocks, queries, gammas, cot_o, cot_l)
    assert o.dtype == dtype and o.shape == (num_q, *lead, dim)
    assert lse.dtype == (F64 if dtype == F64 else torch.float32) and lse.shape == (num_q, *lead)
    inputs64 = _f64([*blocks, queries, gammas])
    o_ref, lse_ref, g_ref = _phase1_run(attnres_phase1, inputs64[:n], *inputs64[n:], cot_o, cot_l)
    names = [f"block{j}" for j in range(n)] + ["queries", "gammas"]
    if dtype == F64:
        assert (o - o_ref).abs().max() <= 1e-10 and (lse - lse_ref).abs().max() <= 1e-10
        for name, a, b in zip(names, grads, g_ref):
            assert (a - b).abs().max() <= 1e-10, name
    else:
        assert _rel(o, o_ref) <= 1e-5 and _rel(lse, lse_ref) <= 1e-5
        for name, a, b in zip(names, grads, g_ref):
            assert _rel(a, b) <= 1e-5, name
    for name, a, b in zip(names, grads, g_ref):
        assert a.dtype == dtype and a.shape == b.shape, name
    if n == 1:  # one source: weight exactly 1, o is the block
        assert torch.equal(o[0], blocks[0])
    else:  # the key path carries gradient, so the test has teeth
        assert g_ref[-2].abs().max() > 1e-3


@interp
@pytest.mark.parametrize("which", ["o_only", "lse_only"])
def test_phase1_one_output_used(tk, which):
    """Backward with only one of (o, lse) in the graph (the other grad arrives as None)."""
    blocks = _sources(3, (9, 48), seed=5)
    queries, gammas = _query_gamma(48, seed=6, rows=3)
    g = _gen(8)
    cot_o = torch.randn(3, 9, 48, generator=g, dtype=F64) if which == "o_only" else None
    cot_l = torch.randn(3, 9, generator=g, dtype=F64) if which == "lse_only" else None
    _, _, grads = _phase1_run(tk.attnres_phase1_triton, blocks, queries, gammas, cot_o, cot_l)
    _, _, g_ref = _phase1_run(attnres_phase1, blocks, queries, gammas, cot_o, cot_l)
    for a, b in zip(grads, g_ref):
        assert (a - b).abs().max() <= 1e-10


@interp
def test_phase1_bf16(tk):
    """bf16 sources, fp32 queries: fp32 statistics; vs fp64 on the same bf16-rounded inputs."""
    lead, dim, n, num_q = (48,), 48, 5, 3
    blocks = _sources(n, (*lead, dim), seed=41, dtype=BF16)
    queries, gammas = _query_gamma(dim, seed=43, rows=num_q, dtype=torch.float32)
    g = _gen(44)
    cot_o = torch.randn(num_q, *lead, dim, generator=g, dtype=F64)
    cot_l = torch.randn(num_q, *lead, generator=g, dtype=F64)
    o, lse, grads = _phase1_run(tk.attnres_phase1_triton, blocks, queries, gammas, cot_o, cot_l)
    assert o.dtype == BF16 and lse.dtype == torch.float32
    assert all(a.dtype == BF16 for a in grads[:n]) and grads[-1].dtype == torch.float32
    inputs64 = _f64([*blocks, queries, gammas])
    o_ref, lse_ref, g_ref = _phase1_run(attnres_phase1, inputs64[:n], *inputs64[n:], cot_o, cot_l)
    assert (lse.double() - lse_ref).abs().max() <= 1e-4
    torch.testing.assert_close(o.double(), o_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, g_ref):
        assert _rel_l2(a, b) <= 2e-2


# --------------------------------------------------------------------------- merge


def _merge_inputs(lead, dim, seed, dtype, lse_dtype):
    out, partial = _sources(2, (*lead, dim), seed=seed, dtype=dtype)
    lse = (3 * torch.randn(lead, generator=_gen(seed + 1), dtype=F64)).to(lse_dtype)
    query, gamma = _query_gamma(dim, seed=seed + 2, dtype=torch.float32 if dtype == BF16 else dtype)
    return out, lse.requires_grad_(), partial, query, gamma


def _merge_run(fn, inputs, cot):
    h = fn(*inputs, EPS)
    return h, torch.autograd.grad((h.double() * cot).sum(), inputs)


@interp
@pytest.mark.parametrize("dtype", [F64, torch.float32, BF16], ids=["fp64", "fp32", "bf16"])
def test_merge_matches_torch(tk, dtype):
    lead, dim = (5, 7), 48
    inputs = _merge_inputs(lead, dim, seed=21, dtype=dtype,
                           lse_dtype=F64 if dtype == F64 else torch.float32)
    cot = torch.randn(*lead, dim, generator=_gen(22), dtype=F64)
    h, grads = _merge_run(tk.attnres_merge_triton, inputs, cot)
    assert h.dtype == dtype and h.shape == (*lead, dim)
    for a, x in zip(grads, inputs):
        assert a.dtype == x.dtype and a.shape == x.shape
    h_ref, g_ref = _merge_run(attnres_merge, _f64(inputs), cot)
    names = ["out", "lse", "partial", "query", "gamma"]
    if dtype == F64:
        assert (h - h_ref).abs().max() <= 1e-10
        for name, a, b in zip(names, grads, g_ref):
            assert (a - b).abs().max() <= 1e-10, name
    elif dtype == torch.float32:
        assert _rel(h, h_ref) <= 1e-5
        for name, a, b in zip(names, grads, g_ref):
            assert _rel(a, b) <= 1e-5, name
    else:
        torch.testing.assert_close(h.double(), h_ref, rtol=2e-2, atol=2e-2)
        for name, a, b in zip(names, grads, g_ref):
            assert _rel_l2(a, b) <= 2e-2, name
    assert g_ref[1].abs().max() > 1e-3 and g_ref[3].abs().max() > 1e-3  # logit path is live


# --------------------------------------------------------------------------- chain


class _Sublayer(nn.Module):
    def __init__(self, dim, seed, dtype):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, dim, dtype=dtype)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _chain(phase1, merge, embedding, layers, queries, gammas, block_size):
    """Block AttnRes over len(layers) sublayers + final aggregate, two-phase, with the given ops
    (the schedule of block_attnres_chain_two_phase)."""
    num_layers = len(layers)
    blocks, inputs = [embedding], []
    for start in range(0, num_layers, block_size):
        stop = min(start + block_size, num_layers)
        last = stop == num_layers
        q_stop = stop + 1 if last else stop
        out, lse = phase1(blocks, queries[start:q_stop], gammas[start:q_stop], EPS)
        outs, lses = out.unbind(0), lse.unbind(0)
        partial = None
        for i, layer in enumerate(range(start, stop)):
            h = outs[i] if partial is None else merge(
                outs[i], lses[i], partial, queries[layer], gammas[layer], EPS)
            inputs.append(h)
            sub = layers[layer](h)
            partial = sub if partial is None else partial + sub
        if last:
            final = merge(outs[-1], lses[-1], partial, queries[num_layers], gammas[num_layers], EPS)
        else:
            blocks = blocks + [partial]
    return inputs, final


@interp
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("num_layers,block_size", [(5, 2), (4, 4)], ids=["L5-S2", "L4-S4"])
def test_chain_triton_equals_torch(tk, num_layers, block_size, dtype):
    dim, lead = 32, (3, 4)
    layers = nn.ModuleList(_Sublayer(dim, 100 + i, dtype) for i in range(num_layers))
    embedding = torch.randn(*lead, dim, generator=_gen(1), dtype=F64).to(dtype).requires_grad_()
    queries, gammas = _query_gamma(dim, seed=2, rows=num_layers + 1, dtype=dtype)
    params = [embedding, queries, gammas, *layers.parameters()]

    def run(phase1, merge):
        inputs, final = _chain(phase1, merge, embedding, layers, queries, gammas, block_size)
        g = _gen(99)
        loss = sum((h.double() * torch.randn(h.shape, generator=g, dtype=F64)).sum()
                   for h in [*inputs, final])
        return [*inputs, final], torch.autograd.grad(loss, params)

    h_tri, g_tri = run(tk.attnres_phase1_triton, tk.attnres_merge_triton)
    h_ref, g_ref = run(attnres_phase1, attnres_merge)
    tol = 1e-10 if dtype == F64 else 1e-5
    for i, (a, b) in enumerate(zip(h_tri, h_ref)):
        assert _rel(a, b) <= tol, f"h_{i}"
    for i, (a, b) in enumerate(zip(g_tri, g_ref)):
        assert _rel(a, b) <= tol, i
    assert torch.equal(g_tri[1][0], torch.zeros_like(g_tri[1][0]))  # first sublayer: 1 source
    assert g_ref[1][1:].abs().min() > 0


# --------------------------------------------------------------------------- dispatch


def test_dispatch_selection(monkeypatch):
    monkeypatch.delenv("ATTNRES_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sys.modules.pop(MOD, None)
    blocks = _sources(2, (4, 8), seed=1)
    queries, gammas = _query_gamma(8, seed=2, rows=2)
    # CPU default: the torch ops, and the kernel module (hence triton) is not imported
    assert attnres_pkg.kernel_backend("cpu") == "torch"
    assert attnres_pkg.phase1_fn("cpu") is attnres_phase1
    assert attnres_pkg.merge_fn("cpu") is attnres_merge
    o, lse = attnres_pkg.attnres_phase1_auto(blocks, queries, gammas, EPS)
    attnres_pkg.attnres_merge_auto(o[0], lse[0], blocks[1], queries[0], gammas[0], EPS)
    assert MOD not in sys.modules
    # CUDA default: triton (installed here), once the kernels pass their self-check
    monkeypatch.setattr(attnres_pkg, "triton_self_check", lambda device_type="cuda": None)
    assert attnres_pkg.kernel_backend("cuda") == "triton"
    # overrides
    monkeypatch.setenv("ATTNRES_KERNEL", "torch")
    assert attnres_pkg.kernel_backend("cuda") == "torch"
    monkeypatch.setenv("ATTNRES_KERNEL", "triton")
    assert attnres_pkg.kernel_backend("cuda") == "triton"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        attnres_pkg.kernel_backend("cpu")
    monkeypatch.setenv("ATTNRES_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ATTNRES_KERNEL='bogus'"):
        attnres_pkg.kernel_backend("cpu")
    assert MOD not in sys.modules
    # without triton installed: torch on CUDA too, and forcing triton is an error
    monkeypatch.setattr(attnres_pkg, "triton_available", lambda: False)
    monkeypatch.delenv("ATTNRES_KERNEL")
    assert attnres_pkg.kernel_backend("cuda") == "torch"
    monkeypatch.setenv("ATTNRES_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        attnres_pkg.kernel_backend("cuda")


@interp
def test_dispatch_forced_triton_on_cpu_under_interpreter(tk, monkeypatch):
    monkeypatch.setenv("ATTNRES_KERNEL", "triton")
    assert attnres_pkg.phase1_fn("cpu") is tk.attnres_phase1_triton
    assert attnres_pkg.merge_fn("cpu") is tk.attnres_merge_triton


@interp
def test_model_with_triton_kernels(tk, monkeypatch, mcore_world):
    """The tiny Block-AttnRes model (block.py calls the dispatcher): Triton == torch kernels."""
    from attnres_train.model.model import build_model
    from tests.helpers import logits, tiny_model_cfg, tokens

    cfg = tiny_model_cfg(residual="block", **{"attnres.block_size": 3})
    model = build_model(cfg)
    with torch.no_grad():
        g = _gen(3)
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".key_norm_weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    ids = tokens(cfg, batch=1, seq=32)  # 32 tokens, D=128: one token tile, one D chunk
    for name in ("FWD_TILE", "BWD_TILE", "MERGE_TILE"):
        monkeypatch.setattr(tk, name, (32, 128, 4))
    calls = []
    real = tk.attnres_phase1_triton
    monkeypatch.setattr(tk, "attnres_phase1_triton", lambda *a: calls.append(1) or real(*a))

    def run(backend):
        monkeypatch.setenv("ATTNRES_KERNEL", backend)
        model.zero_grad()
        out = logits(model, ids)
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}

    out_ref, grads_ref = run("torch")
    assert not calls
    out_tri, grads_tri = run("triton")
    assert calls  # the model did run the Triton kernels
    # fp32 through the whole network: agreement to ~1e-5 of the logit scale (as two-phase vs
    # naive in test_model.py; a wrong mix or merge is off by O(1e-1))
    assert _rel(out_tri, out_ref) <= 1e-4
    assert grads_tri.keys() == grads_ref.keys()
    worst = max(_rel(grads_tri[n], grads_ref[n]) for n in grads_ref)
    print(f"logits rel err {_rel(out_tri, out_ref):.2e}, worst grad rel err {worst:.2e}")
    for name in grads_ref:
        assert (grads_tri[name] - grads_ref[name]).abs().max() <= \
            1e-3 * (grads_ref[name].abs().max() + 1e-12), name
    assert grads_tri["decoder.layers.0.attn_res.query"].abs().max() == 0


# --------------------------------------------------------------------------- GPU


@pytest.fixture
def tk_gpu():
    """The compiled kernel module, on a CUDA machine."""
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("needs CUDA (and compiled, not interpreted, kernels)")
    return importlib.import_module(MOD)


def _block_schedule_check(tk, dtype, device, tok, dim, n, num_q):
    """One block of the schedule: phase 1 of num_q queries over n sources, row 0 used directly,
    rows 1.. merged with a partial sum; forward and backward vs the torch ops in fp64 on the
    same (rounded) inputs; fp32 parameters as in the model."""
    blocks = _sources(n, (tok, dim), seed=1, dtype=dtype, device=device)
    queries, gammas = _query_gamma(dim, seed=2, rows=num_q, dtype=torch.float32, device=device)
    with torch.no_grad():
        queries.mul_(0.3 if dim < 256 else 0.05)  # a spread-out, non-saturated depth softmax
    partial = _sources(1, (tok, dim), seed=3, dtype=dtype, device=device)[0]
    g = torch.Generator(device=device).manual_seed(4)
    cot_h = torch.randn(num_q - 1, tok, dim, generator=g, device=device, dtype=F64)
    cot_o = torch.randn(tok, dim, generator=g, device=device, dtype=F64)

    def run(phase1, merge, blocks, partial, queries, gammas):
        o, lse = phase1(blocks, queries, gammas, EPS)
        hs = [merge(o[s], lse[s], partial, queries[s], gammas[s], EPS) for s in range(1, num_q)]
        loss = (o[0].double() * cot_o).sum() + sum(
            (h.double() * c).sum() for h, c in zip(hs, cot_h))
        grads = torch.autograd.grad(loss, [*blocks, partial, queries, gammas])
        return [o, lse, *hs], grads

    outs, grads = run(tk.attnres_phase1_triton, tk.attnres_merge_triton,
                      blocks, partial, queries, gammas)
    inputs64 = _f64([*blocks, partial, queries, gammas])
    outs_ref, grads_ref = run(attnres_phase1, attnres_merge, inputs64[:n], *inputs64[n:])
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    assert [a.dtype for a in grads] == [dtype] * (n + 1) + [torch.float32] * 2
    if dtype == torch.float32:
        for i, (a, b) in enumerate(zip(outs, outs_ref)):
            assert _rel(a, b) <= 1e-5, i
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            assert _rel(a, b) <= 1e-4, i
    else:
        assert (outs[1].double() - outs_ref[1]).abs().max() <= 1e-4  # lse: fp32 statistics
        for i, (a, b) in enumerate(zip(outs, outs_ref)):
            if i != 1:
                torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            assert _rel_l2(a, b) <= 2e-2, i
    assert grads_ref[-2].abs().max() > 1e-3  # the queries get a real gradient
    # deterministic (no atomics): a second run is bitwise identical
    outs2, grads2 = run(tk.attnres_phase1_triton, tk.attnres_merge_triton,
                        blocks, partial, queries, gammas)
    assert all(torch.equal(a, b) for a, b in zip([*outs, *grads], [*outs2, *grads2]))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_block_schedule_small(tk, dtype):
    """The GPU test's check at interpreter-sized shapes (also validates that test's code)."""
    _block_schedule_check(tk, dtype, "cpu", tok=40, dim=48, n=5, num_q=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_gpu_real_shapes(tk_gpu, dtype):
    """Kimi-48B shapes: T=4096 tokens, D=2304, n=10 completed sources, S=6 queries."""
    _block_schedule_check(tk_gpu, dtype, "cuda", tok=4096, dim=2304, n=10, num_q=6)


def test_failed_self_check_falls_back_to_torch(monkeypatch):
    """auto never selects kernels that fail to build or disagree with the torch path."""
    monkeypatch.delenv("ATTNRES_KERNEL", raising=False)
    attnres_pkg.triton_self_check.cache_clear()

    def broken(device_type):
        raise RuntimeError("PTX compile failed\ndetails")

    monkeypatch.setattr(attnres_pkg, "_compare_kernels", broken)
    with pytest.warns(UserWarning, match="Triton kernels disabled.*PTX compile failed"):
        assert attnres_pkg.kernel_backend("cuda") == "torch"
    assert attnres_pkg.triton_self_check("cuda") == "RuntimeError: PTX compile failed"
    monkeypatch.setattr(attnres_pkg, "_compare_kernels", lambda device_type: "self-check mismatch: 1e-1")
    attnres_pkg.triton_self_check.cache_clear()
    with pytest.warns(UserWarning, match="mismatch"):
        assert attnres_pkg.kernel_backend("cuda") == "torch"
    attnres_pkg.triton_self_check.cache_clear()


@interp
def test_self_check_passes_under_interpreter(tk):
    """The self-check itself (phase 1 + merge, fwd + bwd, Triton vs torch) on the interpreter."""
    assert attnres_pkg._compare_kernels("cpu") is None


@interp
def test_tile_sweep_checks_every_tile(tmp_path):
    """bench/triton_tiles.py (the GPU tile sweep of `make gpu-bench`) on the interpreter: each
    candidate tile of each kernel is run and checked against the fp32 torch op (D=40 with
    BLOCK_D 32/64 and 6 tokens exercise both masks), the defaults are among them, and the report
    files are written. On CPU nothing is timed, so no tile is recommended."""
    from bench import triton_tiles
    mod = importlib.import_module(MOD)
    kernels = triton_tiles.main(["--quick", "--tokens", "6", "--dim", "40", "--blocks", "3",
                                 "--sublayers", "3", "--results-dir", str(tmp_path),
                                 "--name", "sweep"])
    assert set(kernels) == {"phase1_fwd", "phase1_bwd", "merge"}
    for name, k in kernels.items():
        assert tuple(k["current"]) == getattr(mod, k["attr"])  # defaults restored afterwards
        assert any(tuple(r["tile"]) == tuple(k["current"]) for r in k["rows"])
        assert len(k["rows"]) == 2 and all(r["ok"] and r["rel_error"] < 1e-5 for r in k["rows"])
        assert k["best"] is None and all(r["ms"] is None for r in k["rows"])
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["shapes"]["dim"] == 40 and "bench.triton_tiles" in report["command"]
    assert "| phase1_bwd |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.skipif(INTERPRET, reason="compiles for a real GPU target")
@pytest.mark.parametrize("preset,dtype", [("kimi48b", "bfloat16"), ("kimi48b", "float32"),
                                          ("paper", "bfloat16")])
def test_launch_tiles_compile_for_h100_without_spills(preset, dtype):
    """No GPU needed: each kernel, with the tile triton_kernels.py launches at the 48B and the
    paper's shapes (d=2304), compiles for sm_90 with Triton's bundled ptxas, fits the register
    file and spills nothing (spill stack and local memory 0 bytes). Before the phase-1 tile
    shrank BLOCK_D for S > 8, the paper's S=16 forward spilled 152 bytes."""
    from bench import triton_tiles
    mod = importlib.import_module(MOD)
    blocks, sublayers = triton_tiles.PRESETS[preset]
    for name, kernels in triton_tiles.COMPILE_KERNELS.items():
        tile = triton_tiles.launch_tile(name, getattr(mod, triton_tiles.TILE_ATTR[name]),
                                        sublayers, 2304)
        for kernel in kernels:
            use = triton_tiles.compile_resources(kernel, tile, arch=90, blocks=blocks,
                                                 sublayers=sublayers, dtype=getattr(torch, dtype))
            assert use["stack"] == 0 and use["local"] == 0 and use["reg"] <= 255, (kernel, tile, use)


def test_phase1_launch_tile_scales_with_queries():
    mod = importlib.import_module(MOD)
    assert mod.phase1_launch_tile((16, 64, 8), 6, 2304) == (16, 64, 8)
    assert mod.phase1_launch_tile((16, 64, 8), 16, 2304) == (16, 32, 8)
    assert mod.phase1_launch_tile((16, 32, 8), 64, 2304) == (16, 16, 8)  # never below 16
    assert mod.phase1_launch_tile((16, 64, 8), 2, 40) == (16, 64, 8)
    assert mod.phase1_launch_tile((16, 64, 8), 2, 24) == (16, 32, 8)   # next_pow2(dim)

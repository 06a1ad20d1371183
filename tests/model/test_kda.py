"""Kimi Delta Attention: chunked form vs the token recurrence, numerics under strong decays,
dispatch, and the megatron layer (names, counts, causality, meta build, checkpoint axes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnres_train.model.kda import kda, kda_chunk, kda_recurrent
from attnres_train.model.kda.fla import fla_available

# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny, and the token-by-token reference is hundreds of small ops: on the
    2-vCPU CI box a second OpenMP thread makes each op wait on a spinning/descheduled worker
    (measured: the same test 0.05 s with 1 thread, 6 s with 2 under host contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


B, H, K, V = 2, 2, 16, 16


def _inputs(T, decay=1.0, dtype=torch.float64, seed=0, b=B, h=H, k=K, v=V):
    """q, k (l2-normalised), v, g = decay * logsigmoid(randn) (mean ~ -0.8*decay), beta, h0.

    Drawn in fp64 then cast, so fp32 and fp64 runs see the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q = F.normalize(r(b, T, h, k), dim=-1)
    kk = F.normalize(r(b, T, h, k), dim=-1)
    vv = r(b, T, h, v)
    g = decay * F.logsigmoid(r(b, T, h, k))
    beta = torch.sigmoid(r(b, T, h))
    h0 = r(b, h, k, v)
    return [x.to(dtype) for x in (q, kk, vv, g, beta, h0)]


def _fwd_bwd(fn, xs, **kw):
    """Output, final state and the grads of all 6 inputs under a fixed random cotangent."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(99)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    wS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    ((o * wo).sum() + (S * wS).sum()).backward()
    return o.detach(), S.detach(), [x.grad for x in xs]


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rel(ref, x):
    return _maxdiff(ref, x) / ref.double().abs().max().item()


# --------------------------------------------------------------- chunk vs recurrence

@pytest.mark.parametrize("T,C", [(64, 16), (100, 16), (77, 32), (130, 64), (5, 64)])
@pytest.mark.parametrize("decay", [1.0, 30.0])
def test_chunk_matches_recurrent_fp64(T, C, decay):
    """Any T (incl. not a multiple of C, and T < C) with a random initial state; decay=30
    gives mean g ~ -24, where a factorised exp(G_r)*exp(-G_i) would overflow even in fp64
    (|G| reaches ~1500 in a 64-chunk)."""
    q, k, v, g, beta, h0 = _inputs(T, decay)
    o_r, S_r = kda_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_c, S_c = kda_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=C)
    assert o_c.shape == (B, T, H, V) and S_c.shape == (B, H, K, V)
    assert o_c.dtype == torch.float64 and S_c.dtype == torch.float64
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    assert _maxdiff(o_r, o_c) <= 1e-10
    assert _maxdiff(S_r, S_c) <= 1e-10


@pytest.mark.parametrize("T,C,decay", [(100, 16, 1.0), (77, 32, 30.0), (70, 64, 30.0)])
def test_chunk_grads_match_recurrent_fp64(T, C, decay):
    """Gradients of q, k, v, g, beta and the initial state, through autograd of both forms."""
    xs = _inputs(T, decay)
    o_r, S_r, g_r = _fwd_bwd(kda_recurrent, xs)
    o_c, S_c, g_c = _fwd_bwd(kda_chunk, xs, chunk_size=C)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), g_r, g_c):
        assert torch.isfinite(b).all(), name
        assert _maxdiff(a, b) <= 1e-10, (name, _maxdiff(a, b))


def test_chunk_sub_chunk_sizes_agree_fp64():
    """The sub-chunk size (diagonal blocks pairwise, off-diagonal factorised) is an internal
    speed knob: every choice, including fully pairwise (sub = C), gives the same result."""
    q, k, v, g, beta, h0 = _inputs(96, 30.0)
    ref, _ = kda_recurrent(q, k, v, g, beta, initial_state=h0)
    for sub in (4, 8, 16, 32):
        o, _ = kda_chunk(q, k, v, g, beta, initial_state=h0, chunk_size=32, sub_chunk=sub)
        assert _maxdiff(ref, o) <= 1e-10, sub


@pytest.mark.parametrize("C", [16, 64])
def test_chunk_fp32_strong_decay_finite_and_accurate(C):
    """fp32, mean g ~ -24 (min ~ -115): forward and all grads finite and close to the fp64
    recurrence (measured ~2e-6 output, ~5e-7 state, ~6e-6 grads, relative to the max)."""
    xs = _inputs(128, 30.0, k=32, v=32)
    o_r, S_r, g_r = _fwd_bwd(kda_recurrent, xs)
    o_c, S_c, g_c = _fwd_bwd(kda_chunk, [x.float() for x in xs], chunk_size=C)
    assert o_c.dtype == torch.float32 and S_c.dtype == torch.float32
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    assert _rel(o_r, o_c) <= 2e-5
    assert _rel(S_r, S_c) <= 1e-5
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), g_r, g_c):
        assert torch.isfinite(b).all(), name
        assert _rel(a, b) <= 1e-4, (name, _rel(a, b))


def test_chunk_fp32_extreme_decay_g_minus_100():
    """g = -100 on every step and channel (exp(-100) is an fp32 denormal, 64*100 >> 88):
    outputs, state and every gradient stay finite, outputs/state match the fp64 recurrence.
    (The g and h0 gradients are ~1e-44 denormals there, so only finiteness is checked.)"""
    q, k, v, g, beta, h0 = _inputs(128, 1.0, k=32, v=32)
    g = torch.full_like(g, -100.0)
    xs = [q, k, v, g, beta, h0]
    o_r, S_r, _ = _fwd_bwd(kda_recurrent, xs)
    o_c, S_c, g_c = _fwd_bwd(kda_chunk, [x.float() for x in xs], chunk_size=64)
    assert all(torch.isfinite(t).all() for t in [o_c, S_c, *g_c])
    assert _rel(o_r, o_c) <= 1e-5 and _rel(S_r, S_c) <= 1e-5


def test_optional_state_and_dtypes():
    """No initial state == zero state; no final state unless asked; bf16 in -> bf16 out with an
    fp32 state (the math runs in fp32)."""
    q, k, v, g, beta, h0 = _inputs(40, 1.0)
    for fn in (kda_recurrent, kda_chunk):
        o0, S_none = fn(q, k, v, g, beta)
        o1, _ = fn(q, k, v, g, beta, initial_state=torch.zeros_like(h0))
        assert S_none is None
        assert _maxdiff(o0, o1) == 0.0
        xb = [x.bfloat16() for x in (q, k, v, g, beta)]
        ob, Sb = fn(*xb, output_final_state=True)
        assert ob.dtype == torch.bfloat16 and Sb.dtype == torch.float32
        assert _rel(o0, ob) <= 0.05  # bf16 inputs: ~3 significant digits


def test_chunk_is_causal():
    """Changing the inputs at t0 leaves every earlier output bit-identical."""
    q, k, v, g, beta, h0 = _inputs(50, 1.0)
    o, _ = kda_chunk(q, k, v, g, beta, initial_state=h0, chunk_size=16)
    t0 = 37
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2):
        x[:, t0:] = torch.randn_like(x[:, t0:])
    g2[:, t0:] = -5.0
    o2, _ = kda_chunk(q2, k2, v2, g2, beta, initial_state=h0, chunk_size=16)
    assert torch.equal(o[:, :t0], o2[:, :t0])
    assert not torch.allclose(o[:, t0:], o2[:, t0:])


# ------------------------------------------------------------------------- dispatch

def test_kda_dispatch_and_errors():
    q, k, v, g, beta, h0 = _inputs(33, 1.0)
    o_auto, _ = kda(q, k, v, g, beta, initial_state=h0, chunk_size=16)  # CPU: chunk
    o_chunk, _ = kda_chunk(q, k, v, g, beta, initial_state=h0, chunk_size=16)
    o_rec, _ = kda(q, k, v, g, beta, initial_state=h0, impl="recurrent")
    assert torch.equal(o_auto, o_chunk)
    assert _maxdiff(o_rec, o_chunk) <= 1e-10
    with pytest.raises(ValueError, match="unknown KDA impl 'triton'; valid: auto, chunk, recurrent"):
        kda(q, k, v, g, beta, impl="triton")
    if not fla_available():
        with pytest.raises(RuntimeError, match="impl='fla' needs CUDA"):
            kda(q, k, v, g, beta, impl="fla")
    with pytest.raises(ValueError, match="beta must be"):
        kda(q, k, v, g, beta[..., :1])


def test_fla_unavailable_without_cuda():
    if not torch.cuda.is_available():
        assert fla_available() is False


@pytest.mark.gpu
@pytest.mark.skipif(not fla_available(), reason="needs CUDA and fla")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_fla_matches_chunk(dtype, tol):
    """fla's Triton chunk_kda vs our chunked form (fp32 reference computed on the GPU).
    Tolerances are relative to the max |value|: fp32 kernels use tf32-class dots (2e-3),
    bf16 inputs keep ~3 significant digits (3e-2)."""
    from attnres_train.model.kda.fla import kda_fla

    xs = [x.cuda() for x in _inputs(200, 1.0, dtype=torch.float32, b=2, h=4, k=64, v=64)]
    ref_o, ref_S = kda_chunk(*xs[:5], initial_state=xs[5], output_final_state=True, chunk_size=64)
    q, k, v, g, beta = (x.to(dtype) for x in xs[:5])
    o, S = kda_fla(q, k, v, g.float(), beta, initial_state=xs[5], output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert _rel(ref_o, o) <= tol and _rel(ref_S, S) <= tol


# ---------------------------------------------------------------------------- layer

def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(
        num_layers=1, hidden_size=128, num_attention_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        use_cpu_initialization=True, add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=1e-5,
    )
    base.update(kw)
    return TransformerConfig(**base)


def _layer(chunk_size=16, impl="chunk", **cfg):
    from attnres_train.model.kda.layer import KimiDeltaAttention

    return KimiDeltaAttention(_config(**cfg), layer_number=1, chunk_size=chunk_size, impl=impl)


# HF checkpoint names and shapes for d=128, H=2, K=32 (P = 64, kernel 4)
HF_SHAPES = {
    "q_proj.weight": (64, 128), "k_proj.weight": (64, 128), "v_proj.weight": (64, 128),
    "q_conv1d.weight": (64, 1, 4), "k_conv1d.weight": (64, 1, 4), "v_conv1d.weight": (64, 1, 4),
    "f_a_proj.weight": (32, 128), "f_b_proj.weight": (64, 32),
    "g_a_proj.weight": (32, 128), "g_b_proj.weight": (64, 32),
    "dt_bias": (64,), "A_log": (2,), "b_proj.weight": (2, 128),
    "o_norm.weight": (32,), "o_proj.weight": (128, 64),
}


def test_param_count_formula():
    from attnres_train.model.kda.layer import kda_param_count

    assert kda_param_count(2304, 32, 128, 4) == 39_514_272  # the 48B model's KDA layer
    assert kda_param_count(128, 2, 32, 4) == 46_178


def test_layer_names_shapes_count_and_init(mcore_world):
    from attnres_train.model.kda.layer import kda_param_count

    layer = _layer()
    params = dict(layer.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == HF_SHAPES
    assert sum(p.numel() for p in params.values()) == kda_param_count(128, 2, 32, 4)
    assert params["A_log"].dtype == params["dt_bias"].dtype == torch.float32
    # init: A = exp(A_log) in [1, 16], softplus(dt_bias) in [1e-3, 0.1], o_norm = 1,
    # conv ~ U(+-1/sqrt(4)) like nn.Conv1d, linears ~ N(0, 0.02)
    A = params["A_log"].exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(params["dt_bias"])
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    assert torch.equal(params["o_norm.weight"], torch.ones(32))
    for c in ("q", "k", "v"):
        w = params[f"{c}_conv1d.weight"]
        assert w.abs().max() <= 0.5 and w.std() > 0.2  # U(-0.5, 0.5) has std 0.29
    assert abs(params["q_proj.weight"].std().item() - 0.02) < 0.003
    for n in ("A_log", "dt_bias", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
        assert params[n].tensor_model_parallel and params[n].partition_dim == 0, n
    assert params["A_log"]._no_weight_decay and params["dt_bias"]._no_weight_decay
    assert not getattr(params["o_norm.weight"], "tensor_model_parallel", False)


def test_layer_forward_shape_and_causality(mcore_world):
    layer = _layer()
    s, b = 40, 3
    x = torch.randn(s, b, 128)
    out, bias = layer(x, attention_mask=None, rotary_pos_emb=None)
    assert out.shape == (s, b, 128) and bias is None and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() > 0
    t0 = 23
    x2 = x.clone()
    x2[t0:] = torch.randn_like(x2[t0:])
    out2, _ = layer(x2)
    assert torch.equal(out[:t0], out2[:t0])  # exact: nothing leaks backwards
    assert not torch.allclose(out[t0:], out2[t0:])


def test_layer_chunk_vs_recurrent_fp64(mcore_world):
    """The whole layer in fp64 (built fp32, then .double()): chunk and recurrent cores agree to
    1e-10, including the parameter gradients."""
    layer = _layer(chunk_size=16, impl="chunk").double()
    x = torch.randn(37, 2, 128, dtype=torch.float64, requires_grad=True)
    out_c, _ = layer(x)
    assert out_c.dtype == torch.float64
    out_c.square().sum().backward()
    grads_c = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer.impl = "recurrent"
    out_r, _ = layer(x)
    out_r.square().sum().backward()
    assert _maxdiff(out_c, out_r) <= 1e-10
    for n, p in layer.named_parameters():
        assert _maxdiff(grads_c[n], p.grad) <= 1e-10 * max(1.0, p.grad.abs().max().item()), n


def test_layer_conv_is_causal_depthwise_conv1d(mcore_world):
    """The shift-and-add conv equals nn.Conv1d(groups=channels, padding=w-1) truncated to the
    first s outputs (the HF/causal-conv1d semantics): weight[:, 0, -1] multiplies x_t."""
    layer = _layer()
    conv = layer.q_conv1d
    x = torch.randn(11, 3, 64)  # [s, b, channels]
    ref = F.conv1d(x.permute(1, 2, 0), conv.weight, padding=3, groups=64)[..., :11].permute(2, 0, 1)
    assert _maxdiff(conv(x), ref) <= 1e-6


def test_layer_rejects_bad_config_and_unsupported_inputs(mcore_world):
    with pytest.raises(ValueError, match="linear_value_head_dim == linear_key_head_dim"):
        _layer(linear_value_head_dim=64)
    with pytest.raises(ValueError, match="no grouped-value heads"):
        _layer(linear_num_value_heads=4)
    with pytest.raises(ValueError, match="unknown KDA impl 'fast'"):
        _layer(impl="fast")
    layer = _layer()
    x = torch.randn(8, 1, 128)
    with pytest.raises(NotImplementedError, match="packed"):
        layer(x, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="inference"):
        layer(x, inference_context=object())


def test_layer_builds_on_meta(mcore_world):
    from attnres_train.model.kda.layer import kda_param_count

    with torch.device("meta"):
        layer = _layer(perform_initialization=False, use_cpu_initialization=True)
    params = list(layer.parameters())
    assert params and all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == kda_param_count(128, 2, 32, 4)
    # reset_parameters is data-independent, so it also runs on meta
    layer.reset_parameters()
    assert all(p.is_meta for p in layer.parameters())


def test_layer_built_by_transformer_layer(mcore_world):
    """As megatron's TransformerLayer builds it: build_module with layer_number, pg_collection
    and extra kwargs (attn_mask_type)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from attnres_train.model.kda.layer import KimiDeltaAttention

    spec = ModuleSpec(module=KimiDeltaAttention, params={"chunk_size": 32, "impl": "auto",
                                                        "attn_mask_type": AttnMaskType.causal})
    pg = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
    layer = build_module(spec, config=_config(), layer_number=3, pg_collection=pg)
    assert layer.layer_number == 3 and layer.chunk_size == 32 and layer.tp_group is pg.tp
    out, _ = layer(torch.randn(9, 2, 128))
    assert out.shape == (9, 2, 128)


class _FakeTP:
    """A 2-way tensor-parallel group seen from rank 1 (for checkpoint-metadata checks only)."""

    def size(self):
        return 2

    def rank(self):
        return 1


def test_sharded_state_dict_axes(mcore_world):
    """Raw TP-sharded params (A_log, dt_bias, conv weights) shard along axis 0; o_norm is
    replicated; the linears keep megatron's own axes."""
    layer = _layer()
    sd = layer.sharded_state_dict(prefix="kda.", tp_group=_FakeTP())
    for name, local in (("A_log", 2), ("dt_bias", 64), ("q_conv1d.weight", 64),
                        ("k_conv1d.weight", 64), ("v_conv1d.weight", 64)):
        st = sd[f"kda.{name}"]
        assert st.global_shape[0] == 2 * local and st.global_offset[0] == local, name
        assert st.axis_fragmentations[0] == 2, name
    on = sd["kda.o_norm.weight"]
    assert on.global_shape == (32,) and on.axis_fragmentations == (1,)
    assert on.replica_id[1] == 1  # a TP replica, not a shard
    assert set(k for k in sd if not k.endswith("_extra_state")) == {f"kda.{n}" for n in HF_SHAPES}


# ------------------------------------------------------------------- TP=2 vs TP=1

def _tp_layer_run(tp, sequence_parallel=False, rank=0, seed=0):
    """Build the layer at TP size ``tp`` (H=4) and run fwd+bwd on a fixed [40, 2, 128] input
    (this rank's sequence shard of it under sequence parallelism); returns the output, input
    grad, and {name: (param, grad)} of this rank."""
    from attnres_train.model.kda.layer import KimiDeltaAttention

    torch.manual_seed(seed)  # the layer draws every init tensor at full size, then slices
    cfg = _config(linear_num_key_heads=4, linear_num_value_heads=4,
                  tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    layer = KimiDeltaAttention(cfg, layer_number=1, chunk_size=16, impl="chunk")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 2, 128, generator=gen)
    w = torch.randn(40, 2, 128, generator=gen)
    if sequence_parallel:
        n = 40 // tp
        x, w = x[rank * n : (rank + 1) * n], w[rank * n : (rank + 1) * n]
    x.requires_grad_()
    y, _ = layer(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: (p.detach(), p.grad) for n, p in layer.named_parameters()}


def _tp2_worker(rank, port, out_dir):
    import os

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from attnres_train import cpu_compat

    cpu_compat.apply()
    torch.set_num_threads(1)  # two ranks on a 2-core box
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(2, 1)
    for sp in (False, True):
        torch.save(_tp_layer_run(2, sp, rank), f"{out_dir}/sp{int(sp)}_rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_matches_tp1(mcore_world, tmp_path):
    """Two gloo ranks at TP=2, without and with sequence parallelism, reproduce TP=1: same
    init shards, same output, and every grad equals the TP=1 grad's shard -- including the
    replicated o_norm weight, whose grad is only complete because of the TP all-reduce in its
    forward (without it the error is ~1.6)."""
    import torch.multiprocessing as mp

    from parallel.groups import free_port

    y1, dx1, p1 = _tp_layer_run(1)
    mp.spawn(_tp2_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for sp in (0, 1):
        r = [torch.load(tmp_path / f"sp{sp}_rank{i}.pt") for i in range(2)]
        if sp:  # outputs / input grads are sequence shards
            y2, dx2 = torch.cat([ri[0] for ri in r]), torch.cat([ri[1] for ri in r])
        else:
            assert torch.equal(r[0][0], r[1][0])
            y2, dx2 = r[0][0], r[0][1]
        assert _maxdiff(y1, y2) <= 1e-6, sp
        assert _maxdiff(dx1, dx2) <= 1e-5, sp
        for name, (w1, g1) in p1.items():
            tol = 1e-5 * max(1.0, g1.abs().max().item())
            if name == "o_norm.weight":  # replicated
                assert all(torch.equal(w1, ri[2][name][0]) for ri in r), name
                assert all(_maxdiff(g1, ri[2][name][1]) <= tol for ri in r), (sp, name)
                continue
            axis = 1 if name == "o_proj.weight" else 0  # RowParallel shards the input dim
            w2 = torch.cat([ri[2][name][0] for ri in r], dim=axis)
            g2 = torch.cat([ri[2][name][1] for ri in r], dim=axis)
            assert torch.equal(w1, w2), name
            assert _maxdiff(g1, g2) <= tol, (sp, name, _maxdiff(g1, g2))

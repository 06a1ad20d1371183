"""Backend selection (attnres_train.model.backend) and the two layer builds (model/specs.py).

CPU: the selection rules with CUDA / transformer-engine / fla / triton availability monkeypatched,
the local build's modules (unchanged), the TE spec's module choices (spec only: TE is not installed
here), MLA keeping a replicated key/value down projection it is handed (the TELinear case).
GPU (`gpu` marker; skipped without CUDA, TE or fla): the TE build against the local build from
the same weights (fp32 and bf16, forward + backward), fla's KDA against the torch chunked form
inside the KDA layer (fp32 and bf16, forward + backward).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnres_train.config import Config, ConfigError
from attnres_train.model import attnres as attnres_pkg
from attnres_train.model import backend as backend_mod
from attnres_train.model.backend import LINEAR_ENV, record_backend, select_backend, select_linear
from tests.helpers import tiny_model_cfg, tokens

KERNEL_ENV = "ATTNRES_KERNEL"


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(LINEAR_ENV, raising=False)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    # select_backend sets the process's kernel preference (model.attnres.kernel): restored after
    monkeypatch.setattr(attnres_pkg, "_preferred_kernel", attnres_pkg._preferred_kernel)
    return monkeypatch


@pytest.fixture
def no_cuda(clean_env):
    clean_env.setattr(backend_mod, "cuda_available", lambda: False)
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    return clean_env


@pytest.fixture
def fake_gpu(clean_env):
    """CUDA, transformer-engine 2.8.0, fla and triton all "available" (selection only)."""
    from attnres_train.model import attnres as attnres_pkg
    from attnres_train.model.kda import fla as fla_mod

    clean_env.setattr(backend_mod, "cuda_available", lambda: True)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(backend_mod, "te_version", lambda: "2.8.0")
    clean_env.setattr(fla_mod, "_fla_importable", lambda: True)
    clean_env.setattr(attnres_pkg, "triton_available", lambda: True)
    clean_env.setattr(attnres_pkg, "triton_self_check", lambda device_type="cuda": None)
    return clean_env


def _cfg(**overrides):
    return tiny_model_cfg(**overrides)


# ------------------------------------------------------------------------------------ selection

def test_cpu_selects_local_chunk_torch(no_cuda):
    b = select_backend(_cfg())
    assert (b.linear, b.kda, b.attnres_kernel, b.device) == ("local", "chunk", "torch", "cpu")
    assert b.te_version is None
    assert b.describe() == ("backend: linear=local (no CUDA), kda=chunk (auto: no CUDA), "
                            "attnres=torch (auto: no CUDA)")


def test_gpu_auto_selects_te_fla_triton(fake_gpu):
    b = select_backend(_cfg(**{"kda.chunk_size": 64}))
    assert (b.linear, b.kda, b.attnres_kernel, b.device) == ("te", "fla", "triton", "cuda")
    assert b.describe() == ("backend: linear=te (transformer-engine 2.8.0), kda=fla (auto: CUDA and "
                            "fla.ops.kda), attnres=triton (auto: CUDA and triton)")


def test_gpu_triton_failing_its_self_check_is_reported(fake_gpu):
    from attnres_train.model import attnres as attnres_pkg

    fake_gpu.setattr(attnres_pkg, "triton_self_check", lambda device_type="cuda": "RuntimeError: no PTX")
    b = select_backend(_cfg())
    assert b.attnres_kernel == "torch"
    assert b.attnres_reason == "auto: Triton kernels failed their self-check (RuntimeError: no PTX)"


def test_gpu_kda_chunk_size_fla_cannot_run(fake_gpu):
    b = select_backend(_cfg())  # tiny: chunk_size 16
    assert b.kda == "chunk" and "chunk_size 32 or 64, got 16" in b.kda_reason


def test_gpu_without_te_or_fla_or_triton(fake_gpu):
    from attnres_train.model import attnres as attnres_pkg
    from attnres_train.model.kda import fla as fla_mod

    fake_gpu.setattr(backend_mod, "te_version", lambda: None)
    fake_gpu.setattr(fla_mod, "_fla_importable", lambda: False)
    fake_gpu.setattr(attnres_pkg, "triton_available", lambda: False)
    b = select_backend(_cfg(**{"kda.chunk_size": 64}))
    assert (b.linear, b.linear_reason) == ("local", "transformer-engine not importable")
    assert (b.kda, b.kda_reason) == ("chunk", "auto: fla.ops.kda not importable")
    assert (b.attnres_kernel, b.attnres_reason) == ("torch", "auto: triton not installed")


def test_linear_env_overrides(fake_gpu):
    fake_gpu.setenv(LINEAR_ENV, "local")
    assert select_linear() == ("local", f"{LINEAR_ENV}=local")
    fake_gpu.setenv(LINEAR_ENV, "TE")
    assert select_linear() == ("te", f"{LINEAR_ENV}=te")
    fake_gpu.setenv(LINEAR_ENV, "auto")
    assert select_linear()[0] == "te"
    fake_gpu.setenv(LINEAR_ENV, "apex")
    with pytest.raises(ConfigError, match="^ATTNRES_LINEAR='apex': use one of auto, te, local$"):
        select_linear()


def test_linear_config_key_and_env_precedence(fake_gpu):
    """model.linear chooses; ATTNRES_LINEAR, when set, wins over it; auto decides from the machine."""
    b = select_backend(_cfg(linear="local"))
    assert (b.linear, b.linear_reason) == ("local", "model.linear=local")
    assert select_linear("te") == ("te", "model.linear=te")
    fake_gpu.setenv(LINEAR_ENV, "te")
    assert select_backend(_cfg(linear="local")).linear == "te"
    fake_gpu.setenv(LINEAR_ENV, "auto")
    assert select_linear("local") == ("te", "auto: CUDA and transformer-engine")
    fake_gpu.delenv(LINEAR_ENV)
    fake_gpu.setattr(backend_mod, "te_version", lambda: None)
    with pytest.raises(RuntimeError, match="model.linear=te but transformer-engine is not importable"):
        select_backend(_cfg(linear="te"))


def test_linear_te_without_te_is_a_clear_error(fake_gpu):
    fake_gpu.setattr(backend_mod, "te_version", lambda: None)
    fake_gpu.setenv(LINEAR_ENV, "te")
    with pytest.raises(RuntimeError, match="ATTNRES_LINEAR=te but transformer-engine is not importable"):
        select_backend(_cfg())


def test_linear_te_without_cuda_is_a_clear_error(no_cuda):
    no_cuda.setenv(LINEAR_ENV, "te")
    with pytest.raises(RuntimeError, match="ATTNRES_LINEAR=te needs CUDA"):
        select_backend(_cfg())


def test_te_version_probe_without_te():
    """On this CPU machine megatron's HAVE_TE is False: the probe says so, it does not raise."""
    from megatron.core.extensions import transformer_engine as te_ext

    if not te_ext.HAVE_TE:
        assert backend_mod.te_version() is None


def test_kda_explicit_impls(no_cuda):
    b = select_backend(_cfg(**{"kda.impl": "recurrent"}))
    assert (b.kda, b.kda_reason) == ("recurrent", "model.kda.impl=recurrent")
    with pytest.raises(RuntimeError, match="impl='fla' needs CUDA"):
        select_backend(_cfg(**{"kda.impl": "fla"}))
    b = select_backend(_cfg(layer_pattern="MMMM"))
    assert (b.kda, b.kda_reason) == ("none", "no KDA layers")


def test_kda_selection_is_the_layers_rule(fake_gpu):
    """backend reports exactly what kda.resolve_impl (the layer's run-time dispatch) picks."""
    from attnres_train.model.kda import resolve_impl

    for impl in ("auto", "chunk", "recurrent", "fla"):
        for chunk in (16, 32, 64):
            b = select_backend(_cfg(**{"kda.impl": impl, "kda.chunk_size": chunk}))
            assert b.kda == resolve_impl(impl, torch.device("cuda"), chunk)


def test_attnres_kernel_reporting(fake_gpu):
    assert select_backend(_cfg(residual="standard")).attnres_kernel == "none"
    assert select_backend(_cfg(**{"attnres.impl": "naive"})).attnres_kernel == "naive"
    fake_gpu.setenv(KERNEL_ENV, "torch")
    b = select_backend(_cfg())
    assert (b.attnres_kernel, b.attnres_reason) == ("torch", "ATTNRES_KERNEL=torch")


def test_attnres_kernel_config_key_and_env_precedence(fake_gpu):
    """model.attnres.kernel becomes the dispatcher's choice at start-up (select_backend), so the
    kernels deep inside the model follow it; ATTNRES_KERNEL, when set, wins over it."""
    b = select_backend(_cfg(**{"attnres.kernel": "torch"}))
    assert (b.attnres_kernel, b.attnres_reason) == ("torch", "model.attnres.kernel=torch")
    assert attnres_pkg.kernel_backend("cuda") == "torch" and attnres_pkg.phase1_fn("cuda") is attnres_pkg.attnres_phase1
    fake_gpu.setenv(KERNEL_ENV, "triton")
    b = select_backend(_cfg(**{"attnres.kernel": "torch"}))
    assert (b.attnres_kernel, b.attnres_reason) == ("triton", "ATTNRES_KERNEL=triton")
    fake_gpu.setenv(KERNEL_ENV, "bogus")
    with pytest.raises(ConfigError, match="^ATTNRES_KERNEL='bogus': use one of auto, torch, triton$"):
        attnres_pkg.kernel_backend("cuda")
    fake_gpu.delenv(KERNEL_ENV)
    assert select_backend(_cfg()).attnres_kernel == "triton"  # auto again
    assert attnres_pkg.kernel_backend("cpu") == "torch"


def test_record_backend_saves_what_ran(fake_gpu):
    """record_backend replaces each backend choice by the resolved one (config.yaml then says what
    ran) and leaves the given config alone; as_dict is plain strings for summary.json."""
    import json

    from omegaconf import OmegaConf

    cfg = Config(model=_cfg(**{"kda.chunk_size": 64}))
    b = select_backend(cfg.model)
    recorded = record_backend(cfg, b)
    assert (recorded.model.linear, recorded.model.attnres.kernel, recorded.model.kda.impl) == ("te", "triton", "fla")
    assert (cfg.model.linear, cfg.model.attnres.kernel, cfg.model.kda.impl) == ("auto", "auto", "auto")
    text = OmegaConf.to_yaml(OmegaConf.structured(recorded))
    assert "  linear: te\n" in text and "    kernel: triton\n" in text and "    impl: fla\n" in text
    assert json.loads(json.dumps(b.as_dict())) == {
        "linear": "te", "linear_reason": "auto: CUDA and transformer-engine", "kda": "fla",
        "kda_reason": "auto: CUDA and fla.ops.kda", "attnres_kernel": "triton",
        "attnres_reason": "auto: CUDA and triton", "device": "cuda", "te_version": "2.8.0"}
    # no kernel runs (standard residual) and no KDA layers: those keys stay as configured
    cfg = Config(model=_cfg(residual="standard", layer_pattern="MMMM"))
    recorded = record_backend(cfg, select_backend(cfg.model))
    assert (recorded.model.attnres.kernel, recorded.model.kda.impl) == ("auto", "auto")


def test_attnres_triton_without_cuda_is_an_error(no_cuda):
    no_cuda.setenv(KERNEL_ENV, "triton")
    no_cuda.delenv("TRITON_INTERPRET", raising=False)
    from attnres_train.model import attnres as attnres_pkg

    no_cuda.setattr(attnres_pkg, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        select_backend(_cfg())


# ------------------------------------------------------------------------------- the two builds

def _expected_local_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from attnres_train.model.kda.layer import KimiDeltaAttention
    from attnres_train.model.mla import DuplicatedLinear, MLACoreAttention, NoPEMLASelfAttention
    from attnres_train.model.norm import RMSNorm

    norms = {"input_layernorm": RMSNorm, "pre_mlp_layernorm": RMSNorm}
    moe = {"mlp": MoELayer, "mlp.experts": SequentialMLP,
           "mlp.experts.local_experts.0.linear_fc1": ColumnParallelLinear,
           "mlp.experts.local_experts.0.linear_fc2": RowParallelLinear,
           "mlp.shared_experts": SharedExpertMLP, "mlp.shared_experts.linear_fc1": ColumnParallelLinear,
           "mlp.shared_experts.linear_fc2": RowParallelLinear}
    kda = {"self_attention": KimiDeltaAttention, "self_attention.q_proj": ColumnParallelLinear,
           "self_attention.o_proj": RowParallelLinear}
    return {
        0: {**norms, **kda, "mlp": MLP, "mlp.linear_fc1": ColumnParallelLinear,
            "mlp.linear_fc2": RowParallelLinear},
        1: {**norms, **kda, **moe},
        3: {**norms, **moe, "self_attention": NoPEMLASelfAttention,
            "self_attention.linear_q_proj": ColumnParallelLinear,
            "self_attention.linear_kv_down_proj": DuplicatedLinear,
            "self_attention.linear_kv_up_proj": ColumnParallelLinear,
            "self_attention.kv_layernorm": KV_NORM,  # RMSNorm at Kimi's fixed latent-norm eps
            "self_attention.core_attention": MLACoreAttention,
            "self_attention.linear_proj": RowParallelLinear},
    }


KV_NORM = "kv latent norm"


def _assert_local_build(model):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from attnres_train.model.norm import KV_LATENT_NORM_EPS, RMSNorm

    for i, expected in _expected_local_classes().items():
        modules = dict(model.decoder.layers[i].named_modules())
        for name, cls in expected.items():
            if cls is KV_NORM:
                assert type(modules[name]).__mro__[1] is RMSNorm and modules[name].eps == KV_LATENT_NORM_EPS
                continue
            assert type(modules[name]) is cls, (i, name, type(modules[name]))
        experts = [m for n, m in modules.items() if n.startswith("mlp.experts.local_experts.")
                   and n.count(".") == 3]
        assert len(experts) == (16 if "mlp.experts" in expected else 0)
        assert all(type(m.linear_fc1) is ColumnParallelLinear and type(m.linear_fc2) is RowParallelLinear
                   for m in experts)
    assert type(model.decoder.final_layernorm) is RMSNorm


def test_local_build_unchanged(mcore_world, clean_env):
    """The local build, module by module (what it was before the TE build existed); model.linear=local
    builds the same as ATTNRES_LINEAR=local, and on a machine without CUDA it is the default, bit
    for bit."""
    from attnres_train.model.model import build_model

    def same(x, y):
        a, b = x.state_dict(), y.state_dict()
        return list(a) == list(b) and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    cfg = _cfg()
    clean_env.setenv(LINEAR_ENV, "local")
    torch.manual_seed(0)
    local = build_model(cfg)
    _assert_local_build(local)
    clean_env.delenv(LINEAR_ENV)
    torch.manual_seed(0)
    assert same(build_model(_cfg(linear="local")), local)
    if not torch.cuda.is_available():
        torch.manual_seed(0)
        assert same(build_model(cfg), local)


def test_meta_build_is_local(mcore_world, clean_env):
    """Dry-run planning builds on the meta device with the local spec whatever ATTNRES_LINEAR says
    (TE would allocate on the CPU there); parameter names and counts are those of either build."""
    from attnres_train.model.model import build_model

    clean_env.setenv(LINEAR_ENV, "bogus")  # raises if consulted
    model = build_model(_cfg(linear="te"), meta=True)
    _assert_local_build(model)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_te_spec_modules(no_cuda):
    """The TE spec (spec objects only; TE is not installed here): TE linears and TENorm, norms
    apart from the linears, MLA down projections TELinear (duplicated), TE core attention,
    SequentialMLP experts of TE linears."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from attnres_train.model.mla import NoPEMLASelfAttention
    from attnres_train.model.specs import _te_provider, block_spec, layer_spec

    cfg = _cfg()
    col, row = te.TEColumnParallelLinear, te.TERowParallelLinear
    for i in range(cfg.num_layers):
        sm = layer_spec(cfg, i, "te").submodules
        assert sm.input_layernorm is te.TENorm and sm.pre_mlp_layernorm is te.TENorm
        if i < cfg.moe.first_k_dense:
            assert sm.mlp.module is MLP
            assert (sm.mlp.submodules.linear_fc1, sm.mlp.submodules.linear_fc2) == (col, row)
        else:
            assert sm.mlp.module is MoELayer
            experts, shared = sm.mlp.submodules.experts, sm.mlp.submodules.shared_experts
            assert experts.module is SequentialMLP and shared.module is SharedExpertMLP
            for sub in (experts.submodules, shared.submodules):
                assert (sub.linear_fc1, sub.linear_fc2) == (col, row)
        if cfg.layer_pattern[i] == "M":
            att = sm.self_attention
            assert att.module is NoPEMLASelfAttention
            a = att.submodules
            assert a.linear_kv_down_proj is te.TELinear and a.linear_q_down_proj is te.TELinear
            assert (a.linear_q_proj, a.linear_q_up_proj, a.linear_kv_up_proj) == (col, col, col)
            assert a.linear_proj is row and a.core_attention is te.TEDotProductAttention
            # kv_layernorm: TENorm at Kimi's fixed latent-norm eps (model/norm.py: with_fixed_eps)
            assert issubclass(a.kv_layernorm, te.TENorm) and a.q_layernorm is te.TENorm
    assert block_spec(cfg, range(cfg.num_layers), "te").layer_norm is te.TENorm
    with pytest.raises(ValueError, match="grouped-GEMM"):
        _te_provider().grouped_mlp_modules(True, False)
    with pytest.raises(ValueError, match="linear backend 'apex'"):
        layer_spec(cfg, 0, "apex")


def test_mla_keeps_a_replicated_kv_down_projection(mcore_world):
    """NoPEMLASelfAttention swaps only a column-parallel kv down projection for DuplicatedLinear;
    a replicated one it is handed (TELinear under TE; here megatron's plain replicated Linear,
    which MLA also accepts) stays, and gives the same output from the same weights."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer.enums import AttnMaskType

    from attnres_train.model.mla import DuplicatedLinear, NoPEMLASelfAttention
    from attnres_train.model.model import transformer_config
    from attnres_train.model.specs import _LocalProvider, _mla_spec

    cfg = _cfg()
    config = transformer_config(cfg)
    spec = _mla_spec(_LocalProvider(), "local")
    torch.manual_seed(0)
    ref = NoPEMLASelfAttention(config, spec.submodules, layer_number=4, attn_mask_type=AttnMaskType.causal)
    assert type(ref.linear_kv_down_proj) is DuplicatedLinear
    spec.submodules.linear_kv_down_proj = Linear
    other = NoPEMLASelfAttention(config, spec.submodules, layer_number=4, attn_mask_type=AttnMaskType.causal)
    assert type(other.linear_kv_down_proj) is Linear
    other.load_state_dict(ref.state_dict(), strict=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # megatron's causal mask follows CUDA
    ref, other = ref.to(dev), other.to(dev)
    x = torch.randn(cfg.seq_length, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dev)
    out_ref, out = ref(x, None)[0], other(x, None)[0]
    assert torch.allclose(out, out_ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ GPU

def _have_te() -> bool:
    return torch.cuda.is_available() and backend_mod.te_version() is not None


def _have_fla() -> bool:
    from attnres_train.model.kda import fla_available

    return fla_available()


@contextlib.contextmanager
def _fp32_matmuls():
    """torch's fp32 matmuls without TF32 (the reference). TE's own fp32 GEMMs use TF32 regardless
    (transformer_engine/common/gemm/cublaslt_gemm.cu: CUBLAS_COMPUTE_32F_FAST_TF32 for pure fp32),
    hence the TF32-class tolerances below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fwd_bwd(model, ids, labels):
    """(loss, logits [B, S, V], {name: grad}) of a cross-entropy step."""
    model.zero_grad(set_to_none=True)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    logits = model(ids, pos, None)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach().float(), grads


def _check_grads(grads, ref, total_tol: float, param_tol: float | None):
    """All gradients together within total_tol (relative L2); each parameter's within param_tol
    (None: not checked one by one)."""
    assert set(grads) == set(ref)
    total = _rel(torch.cat([grads[n].flatten() for n in ref]), torch.cat([g.flatten() for g in ref.values()]))
    assert total <= total_tol, f"all grads: rel L2 {total:.2e} > {total_tol}"
    if param_tol is None:
        return
    scale = max(g.norm().item() for g in ref.values())
    for name, g in ref.items():
        err = (grads[name].double() - g.double()).norm().item()
        assert err <= param_tol * g.norm().item() + 1e-4 * param_tol * scale, (
            f"{name}: |d grad| {err:.3e}, |grad| {g.norm().item():.3e}")


def _te_and_local(monkeypatch, cfg, te_dtype):
    """The local fp32 model and the TE model (te_dtype) holding the same weights, both on CUDA.
    AttnRes pseudo-queries are randomised so the depth mix is not uniform; with te_dtype bf16 the
    local reference holds the bf16-rounded weights."""
    from attnres_train.model.model import build_model

    monkeypatch.setenv(LINEAR_ENV, "local")
    torch.manual_seed(0)
    local = build_model(cfg)
    monkeypatch.setenv(LINEAR_ENV, "te")
    te = build_model(cfg, params_dtype=te_dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in local.named_parameters():
            if name.endswith(".query"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(te_dtype).float())
    missing, unexpected = te.load_state_dict(local.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert missing and all(k.endswith("._extra_state") for k in missing), missing
    assert [n for n, _ in te.named_parameters()] == [n for n, _ in local.named_parameters()]
    return local.cuda(), te.cuda()


def _compare_te_to_local(cfg, local, te, *, te_fp32: bool, logits_tol: float, loss_tol: float):
    """Forward + backward of both builds on the same tokens; asserts finite logits within
    logits_tol (relative L2) and the loss within loss_tol (relative). The local reference runs
    with fp32 matmuls (no TF32), the TE build too if te_fp32. Returns (grads, reference grads)."""
    ids = tokens(cfg, batch=2).cuda()
    labels = tokens(cfg, batch=2, seed=1).cuda()
    with _fp32_matmuls():
        loss_ref, logits_ref, grads_ref = _fwd_bwd(local, ids, labels)
        if te_fp32:
            loss, logits, grads = _fwd_bwd(te, ids, labels)
    if not te_fp32:
        loss, logits, grads = _fwd_bwd(te, ids, labels)
    assert torch.isfinite(logits).all()
    assert _rel(logits, logits_ref) <= logits_tol
    assert abs(loss.item() - loss_ref.item()) <= loss_tol * abs(loss_ref.item())
    return grads, grads_ref


# top_k = num_experts: no discrete routing decision that TF32-sized noise could flip (a flipped
# expert choice changes a token's output by O(1)); KDA through the torch chunked form in both.
_GPU_CFG = {"kda.impl": "chunk", "moe.num_experts": 4, "moe.top_k": 4}


@pytest.mark.gpu
@pytest.mark.skipif(not _have_te(), reason="needs CUDA and transformer-engine")
@pytest.mark.parametrize("residual", ["block", "standard"])
def test_te_build_matches_local_fp32(mcore_world, monkeypatch, residual):
    """fp32, forward + backward: TE build vs local build from the same weights.

    Tolerances (TF32-class, since TE's fp32 GEMMs run TF32 with a 2^-11 unit roundoff, and the
    local reference runs without TF32): logits rel L2 <= 1e-2, loss rel <= 1e-3, all grads rel L2
    <= 2e-2, each parameter's grad rel L2 <= 5e-2. A wiring error (wrong norm, missing kv norm,
    transposed or swapped weight) is O(1)."""
    from megatron.core.extensions import transformer_engine as te_ext

    from attnres_train.model.mla import DuplicatedLinear

    cfg = _cfg(residual=residual, **_GPU_CFG)
    local, te = _te_and_local(monkeypatch, cfg, torch.float32)
    mla = te.decoder.layers[cfg.layer_pattern.index("M")].self_attention
    assert isinstance(mla.linear_kv_down_proj, te_ext.TELinear)
    assert not isinstance(mla.linear_kv_down_proj, DuplicatedLinear)
    assert isinstance(mla.linear_q_proj, te_ext.TEColumnParallelLinear)
    assert isinstance(mla.core_attention, te_ext.TEDotProductAttention)
    grads, grads_ref = _compare_te_to_local(cfg, local, te, te_fp32=True, logits_tol=1e-2,
                                            loss_tol=1e-3)
    _check_grads(grads, grads_ref, total_tol=2e-2, param_tol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _have_te(), reason="needs CUDA and transformer-engine")
def test_te_build_bf16_matches_fp32_reference(mcore_world, monkeypatch):
    """bf16 TE build (TE's fused/flash attention and bf16 GEMMs: the training path) vs the local
    fp32 model holding the same bf16-rounded weights. Tolerances are bf16-class (unit roundoff
    2^-8): logits rel L2 <= 5e-2, loss rel <= 1e-2, all grads rel L2 <= 1e-1."""
    cfg = _cfg(**_GPU_CFG)
    local, te = _te_and_local(monkeypatch, cfg, torch.bfloat16)
    grads, grads_ref = _compare_te_to_local(cfg, local, te, te_fp32=False, logits_tol=5e-2,
                                            loss_tol=1e-2)
    _check_grads(grads, grads_ref, total_tol=1e-1, param_tol=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_selection_follows_installed_packages(clean_env):
    """On a CUDA machine the automatic choice is TE / fla / triton exactly where installed."""
    from attnres_train.model.attnres import triton_available

    b = select_backend(_cfg(**{"kda.chunk_size": 64}))
    assert b.device == "cuda"
    assert b.linear == ("te" if backend_mod.te_version() is not None else "local")
    assert b.kda == ("fla" if _have_fla() else "chunk")
    assert b.attnres_kernel == ("triton" if triton_available() else "torch")
    print(b.describe())


@pytest.mark.gpu
@pytest.mark.skipif(not _have_fla(), reason="needs CUDA and fla")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kda_layer_fla_matches_chunk(mcore_world, dtype):
    """The KDA layer with fla's chunk_kda vs the torch chunked form (chunk 64), same weights and
    input, on CUDA: output and the grads of the input and every parameter.

    The layer runs the KDA core in fp32 in both dtypes (bf16 only in the projections), so the
    kernels differ by fla's TF32-class dots: fp32 tolerances rel L2 output <= 3e-3, grads <= 3e-2;
    bf16 (the output is rounded to bf16 before o_proj) output <= 2e-2, grads <= 5e-2. A wrong
    adapter (scale, layout, gate or beta convention) is O(1)."""
    from megatron.core.transformer import TransformerConfig

    from attnres_train.model.kda.layer import KimiDeltaAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=128, num_attention_heads=2, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_conv_kernel_dim=4, use_cpu_initialization=True, add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=1e-5, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    layer = KimiDeltaAttention(config, layer_number=1, chunk_size=64, impl="chunk").cuda()
    x = torch.randn(200, 2, 128, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()

    def run(impl):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        cot = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(2),
                          device="cuda").to(dtype)
        (out.float() * cot.float()).sum().backward()
        return out.detach().float(), {"x": xi.grad.float(), **{
            n: p.grad.float() for n, p in layer.named_parameters()}}

    with _fp32_matmuls():
        out_ref, grads_ref = run("chunk")
        out, grads = run("fla")
    out_tol, grad_tol = (3e-3, 3e-2) if dtype == torch.float32 else (2e-2, 5e-2)
    assert _rel(out, out_ref) <= out_tol
    for name, g in grads_ref.items():
        assert _rel(grads[name], g) <= grad_tol, name

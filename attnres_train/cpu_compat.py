"""megatron-core 0.16.1 on a machine without CUDA: the patches, in one place.

`apply()` is called once, before any model is built, and only when `torch.cuda.is_available()`
is False. Each patch names the megatron function it replaces; docs/cpu_compat.md says why each
is needed. Nothing here changes numerics: it only moves allocations that
megatron hard-codes to CUDA onto the CPU and removes CUDA-only synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> None:
    """Apply every CPU patch (idempotent). A no-op where CUDA exists."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    _patch_cuda_device_queries()
    _patch_rng()
    _patch_causal_mask()
    _patch_transformer_engine_stand_ins()
    _patch_alltoall_dispatcher()
    _patch_schedules_zeros()
    _patch_optimizer()
    confine_openmp_to_this_thread()
    _APPLIED = True


def _mapped_library(prefix: str) -> str | None:
    """Path of the shared library already loaded into this process whose file name starts with
    ``prefix`` (the very copy torch uses, not another one found on the search path)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


def confine_openmp_to_this_thread() -> bool:
    """Every other thread computes with one OpenMP thread; this (the training) thread keeps its
    ``torch.get_num_threads()``. Returns whether the setting was applied.

    Why: libgomp waits for work by spinning ~300k times, but only ~100 once the threads it
    manages outnumber the CPUs. Each thread that runs a large ATen op keeps an OpenMP team of its
    own for the rest of its life, and gloo's worker threads do: they copy the gathered bytes of an
    all-gather, which every distributed-checkpoint save runs. Once the threads outnumber the CPUs the
    training thread's workers fall asleep between its many short parallel regions, and throughput
    drops from the first checkpoint on, for the rest of the run (docs/cpu_compat.md).

    How: ATen gives a thread that starts computing the process-wide count of
    ``torch.set_num_threads``, which is set to 1 here; this thread's own OpenMP and MKL counts
    (both per-thread settings, which torch itself uses) are then set back with libgomp's and MKL's
    setters. Nothing changes where either library cannot be reached (a torch build without
    libgomp or without MKL's exported setter) or where this thread computes alone anyway.
    Do not call ``torch.set_num_threads`` afterwards: new threads would copy its count again.
    """
    import ctypes

    threads = torch.get_num_threads()
    if threads <= 1:
        return False
    gomp_path, torch_cpu_path = _mapped_library("libgomp"), _mapped_library("libtorch_cpu")
    if gomp_path is None or torch_cpu_path is None:
        return False
    try:
        omp_set_num_threads = ctypes.CDLL(gomp_path).omp_set_num_threads
        # MKL's C entry point (argument by value; the all-caps and lower-case spellings are
        # Fortran-style, by reference), exported by libtorch_cpu, which links MKL statically
        mkl_set_local = ctypes.CDLL(torch_cpu_path).MKL_Set_Num_Threads_Local \
            if torch.backends.mkl.is_available() else None
    except (OSError, AttributeError):
        return False
    torch.ones(1 << 16).sum()  # ATen sets up this thread's count on its first parallel op: now
    torch.set_num_threads(1)
    omp_set_num_threads(ctypes.c_int(threads))
    if mkl_set_local is not None:
        mkl_set_local(ctypes.c_int(threads))
    return True


def _patch_cuda_device_queries() -> None:
    # Many megatron allocations use device=torch.cuda.current_device() (GlobalMemoryBuffer,
    # RotaryEmbedding.inv_freq, TopKRouter buffers, p2p receive buffers), and checkpointing /
    # p2p call torch.cuda.synchronize(). Route both to the CPU.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


class _CPURNGStatesTracker:
    """Replaces tensor_parallel.random.CudaRNGStatesTracker: same interface, CPU generator.

    Megatron forks a named RNG stream around weight init and dropout; its tracker reads the CUDA
    generator. Here each named stream is a saved CPU generator state.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # initialize_rng_tracker() instantiates the module-global name CudaRNGStatesTracker.
    mrandom.CudaRNGStatesTracker = _CPURNGStatesTracker
    # Activation recomputation (CheckpointFunction) saves and restores the "cuda" RNG state via
    # _get_cuda_rng_state/_set_cuda_rng_state -> torch.cuda.random.get_rng_state (raises on CPU).
    # The CPU state is saved and restored separately by the same code, so a dummy is enough.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    # CheckpointWithoutOutput.__init__(fp8=False) sets self.fp8 = (fp8 is not None), i.e. True,
    # and then queries TE's FP8GlobalStateManager (NameError without TE): a 0.16.1 bug.
    cwo = mrandom.CheckpointWithoutOutput
    orig_init = cwo.__init__

    @functools.wraps(orig_init)
    def init(self, fp8=False):
        orig_init(self, fp8)
        self.fp8 = bool(fp8)

    cwo.__init__ = init


def _patch_causal_mask() -> None:
    # fusions/fused_softmax.py calls transformer.utils.get_default_causal_mask, which builds
    # the mask with device="cuda", whenever attention_mask is None.
    from megatron.core.fusions import fused_softmax

    @functools.lru_cache(maxsize=32)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    fused_softmax.get_default_causal_mask = causal_mask


def _patch_transformer_engine_stand_ins() -> None:
    # megatron.core.extensions.transformer_engine imports without TE by substituting MagicMock
    # stand-ins, so `try: import TELinear; HAVE_TE = True` succeeds in modules that then call
    # isinstance(x, TELinear) (MLASelfAttention.__init__ -> TypeError) or te_general_gemm
    # (RouterGatingLinearFunction, moe_utils).
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    multi_latent_attention.HAVE_TE = False
    moe_utils.te_general_gemm = None


def _patch_alltoall_dispatcher() -> None:
    # MoEAlltoAllTokenDispatcher creates a torch.cuda.Stream in __init__ and moves split sizes to
    # host on it in _maybe_dtoh_and_synchronize. On CPU the only needed part is turning the split
    # tensors into numpy arrays (all_to_all_single needs python-int splits).
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    cls.cuda_dtoh_stream = object()

    def dtoh(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    cls._maybe_dtoh_and_synchronize = dtoh


class _TorchOnCPU(types.ModuleType):
    """`torch`, except zeros(device="cuda") allocates on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "cpu")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _patch_schedules_zeros() -> None:
    # pipeline_parallel/schedules.py: every schedule does
    # torch.zeros([], dtype=torch.int, device="cuda") for the token count, even with PP=1.
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCPU()


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Inside megatron's optimizer code only: device="cuda" -> cpu, Tensor.cuda() -> self, and
    Tensor.type() reports "torch.cuda.*Tensor" so type assertions on CUDA params pass.

    megatron/core/optimizer (optimizer.py, clip_grads.py, distrib_optimizer.py) is full of
    device='cuda' literals and `param.type() == 'torch.cuda.FloatTensor'` checks. Enabling this
    mode globally costs about a third of the step time, so it wraps only the optimizer's entry points.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and (isinstance(dev, int) or str(dev).startswith("cuda")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


def _in_cpu_mode(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapper


def _patch_optimizer() -> None:
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import distrib_optimizer, optimizer

    mopt.get_megatron_optimizer = _in_cpu_mode(mopt.get_megatron_optimizer)
    classes = [optimizer.MegatronOptimizer, optimizer.MixedPrecisionOptimizer, optimizer.FP32Optimizer,
               optimizer.Float16OptimizerWithFloat16Params, optimizer.ChainedOptimizer,
               distrib_optimizer.DistributedOptimizer]
    for cls in classes:
        for name in ("__init__", "step", "load_state_dict", "sharded_state_dict"):
            if name in vars(cls):
                setattr(cls, name, _in_cpu_mode(vars(cls)[name]))

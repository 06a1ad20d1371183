"""Which kernels and layer implementations this process uses: one place decides, one line reports.

Three independent choices, each with the reason it was made. Each is a config key; where an
environment variable may override it, the variable wins when set (variable > key > auto).

- ``linear`` (``model.linear``, env ``ATTNRES_LINEAR``): ``"te"`` (transformer-engine's linears,
  norms and core attention, through megatron's ``TESpecProvider``; see
  :mod:`attnres_train.model.specs`) or ``"local"`` (megatron's own ColumnParallelLinear /
  RowParallelLinear, our torch RMSNorm, the local core attention). ``auto``: TE when CUDA is
  available and transformer-engine imports (megatron's ``extensions.transformer_engine.HAVE_TE``),
  else local; ``te`` where TE cannot run is an error, not a silent fallback.
- ``kda`` (``model.kda.impl``): the KDA core (``"fla"``, ``"chunk"``, ``"recurrent"``), decided by
  :func:`attnres_train.model.kda.explain_impl` (the same rule the layer applies to its tensors at
  run time), ``"none"`` without KDA layers.
- ``attnres_kernel`` (``model.attnres.kernel``, env ``ATTNRES_KERNEL``): the two-phase AttnRes
  kernels (``"triton"`` / ``"torch"``), decided by
  :func:`attnres_train.model.attnres.kernel_backend`; ``"none"`` for the standard residual,
  ``"naive"`` for ``model.attnres.impl=naive`` (plain autograd, no kernel).

``select_backend(model_cfg)`` makes all three for the device this process trains on (CUDA when
available); ``Backend.describe()`` is the start-up line, e.g.
``backend: linear=te (transformer-engine 2.8.0), kda=fla, attnres=triton``. ``Backend.as_dict()``
is for summary.json, and :func:`record_backend` writes the resolved choices into the config the
run saves, so both say what ran.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from attnres_train.choices import AttnResImpl, AttnResKernel, KDAImpl, LinearBackend, Residual
from attnres_train.errors import ConfigError
from attnres_train.model import attnres as attnres_ops  # by module: tests patch its availability probes
from attnres_train.model.kda import explain_impl
from attnres_train.model.structure import has_kda

#: environment override of model.linear: ``te``, ``local`` or ``auto``
LINEAR_ENV = "ATTNRES_LINEAR"


@dataclass(frozen=True)
class Backend:
    """The selected implementations and why. ``device`` is where the model runs ("cuda"/"cpu")."""

    linear: str  # "te" | "local"
    linear_reason: str
    kda: str  # "fla" | "chunk" | "recurrent" | "none"
    kda_reason: str
    attnres_kernel: str  # "triton" | "torch" | "naive" | "none"
    attnres_reason: str
    device: str
    te_version: Optional[str] = None

    def describe(self) -> str:
        """One line for the trainer's start-up output."""
        linear = f"te (transformer-engine {self.te_version})" if self.linear == "te" else \
            f"local ({self.linear_reason})"
        return (f"backend: linear={linear}, kda={self.kda} ({self.kda_reason}), "
                f"attnres={self.attnres_kernel} ({self.attnres_reason})")

    def as_dict(self) -> dict[str, Optional[str]]:
        """Every field as a plain string (or None), for summary.json."""
        return {k: None if v is None else str(v) for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------ availability (monkeypatchable)

def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def te_version() -> Optional[str]:
    """transformer-engine's version if megatron's TE extension found it importable, else None.

    megatron.core.extensions.transformer_engine imports ``transformer_engine`` and
    ``transformer_engine.pytorch.fp8`` (so ``transformer_engine.pytorch``) and sets HAVE_TE; without
    TE it substitutes MagicMock stand-ins, so HAVE_TE is the check, not the import succeeding.
    """
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except Exception:  # noqa: BLE001 - a broken TE install fails inside megatron's import too
        return None
    if not te_ext.HAVE_TE:
        return None
    try:
        from megatron.core.utils import get_te_version

        return str(get_te_version())
    except Exception:  # noqa: BLE001
        return "unknown version"


# ----------------------------------------------------------------------------------- selection

def requested_linear(configured: LinearBackend | str = LinearBackend.auto) -> tuple[LinearBackend, str]:
    """``(choice, where it came from)``: ``ATTNRES_LINEAR`` when set (case-insensitive), else
    ``configured`` (model.linear)."""
    env = os.environ.get(LINEAR_ENV, "").strip().lower()
    if not env:
        return LinearBackend.parse(configured, "model.linear"), "model.linear"
    if env not in LinearBackend.values():
        raise ConfigError(LINEAR_ENV, env, f"use one of {', '.join(LinearBackend.values())}")
    return LinearBackend(env), LINEAR_ENV


def select_linear(configured: LinearBackend | str = LinearBackend.auto) -> tuple[str, str]:
    """``(linear, reason)``: "te" or "local", from :func:`requested_linear` and what the machine
    has. Raises ConfigError for an unknown override, RuntimeError for ``te`` where TE cannot run."""
    choice, source = requested_linear(configured)
    if choice == LinearBackend.local:
        return "local", f"{source}=local"
    cuda, version = cuda_available(), te_version()
    if choice == LinearBackend.te:
        if not cuda:
            raise RuntimeError(f"{source}=te needs CUDA (torch.cuda.is_available() is False): "
                               f"use {source}=local or auto")
        if version is None:
            raise RuntimeError(f"{source}=te but transformer-engine is not importable "
                               "(pip install 'transformer-engine[pytorch]', or the gpu extra): "
                               f"use {source}=local or auto")
        return "te", f"{source}=te"
    if not cuda:
        return "local", "no CUDA"
    if version is None:
        return "local", "transformer-engine not importable"
    return "te", "auto: CUDA and transformer-engine"


def select_backend(model_cfg, device: Optional[str] = None) -> Backend:
    """The backend for ``model_cfg`` on ``device`` (default: "cuda" if available, else "cpu").

    Also makes model.attnres.kernel this process's kernel preference
    (:func:`attnres_train.model.attnres.set_kernel_preference`): the AttnRes kernels are picked
    at every call deep inside the model, so call this once at start-up, before the first step.

    Errors surface here, at start-up, rather than at the first forward: an unknown or unusable
    linear backend, ``model.kda.impl=fla`` without fla, the triton kernel without CUDA.
    """
    attnres_ops.set_kernel_preference(model_cfg.attnres.kernel)
    dev = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    linear, linear_reason = select_linear(model_cfg.linear)
    if has_kda(model_cfg):
        kda, kda_reason = explain_impl(model_cfg.kda.impl, dev, model_cfg.kda.chunk_size)
    else:
        kda, kda_reason = "none", "no KDA layers"
    attnres, attnres_reason = _attnres_kernel(model_cfg, dev)
    return Backend(linear=linear, linear_reason=linear_reason, kda=str(kda), kda_reason=kda_reason,
                   attnres_kernel=str(attnres), attnres_reason=attnres_reason, device=dev.type,
                   te_version=te_version() if linear == "te" else None)


def _attnres_kernel(model_cfg, device: torch.device) -> tuple[str, str]:
    """Reports the AttnRes dispatcher's choice (attnres.kernel_backend); decides nothing itself."""
    if model_cfg.residual == Residual.standard:
        return "none", "standard residual"
    if model_cfg.attnres.impl == AttnResImpl.naive:
        return "naive", "model.attnres.impl=naive"
    kernel = attnres_ops.kernel_backend(device)
    choice, source = attnres_ops.requested_kernel()
    if choice != AttnResKernel.auto:
        return kernel, f"{source}={choice}"
    if kernel == AttnResKernel.triton:
        return kernel, "auto: CUDA and triton"
    if device.type != "cuda":
        return kernel, "auto: no CUDA"
    if not attnres_ops.triton_available():
        return kernel, "auto: triton not installed"
    return kernel, f"auto: Triton kernels failed their self-check ({attnres_ops.triton_self_check(device.type)})"


def record_backend(cfg, backend: Backend):
    """A copy of ``cfg`` (the whole Config) with the backend choices replaced by what ``backend``
    resolved them to, so the config a run saves says what ran: model.linear, model.attnres.kernel
    (where a kernel runs) and model.kda.impl (where there are KDA layers). An environment
    override shows the same way: the saved value is the one that ran."""
    cfg = copy.deepcopy(cfg)
    cfg.model.linear = LinearBackend(backend.linear)
    if backend.attnres_kernel in AttnResKernel.values():
        cfg.model.attnres.kernel = AttnResKernel(backend.attnres_kernel)
    if backend.kda in KDAImpl.values():
        cfg.model.kda.impl = KDAImpl(backend.kda)
    return cfg


def linear_for_build(configured: LinearBackend | str = LinearBackend.auto) -> str:
    """The linear backend the layer specs are built with: :func:`select_linear` of
    ``configured`` (model.linear), except "local" while building on the meta device (dry-run
    planning), whatever is configured. The parameters, their names and counts are the same; TE
    would allocate real memory there, because the model config's use_cpu_initialization makes
    megatron hand TE ``device="cpu"`` explicitly, which overrides the meta default device."""
    if torch.get_default_device().type == "meta":
        return "local"
    return select_linear(configured)[0]

"""Which kernels and layer implementations this process uses: one place decides, one line reports.

Three independent choices, each with the reason it was made:

- ``linear``: ``"te"`` (transformer-engine's linears, norms and core attention, through megatron's
  ``TESpecProvider``; see :mod:`attnres_train.model.specs`) or ``"local"`` (megatron's own
  ColumnParallelLinear / RowParallelLinear, our torch RMSNorm, the local core attention).
  ``auto``: TE when CUDA is available and transformer-engine imports (megatron's
  ``extensions.transformer_engine.HAVE_TE``), else local. ``ATTNRES_LINEAR=te|local|auto``
  overrides; ``te`` where TE cannot run is an error, not a silent fallback.
- ``kda``: the KDA core (``"fla"``, ``"chunk"``, ``"recurrent"``), decided by
  :func:`attnres_train.model.kda.explain_impl` from ``model.kda.impl`` (the same rule the layer
  applies to its tensors at run time), ``"none"`` without KDA layers.
- ``attnres_kernel``: the two-phase AttnRes kernels (``"triton"`` / ``"torch"``), decided by
  :func:`attnres_train.model.attnres.kernel_backend` (``ATTNRES_KERNEL``); ``"none"`` for the
  standard residual, ``"naive"`` for ``model.attnres.impl=naive`` (plain autograd, no kernel).

``select_backend(model_cfg)`` makes all three for the device this process trains on (CUDA when
available); ``Backend.describe()`` is the start-up line, e.g.
``backend: linear=te (transformer-engine 2.8.0), kda=fla, attnres=triton``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

#: environment override of the linear/norm backend: ``te``, ``local`` or ``auto`` (default)
LINEAR_ENV = "ATTNRES_LINEAR"
LINEARS = ("te", "local")


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

def select_linear() -> tuple[str, str]:
    """``(linear, reason)`` from ``ATTNRES_LINEAR`` and what the machine has.

    Raises ValueError for an unknown override and RuntimeError for ``te`` where TE cannot run.
    """
    choice = os.environ.get(LINEAR_ENV, "").strip().lower() or "auto"
    if choice not in (*LINEARS, "auto"):
        raise ValueError(f"{LINEAR_ENV}={choice!r}: use te, local or auto")
    if choice == "local":
        return "local", f"{LINEAR_ENV}=local"
    cuda, version = cuda_available(), te_version()
    if choice == "te":
        if not cuda:
            raise RuntimeError(f"{LINEAR_ENV}=te needs CUDA (torch.cuda.is_available() is False); "
                               f"unset it or use {LINEAR_ENV}=local")
        if version is None:
            raise RuntimeError(f"{LINEAR_ENV}=te but transformer-engine is not importable "
                               "(pip install 'transformer-engine[pytorch]', or the gpu extra); "
                               f"unset it or use {LINEAR_ENV}=local")
        return "te", f"{LINEAR_ENV}=te"
    if not cuda:
        return "local", "no CUDA"
    if version is None:
        return "local", "transformer-engine not importable"
    return "te", "auto: CUDA and transformer-engine"


def select_backend(model_cfg, device: Optional[str] = None) -> Backend:
    """The backend for ``model_cfg`` on ``device`` (default: "cuda" if available, else "cpu").

    Errors surface here, at start-up, rather than at the first forward: an unknown or unusable
    ``ATTNRES_LINEAR``, ``model.kda.impl=fla`` without fla, ``ATTNRES_KERNEL=triton`` without CUDA.
    """
    from attnres_train.model.kda import explain_impl

    dev = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    linear, linear_reason = select_linear()
    if "K" in model_cfg.layer_pattern:
        kda, kda_reason = explain_impl(model_cfg.kda.impl, dev, model_cfg.kda.chunk_size)
    else:
        kda, kda_reason = "none", "no KDA layers"
    attnres, attnres_reason = _attnres_kernel(model_cfg, dev)
    return Backend(linear=linear, linear_reason=linear_reason, kda=kda, kda_reason=kda_reason,
                   attnres_kernel=attnres, attnres_reason=attnres_reason, device=dev.type,
                   te_version=te_version() if linear == "te" else None)


def _attnres_kernel(model_cfg, device: torch.device) -> tuple[str, str]:
    """Reports the AttnRes dispatcher's choice (attnres.kernel_backend); decides nothing itself."""
    if model_cfg.residual == "standard":
        return "none", "standard residual"
    if model_cfg.attnres.impl == "naive":
        return "naive", "model.attnres.impl=naive"
    from attnres_train.model.attnres import KERNEL_ENV, kernel_backend

    kernel = kernel_backend(device)
    env = os.environ.get(KERNEL_ENV, "").strip().lower()
    if env in ("torch", "triton"):
        return kernel, f"{KERNEL_ENV}={env}"
    if kernel == "triton":
        return kernel, "auto: CUDA and triton"
    if device.type != "cuda":
        return kernel, "auto: no CUDA"
    from attnres_train.model.attnres import triton_available, triton_self_check

    if not triton_available():
        return kernel, "auto: triton not installed"
    return kernel, f"auto: Triton kernels failed their self-check ({triton_self_check(device.type)})"


def linear_for_build() -> str:
    """The linear backend the layer specs are built with: :func:`select_linear`, except "local"
    while building on the meta device (dry-run planning). The parameters, their names and counts
    are the same; TE would allocate real memory there, because the model config's
    use_cpu_initialization makes megatron hand TE ``device="cpu"`` explicitly, which overrides the
    meta default device."""
    if torch.get_default_device().type == "meta":
        return "local"
    return select_linear()[0]

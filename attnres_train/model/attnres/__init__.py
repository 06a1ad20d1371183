"""Attention Residuals (AttnRes) core op, pure torch (design notes: docs/attnres.md).

Equations (Kimi Team, "Attention Residuals", Eqs. 2-4 and 6). Sublayer ``l`` replaces the residual
sum with softmax attention over depth, per token, over k sources ``v_j`` of shape ``[..., D]``::

    z_j  = (w_l * gamma_l) . RMSNorm(v_j)          RMSNorm(v) = v * rsqrt(mean(v**2) + eps)
    a    = softmax_j(z)                            (no temperature)
    h_l  = sum_j a_j v_j                           (values are the RAW sources)

``w_l`` (pseudo-query) and ``gamma_l`` (the key RMSNorm gain, folded into the query since only
the product matters) are ``[D]`` parameters. With ``w_l = 0`` the weights are uniform, i.e. the
mean of the sources. Full AttnRes: sources are the embedding and every previous sublayer output.
Block AttnRes: sources are ``[b_0 = embedding, b_1..b_{n-1} (completed block sums),
b_n^i (partial sum of the current block, absent for its first sublayer)]``.

Shapes: sources ``[..., D]`` (megatron: ``[S, B, D]``), query/gamma ``[D]``; the batched phase 1
takes queries/gammas ``[S, D]`` and returns ``o: [S, ..., D]``, ``lse: [S, ...]`` (fp32 or fp64).

Why keys are recomputed. Plain autograd saves the normalised keys, k·D extra numbers per token
(as big as the sources themselves). The custom Functions in :mod:`.two_phase` save only the
sources (which the model keeps alive anyway), the queries/gains and an fp32 lse per token and
query, and recompute rstd and the logits in backward (one small GEMM per source).

Two-phase idea (Algorithm 1). The queries do not depend on the input, so the S queries of a
block can all attend over the completed blocks before the block runs: one batched pass
(:func:`attnres_phase1`) reads each completed block once instead of S times and returns the
normalised mix plus its log-sum-exp. Each sublayer then folds in the one source that did not
exist yet, the block's running partial sum, with an online-softmax step
(:func:`attnres_merge`): ``h = sigmoid(lse - z2) * o + (1 - sigmoid(lse - z2)) * partial``,
which is exactly the softmax over all sources.

Public API:
    attnres_naive:  plain-autograd reference (ground truth for tests).
    attnres_lean:   same contract, memory-lean custom backward.
    attnres_phase1, attnres_merge: the two phases.
    attnres(...):   dispatch by ``impl`` (model.attnres.impl: two_phase or naive).
    attnres_phase1_auto, attnres_merge_auto: the two phases on the selected kernel backend
        (:func:`kernel_backend`): the fused Triton kernels of :mod:`.triton_kernels` for CUDA
        tensors when triton is installed, the torch Functions otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attnres_train.choices import AttnResImpl, AttnResKernel
from attnres_train.errors import ConfigError

from .naive import attnres_naive, block_attnres_chain_naive
from .two_phase import (
    attnres_lean,
    attnres_merge,
    attnres_phase1,
    block_attnres_chain_two_phase,
)

__all__ = [
    "attnres",
    "attnres_naive",
    "attnres_lean",
    "attnres_phase1",
    "attnres_merge",
    "block_attnres_chain_naive",
    "block_attnres_chain_two_phase",
    "IMPLS",
    "kernel_backend",
    "requested_kernel",
    "set_kernel_preference",
    "phase1_fn",
    "merge_fn",
    "attnres_phase1_auto",
    "attnres_merge_auto",
]

#: model.attnres.impl -> its single-query op ``(sources, query, gamma, eps) -> [..., D]``
IMPLS: dict[AttnResImpl, Callable[[Sequence[Tensor], Tensor, Tensor, float], Tensor]] = {
    AttnResImpl.two_phase: attnres_lean,  # phase 1 with one query: the lean custom Function
    AttnResImpl.naive: attnres_naive,
}


def attnres(
    sources: Sequence[Tensor], query: Tensor, gamma: Tensor, eps: float,
    impl: AttnResImpl | str = AttnResImpl.two_phase,
) -> Tensor:
    """One AttnRes mix: softmax over ``sources`` (each ``[..., D]``) with query/gamma ``[D]``.

    ``impl="two_phase"`` uses the memory-lean custom Function, ``impl="naive"`` plain autograd.
    """
    return IMPLS[AttnResImpl.parse(impl, "AttnRes impl")](sources, query, gamma, eps)


# --------------------------------------------------------------------------- kernel backend

#: environment override of model.attnres.kernel: ``torch``, ``triton`` or ``auto``
KERNEL_ENV = "ATTNRES_KERNEL"

# model.attnres.kernel of this process's model: the kernels are picked per call deep inside the
# model, so the configured choice is set here once at start-up (attnres_train.model.backend's
# select_backend) instead of being threaded through every layer.
_preferred_kernel = AttnResKernel.auto


def set_kernel_preference(kernel: AttnResKernel | str) -> None:
    """Make ``kernel`` (model.attnres.kernel) the choice :func:`kernel_backend` applies when
    ``ATTNRES_KERNEL`` is unset."""
    global _preferred_kernel
    _preferred_kernel = AttnResKernel.parse(kernel, "model.attnres.kernel")


def requested_kernel() -> tuple[AttnResKernel, str]:
    """``(choice, where it came from)``: ``ATTNRES_KERNEL`` when set (case-insensitive), else
    model.attnres.kernel (:func:`set_kernel_preference`; ``auto`` unless configured)."""
    env = os.environ.get(KERNEL_ENV, "").strip().lower()
    if not env:
        return _preferred_kernel, "model.attnres.kernel"
    if env not in AttnResKernel.values():
        raise ConfigError(KERNEL_ENV, env, f"use one of {', '.join(AttnResKernel.values())}")
    return AttnResKernel(env), KERNEL_ENV


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernel_backend(device: torch.device | str) -> AttnResKernel:
    """``triton`` or ``torch``: which kernels the two phases run on for tensors on ``device``.

    The choice is :func:`requested_kernel`'s (``ATTNRES_KERNEL``, else model.attnres.kernel).
    ``torch`` or ``triton`` forces one (``triton`` raises if triton is not installed; on CPU
    tensors it only works under ``TRITON_INTERPRET=1``, which tests use). ``auto``: Triton for
    CUDA tensors when triton is installed, else torch. The environment is read on every call (a
    dictionary lookup), so tests can switch it; triton is imported only when the Triton backend
    is actually used.
    """
    choice, source = requested_kernel()
    if choice == AttnResKernel.torch:
        return AttnResKernel.torch
    if choice == AttnResKernel.triton:
        if not triton_available():
            raise RuntimeError(f"{source}=triton but triton is not installed")
        interpret = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")
        if torch.device(device).type != "cuda" and not interpret:
            raise RuntimeError(f"{source}=triton needs CUDA tensors (or TRITON_INTERPRET=1), "
                               f"got {torch.device(device).type} tensors")
        return AttnResKernel.triton
    if torch.device(device).type != "cuda" or not triton_available():
        return AttnResKernel.torch
    return AttnResKernel.torch if triton_self_check(torch.device(device).type) else AttnResKernel.triton


@functools.lru_cache(maxsize=None)
def triton_self_check(device_type: str = "cuda") -> Optional[str]:
    """None if the Triton kernels compile on this device and match the torch path on a small
    problem (phase 1 + merge, forward and backward, fp32); else why not. Run once per process
    before `auto` selects Triton, so a kernel that fails to build on an untested GPU/driver
    falls back to the torch path with a warning instead of ending the run."""
    try:
        reason = _compare_kernels(device_type)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if reason:
        warnings.warn(f"AttnRes Triton kernels disabled, using the torch path ({reason})")
    return reason


def _compare_kernels(device_type: str, tol: float = 1e-4) -> Optional[str]:
    from .triton_kernels import attnres_merge_triton, attnres_phase1_triton

    g = torch.Generator().manual_seed(0)

    def make():
        blocks = [torch.randn(2, 32, 128, generator=g) for _ in range(3)]
        q, w = 0.3 * torch.randn(2, 128, generator=g), 1 + 0.1 * torch.randn(2, 128, generator=g)
        part = torch.randn(2, 32, 128, generator=g)
        return [t.to(device_type).requires_grad_() for t in (*blocks, q, w, part)]

    inputs = make()
    results = []
    for phase1, merge in ((attnres_phase1, attnres_merge), (attnres_phase1_triton, attnres_merge_triton)):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        *blocks, q, w, part = leaves
        o, lse = phase1(blocks, q, w, 1e-6)
        h = merge(o[1], lse[1], part, q[1], w[1], 1e-6)
        (o[0].square().sum() + h.square().sum()).backward()
        results.append([o.detach(), lse.detach(), h.detach()] + [t.grad for t in leaves])
    for ref, got in zip(*results):
        err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        if not err <= tol:
            return f"self-check mismatch: relative error {err:.2e} > {tol:g}"
    return None


def phase1_fn(device: torch.device | str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The phase-1 op (signature of :func:`attnres_phase1`) for tensors on ``device``."""
    if kernel_backend(device) == "triton":
        from .triton_kernels import attnres_phase1_triton

        return attnres_phase1_triton
    return attnres_phase1


def merge_fn(device: torch.device | str) -> Callable[..., Tensor]:
    """The merge op (signature of :func:`attnres_merge`) for tensors on ``device``."""
    if kernel_backend(device) == "triton":
        from .triton_kernels import attnres_merge_triton

        return attnres_merge_triton
    return attnres_merge


def attnres_phase1_auto(
    blocks: Sequence[Tensor], queries: Tensor, gammas: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`attnres_phase1` on the backend :func:`kernel_backend` selects for the blocks."""
    return phase1_fn(blocks[0].device)(blocks, queries, gammas, eps)


def attnres_merge_auto(
    out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, gamma: Tensor, eps: float
) -> Tensor:
    """:func:`attnres_merge` on the backend :func:`kernel_backend` selects for ``out``."""
    return merge_fn(out.device)(out, lse, partial, query, gamma, eps)

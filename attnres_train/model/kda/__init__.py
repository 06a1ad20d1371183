"""Kimi Delta Attention (KDA): reference recurrence, chunked pure-torch form, fla adapter, layer.

``kda(q, k, v, g, beta, ...)`` dispatches between the implementations; see each module for the
math and the numerics (design notes: docs/kda.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnres_train.choices import KDAImpl
from attnres_train.model.kda.chunk import kda_chunk
from attnres_train.model.kda.fla import fla_available, kda_fla
from attnres_train.model.kda.naive import kda_recurrent


def resolve_impl(impl: KDAImpl | str, device: torch.device, chunk_size: int) -> KDAImpl:
    """The concrete implementation ``impl`` stands for on ``device`` ("chunk"/"recurrent"/"fla").

    "auto" picks fla when its kernel is usable (CUDA tensors, fla importable, chunk_size 32 or
    64), else the pure-torch chunked form.  Raises ValueError for an unknown name and
    RuntimeError for "fla" where fla cannot run.
    """
    return explain_impl(impl, device, chunk_size)[0]


def explain_impl(impl: KDAImpl | str, device: torch.device, chunk_size: int) -> Tuple[KDAImpl, str]:
    """``(resolve_impl(...), why)``: the selection rule of :func:`resolve_impl` with a short
    reason, for start-up reports (``attnres_train.model.backend``)."""
    impl = KDAImpl.parse(impl, "KDA impl")
    if impl == KDAImpl.auto:
        if torch.device(device).type != "cuda":
            return KDAImpl.chunk, "auto: no CUDA"
        if chunk_size not in (32, 64):
            return KDAImpl.chunk, f"auto: fla needs chunk_size 32 or 64, got {chunk_size}"
        if not fla_available():
            return KDAImpl.chunk, "auto: fla.ops.kda not importable"
        return KDAImpl.fla, "auto: CUDA and fla.ops.kda"
    if impl == KDAImpl.fla and not fla_available():
        raise RuntimeError(
            "impl='fla' needs CUDA and an importable fla.ops.kda "
            "(pip install flash-linear-attention); use impl='chunk' or 'auto'"
        )
    return impl, f"model.kda.impl={impl}"


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: KDAImpl | str = KDAImpl.auto,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA core: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``,
    initial_state ``[B, H, K, V]`` -> ``(o [B, T, H, V], final state [B, H, K, V] or None)``.

    q/k are expected l2-normalised, g activated (log-decay <= 0), beta sigmoided.
    ``impl``: a :class:`~attnres_train.choices.KDAImpl` (see :func:`resolve_impl`).
    """
    which = resolve_impl(impl, q.device, chunk_size)
    if which == "fla":
        return kda_fla(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    if which == "recurrent":
        return kda_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    return kda_chunk(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)



def __getattr__(name: str):
    # the megatron layer is imported lazily: importing megatron costs seconds and the kernels
    # above do not need it
    if name in ("KimiDeltaAttention", "kda_param_count"):
        from attnres_train.model.kda import layer

        return getattr(layer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KimiDeltaAttention",
    "fla_available",
    "kda",
    "kda_chunk",
    "kda_fla",
    "kda_param_count",
    "kda_recurrent",
    "explain_impl",
    "resolve_impl",
]

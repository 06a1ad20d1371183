"""Adapter over fla's Triton ``chunk_kda`` (GPU only).

fla is imported lazily inside the functions: it is not installed on CPU machines, and even
importing it there needs triton.  Our callers pass q/k already l2-normalised, ``g`` already
activated (log-space decay), ``beta`` already sigmoided and an fp32 initial state, so every
"in kernel" option of fla stays off.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch


@functools.lru_cache(maxsize=1)
def _fla_importable() -> bool:
    try:
        import fla.ops.kda  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def fla_available() -> bool:
    """True only if CUDA is available and ``fla.ops.kda`` imports."""
    return torch.cuda.is_available() and _fla_importable()


def kda_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA through fla's ``chunk_kda`` (same contract as :func:`kda_chunk`).

    Shapes: q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``;
    initial_state ``[B, H, K, V]`` (cast to fp32, which fla requires).
    Returns ``(o [B, T, H, V], final state [B, H, K, V] fp32 or None)``; fla returns o in q's dtype.
    """
    if chunk_size not in (32, 64):
        raise ValueError(f"fla chunk_kda supports chunk_size 32 or 64, got {chunk_size}")
    if not fla_available():
        raise RuntimeError("fla KDA kernel unavailable: needs CUDA and an importable fla.ops.kda")
    from fla.ops.kda import chunk_kda

    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = chunk_kda(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
        chunk_size=chunk_size,
    )
    return o, (final if output_final_state else None)

"""Token-by-token reference of Kimi Delta Attention (KDA), written from the math.

Per batch element and head, with state ``S`` of shape ``[K, V]`` (docs/kda.md)::

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

implemented as the decay, then the delta-rule correction::

    S   <- exp(g_t)[:, None] * S
    S   <- S + beta_t k_t (v_t - S^T k_t)^T
    o_t  = S^T (scale * q_t)

This is the correctness reference for the chunked and fused kernels: slow (one step per
token) but obviously right.  q/k are *not* l2-normalised here (the layer does that).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the KDA math runs in: fp32, or wider if any input is wider (fp64 stays fp64)."""
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def check_shapes(q, k, v, g, beta, initial_state) -> None:
    """Validate the [B,T,H,K] / [B,T,H,V] / [B,T,H] / [B,H,K,V] layout shared by all impls."""
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(
            f"q, k, g must share shape [B,T,H,K]; got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"g={tuple(g.shape)}"
        )
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B,T,H,V] with B,T,H={B, T, H}; got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B,T,H]={B, T, H}; got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, q.shape[-1], v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B,H,K,V]={(B, H, q.shape[-1], v.shape[-1])}; "
            f"got {tuple(initial_state.shape)}"
        )


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Recurrent (token-by-token) KDA.

    Args:
        q, k: ``[B, T, H, K]`` queries / keys (not normalised here).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log-space per-channel decay (already activated, ``<= 0``).
        beta: ``[B, T, H]`` delta-rule step size (already sigmoided).
        scale: query scale, default ``K ** -0.5``.
        initial_state: optional ``[B, H, K, V]`` state before the first token.
        output_final_state: also return the state after the last token.

    Returns:
        ``(o [B, T, H, V] in v's dtype, S [B, H, K, V] in fp32-or-wider or None)``.
    """
    check_shapes(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    # Head-major [B, H, T, *] so each step slices a contiguous [B, H, *] block.
    q, k, v, g = (x.to(dt).transpose(1, 2) for x in (q, k, v, g))
    beta = beta.to(dt).transpose(1, 2)
    q = q * scale
    if initial_state is None:
        S = q.new_zeros(B, H, K, V)
    else:
        S = initial_state.to(dt)
    outs = []
    for t in range(T):
        k_t = k[:, :, t]  # [B, H, K]
        S = S * g[:, :, t].exp().unsqueeze(-1)
        # prediction of v_t from the decayed state, then the delta-rule correction
        err = v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t * beta[:, :, t, None], err)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2) if T > 0 else v.new_zeros(B, H, 0, V, dtype=dt)
    o = o.transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)

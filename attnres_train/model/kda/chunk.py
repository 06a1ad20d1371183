"""Chunkwise-parallel Kimi Delta Attention in pure torch (autograd), written from the math.

Within a chunk of C positions (docs/kda.md), with G = cumsum(g) from the chunk start
(per channel, so G is non-increasing and G_r - G_i <= 0 for i <= r):

    A_kk[r, i] = beta_r * sum_c k_r[c] k_i[c] exp(G_r[c] - G_i[c])      i <  r
    A_qk[r, i] =          sum_c q_r[c] k_i[c] exp(G_r[c] - G_i[c])      i <= r
    (I + A_kk) [U | W] = Diag(beta) [V | exp(G) * K]          (UT transform, unit-lower solve)
    V'  = U - W S                          (pseudo-values; S = state at the chunk start)
    O   = (exp(G) * Q) S + A_qk V'
    S  <- exp(G_C) * S + (exp(G_C - G) * K)^T V'

Everything except the last two lines is independent across chunks and is computed for all
chunks at once; only the state recursion is a Python loop over chunks (and the per-chunk
outputs are formed after the loop from the stacked chunk-entry states).

Numerical safety (docs/kda.md, "the safety clamp"): exp(G_r - G_i) is never factorised as
exp(G_r) * exp(-G_i) over a whole chunk -- exp(-G_i) overflows in fp32 once the summed decay
passes ~88.  The intra-chunk matrices are built from sub-chunks of ``s = SUB`` rows:

* diagonal blocks (s x s): exp(L_r - L_i) pairwise per channel, L = cumsum inside the
  sub-chunk; the entries above the diagonal get -inf added to the exponent *before* exp, so
  they are exact zeros with zero gradient (an overflowed exp times a 0 mask would give
  inf * 0 = NaN in the backward pass);
* off-diagonal blocks (row sub-chunk R, column sub-chunk I < R) are factorised through two
  reference rows, R's first row and I's last row:
      exp(G_r - G_i) = exp(G_r - G_start(R)) * exp(G_start(R) - G_end(I)) * exp(G_end(I) - G_i)
  Every exponent is <= 0, so every factor is <= 1 and at worst underflows to 0 (where the true
  value is smaller still); the middle factor is a tiny [n, n, K] tensor masked to -inf for
  I >= R before exp.  The block products are then one matmul per row sub-chunk.

Accuracy: every decay exponent is summed from (nearly) only the g's it spans -- cumsums over
at most one sub-chunk, or sums of exactly the sub-chunk totals in between -- never as the
difference of two chunk-level cumsums, which in fp32 loses ~eps*|G| absolute (1e-4 relative
for |G| ~ 1e3).  tests/model/test_kda.py holds the fp32 output, state and gradients to the
fp64 recurrence under strong decays (mean g -24).

Cost: the pairwise [.., s, s, K] diagonal tensors dominate it; ``SUB`` trades them against the
number of off-diagonal block products.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from attnres_train.model.kda.naive import check_shapes, compute_dtype

# Rows per sub-chunk (see module docstring): the fastest of 4/8/16 on CPU for chunk sizes 16..64.
SUB = 8


def _diag_bias(s: int, device, dtype) -> torch.Tensor:
    """``[s, s, 1]`` additive exponent mask: 0 where column i <= row r, -inf above."""
    ar = torch.arange(s, device=device)
    bias = torch.zeros(s, s, 1, dtype=dtype, device=device)
    return bias.masked_fill((ar[None, :] > ar[:, None])[..., None], float("-inf"))


def _sub_masks(n: int, device, dtype):
    """Sub-chunk structure of a chunk of ``n`` sub-chunks.

    Returns ``before [n, n, 1]`` (additive exponent mask: 0 where sub-chunk I < R, else -inf),
    ``after [n, n]`` (0/1: J > I) and ``between [n, n, n]`` (0/1: I < J < R, as [R, I, J]).
    """
    bn = torch.arange(n, device=device)
    lt = bn[None, :] < bn[:, None]  # [R, I]: I < R
    before = torch.zeros(n, n, 1, dtype=dtype, device=device)
    before = before.masked_fill(~lt[..., None], float("-inf"))
    between = (bn[None, :, None] < bn[None, None, :]) & (bn[None, None, :] < bn[:, None, None])
    return before, lt.T.to(dtype), between.to(dtype)


def _block_diag(D: torch.Tensor) -> torch.Tensor:
    """``[..., n, s, s]`` diagonal blocks -> ``[..., n*s, n*s]`` block-diagonal matrix."""
    n, s = D.shape[-3], D.shape[-1]
    if n == 1:
        return D.squeeze(-3)
    eye = torch.eye(n, dtype=D.dtype, device=D.device)
    # the values are finite, so placing them with a 0/1 multiply is safe
    return (D.unsqueeze(-2) * eye[:, None, :, None]).reshape(*D.shape[:-3], n * s, n * s)


def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    sub_chunk: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise-parallel KDA (same contract as :func:`kda_recurrent`).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` log-decay (<= 0);
        beta: ``[B, T, H]``; scale: default ``K ** -0.5``; initial_state: ``[B, H, K, V]``.
        chunk_size: C. Any T works: the tail is padded with k=v=q=beta=0, g=0 (no decay, no
            update, so the state passes through unchanged) and the output sliced back.
        sub_chunk: rows per sub-chunk, i.e. size of the pairwise diagonal blocks (default
            ``min(SUB, C)``; if it does not divide C the whole chunk is done pairwise).

    Returns:
        ``(o [B, T, H, V] in v's dtype, S [B, H, K, V] in fp32-or-wider or None)``.
    """
    check_shapes(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    C = chunk_size
    s = min(sub_chunk or SUB, C)
    if C % s:
        s = C
    n = C // s
    N = max(1, math.ceil(T / C))
    pad = N * C - T

    def prep(x: torch.Tensor, mul: float = 1.0) -> torch.Tensor:
        # [B, T, H, D] -> [B, H, N, C, D] in the compute dtype, zero-padded at the end
        x = x.to(dt).transpose(1, 2)
        if mul != 1.0:
            x = x * mul
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q_, k_, v_, g_ = prep(q, scale), prep(k), prep(v), prep(g)
    b_ = prep(beta.unsqueeze(-1))  # [B, H, N, C, 1]

    # ---- log-decay bookkeeping.  Exponents of decays between two positions are formed from
    # cumsums over at most one sub-chunk (s rows) or from sums of exactly the sub-chunk totals
    # in between -- never as G_r - G_i of two chunk-level cumsums, which in fp32 loses
    # ~eps*|G| absolute, i.e. ~1e-4 relative once |G| ~ 1e3 under strong decays.
    qs, ks, gs = (x.reshape(B, H, N, n, s, K) for x in (q_, k_, g_))
    L = gs.cumsum(-2)  # inclusive cumsum inside each sub-chunk
    tot = L[..., -1, :]  # [B, H, N, n, K] sub-chunk totals
    after = tot.unsqueeze(-2) - L  # decay exponent from row i to its sub-chunk's last row, <= 0
    G = g_.cumsum(-2)  # in-chunk cumulative log-decay from the chunk start, <= 0
    G_last = tot.sum(-2)  # [B, H, N, K] total log-decay of each chunk
    k_end = ks * after.exp()  # k_i * decay to the end of its sub-chunk (<= 1)
    if n > 1:
        mask_before, mask_after, mask_between = _sub_masks(n, q_.device, dt)
        # decay from the end of sub-chunk I to the chunk end: totals of the later sub-chunks
        tot_after = torch.einsum("ij,...jk->...ik", mask_after, tot)  # [B, H, N, n, K]
        k_dec = (k_end * tot_after.exp().unsqueeze(-2)).reshape(B, H, N, C, K)
    else:
        k_dec = k_end.reshape(B, H, N, C, K)  # k_i * decay from row i to the chunk end

    # ---- diagonal sub-blocks, pairwise: E[r, i] = exp(L_r - L_i) for i <= r, exactly 0 above
    # the diagonal because the -inf mask is added to the exponent *before* exp
    diag_bias = _diag_bias(s, q_.device, dt)  # [s, s, 1]: 0 on/below the diagonal, -inf above
    E = (L.unsqueeze(-2) - L.unsqueeze(-3) + diag_bias).exp()  # [.., n, s(r), s(i), K]
    kE = ks.unsqueeze(-3) * E  # k_i * exp(G_r - G_i)
    qk = torch.stack([qs, ks], dim=-2)  # [.., n, s(r), 2, K]
    P = qk @ kE.transpose(-1, -2)  # [.., n, s(r), 2, s(i)]: per-row (q_r, k_r) . kE[r]
    A_qk = _block_diag(P[..., 0, :])
    A_kk = _block_diag(torch.tril(P[..., 1, :], diagonal=-1))

    if n > 1:
        # ---- off-diagonal blocks (R, I<R), factorised through two reference rows:
        # exp(G_r - G_i) = exp(G_r - G_start(R)) * exp(G_start(R) - G_end(I)) * exp(G_end(I) - G_i)
        # every exponent <= 0, so every factor is <= 1 (may underflow to 0, never overflow);
        # the middle one is masked to -inf for I >= R before exp.
        row = (L - L[..., :1, :]).exp()  # [.., n, s, K]
        mid_exp = gs[..., :, None, 0, :] + torch.einsum("rij,...jk->...rik", mask_between, tot)
        mid = (mid_exp + mask_before).exp()  # [.., n(R), n(I), K]; 0 unless I < R
        kc = (k_end.unsqueeze(-4) * mid.unsqueeze(-2)).reshape(B, H, N, n, C, K)
        rows = (qk * row.unsqueeze(-2)).reshape(B, H, N, n, 2 * s, K)  # rows q_r, k_r interleaved
        off = (rows @ kc.transpose(-1, -2)).reshape(B, H, N, n, s, 2, C)
        A_qk = A_qk + off[..., 0, :].reshape(B, H, N, C, C)
        A_kk = A_kk + off[..., 1, :].reshape(B, H, N, C, C)
    A_kk = A_kk * b_  # row r scaled by beta_r

    # ---- UT transform: (I + A_kk)^{-1} Diag(beta) [V | exp(G) K].  The unit diagonal is
    # implied (unitriangular=True never reads it), so A_kk with its zero diagonal goes in as is.
    G_exp = G.exp()
    rhs = torch.cat([v_, k_ * G_exp], dim=-1) * b_
    UW = torch.linalg.solve_triangular(A_kk, rhs, upper=False, unitriangular=True)
    U, W = UW[..., :V], UW[..., V:]

    # ---- sequential state recursion over chunks
    chunk_decay = G_last.exp().unsqueeze(-1)  # [B, H, N, K, 1]
    S = q_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    states, vnews = [], []
    for c in range(N):
        states.append(S)
        v_new = U[:, :, c] - W[:, :, c] @ S  # pseudo-values [B, H, C, V]
        vnews.append(v_new)
        S = chunk_decay[:, :, c] * S + k_dec[:, :, c].transpose(-1, -2) @ v_new
    S_in = torch.stack(states, dim=2)  # [B, H, N, K, V] state entering each chunk
    V_new = torch.stack(vnews, dim=2)  # [B, H, N, C, V]
    o = (q_ * G_exp) @ S_in + A_qk @ V_new  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(v.dtype)
    return o, (S if output_final_state else None)

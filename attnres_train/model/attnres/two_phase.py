"""Memory-lean AttnRes: custom autograd Functions for the two-phase computation.

Notation (per token; ``w = query * gamma``, ``r_j = rsqrt(mean(v_j**2) + eps)``)::

    z_j = r_j * (w . v_j)          a = softmax_j(z)          h = sum_j a_j v_j

Memory. Plain autograd on this formula saves the normalised keys ``v_j * r_j`` (k·D numbers per
token, as much as the sources themselves) plus the stacked sources. Here backward saves only the
sources (references to tensors the model keeps alive anyway), the ``[S, D]`` queries/gains and
the fp32 log-sum-exp; ``r_j`` and ``z_j`` are recomputed (one GEMM per source), and the output
``o`` is not needed because ``sum_j a_j (g . v_j) = g . o``.

Gradients (``g`` = upstream grad of the output, ``g_lse`` = upstream grad of the lse)::

    dL/dz_j = a_j (g . v_j - g . o) + a_j g_lse
    dz_j/dv_j = r_j (w - z_j r_j v_j / D)          (key path; the value path adds a_j g)
    dz_j/dw   = r_j v_j

Precision. Statistics (rstd, logits, max, sum-exp, lse) and the output accumulator use
``promote_types(input dtype, float32)``: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .naive import SublayerFn, _check_chain_args

__all__ = [
    "attnres_phase1",
    "attnres_merge",
    "attnres_lean",
    "block_attnres_chain_two_phase",
]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 or higher: the dtype statistics and accumulators are computed in."""
    return torch.promote_types(dtype, torch.float32)


def _rstd(v: Tensor, eps: float) -> Tensor:
    """``[T, D] -> [T]``: inverse RMS of each row (RMSNorm without gain)."""
    # vector_norm reduces in one pass without materialising v**2 (a [T, D] temporary)
    return torch.rsqrt(torch.linalg.vector_norm(v, dim=-1).square() / v.shape[-1] + eps)


def _logits(v: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``v: [T, D], w: [S, D] -> (z: [S, T], rstd: [T])`` with ``z[s, t] = rstd[t] (w_s . v_t)``.

    rstd is computed once per source and shared by the S queries, so the logits of a source are
    one GEMM. Forward and backward both call this, so the recomputed logits are bitwise equal to
    the forward ones (e.g. a single source gets a weight of exactly 1 and a query grad of
    exactly 0).
    """
    rstd = _rstd(v, eps)
    return torch.mm(w, v.t()) * rstd, rstd


class _Phase1(torch.autograd.Function):
    """Batched softmax of S queries over n blocks; returns normalised output and fp32 lse."""

    @staticmethod
    def forward(ctx, eps: float, queries: Tensor, gammas: Tensor, *blocks: Tensor):
        lead, dim = blocks[0].shape[:-1], blocks[0].shape[-1]
        sdt = _stat_dtype(blocks[0].dtype)
        num_q = queries.shape[0]
        w = queries.to(sdt) * gammas.to(sdt)  # [S, D]

        # Pass 1: logits, one [S, D] x [D, T] GEMM per block.
        logits = []
        for block in blocks:
            v = block.reshape(-1, dim).to(sdt)  # [T, D]; transient copy only for bf16/fp16
            logits.append(_logits(v, w, eps)[0])  # [S, T]
        z = torch.stack(logits)  # [n, S, T]
        lse = torch.logsumexp(z, dim=0)  # [S, T]
        weights = torch.exp(z - lse)  # [n, S, T]
        del z, logits

        # Pass 2: o = sum_j a_j v_j, accumulated in the stat dtype. addcmul_ broadcasts without a
        # temporary and upcasts a bf16 block on the fly.
        out = torch.zeros(num_q, weights.shape[-1], dim, dtype=sdt, device=blocks[0].device)
        for j, block in enumerate(blocks):
            out.addcmul_(weights[j].unsqueeze(-1), block.reshape(1, -1, dim))

        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(queries, gammas, lse, *blocks)
        out = out.to(blocks[0].dtype).reshape(num_q, *lead, dim)
        return out, lse.reshape(num_q, *lead)

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        queries, gammas, lse, *blocks = ctx.saved_tensors
        eps = ctx.eps
        dim = blocks[0].shape[-1]
        sdt = lse.dtype
        num_q = queries.shape[0]
        num_tok = lse.shape[-1]
        need_q, need_g = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_blocks = ctx.needs_input_grad[3:]
        w = queries.to(sdt) * gammas.to(sdt)  # [S, D]
        lse_t = lse.t()  # [T, S]

        go = None  # [S, T, D]
        if grad_out is not None:
            go = grad_out.reshape(num_q, num_tok, dim).to(sdt)

        # Pass 1: recompute rstd, logits and weights; g . v_j per (token, query).
        rstd, logits, weights, gdotv = [], [], [], []
        for block in blocks:
            v = block.reshape(-1, dim).to(sdt)
            z, r = _logits(v, w, eps)
            z = z.t()  # [T, S]
            a = torch.exp(z - lse_t)
            rstd.append(r)
            logits.append(z)
            weights.append(a)
            if go is not None:
                gdotv.append(torch.einsum("std,td->ts", go, v))  # [T, S]

        # dL/dz_j = a_j (g.v_j - g.o + g_lse), with g.o = sum_j a_j (g.v_j).
        if go is not None:
            g_dot_o = sum(a * gv for a, gv in zip(weights, gdotv))
            dlogits = [a * (gv - g_dot_o) for a, gv in zip(weights, gdotv)]
        else:
            dlogits = [torch.zeros_like(a) for a in weights]
        if grad_lse is not None:
            g_lse_t = grad_lse.reshape(num_q, num_tok).to(sdt).t()  # [T, S]
            dlogits = [dz + a * g_lse_t for dz, a in zip(dlogits, weights)]

        # Pass 2: gradients to the blocks (value + key paths) and to w.
        grad_w = torch.zeros_like(w) if (need_q or need_g) else None
        grad_blocks: list[Tensor | None] = []
        for j, block in enumerate(blocks):
            need_v = need_blocks[j]
            if not need_v and grad_w is None:
                grad_blocks.append(None)
                continue
            v = block.reshape(-1, dim).to(sdt)
            r, z, dz = rstd[j], logits[j], dlogits[j]
            c = dz * r.unsqueeze(-1)  # dL/dz * r, [T, S]
            if grad_w is not None:
                grad_w.addmm_(c.t(), v)  # sum_t c[t, s] v[t]
            if not need_v:
                grad_blocks.append(None)
                continue
            # key path: sum_s dz_s r (w_s - z_s r v / D) = c @ w - coef * v
            coef = (dz * z).sum(dim=-1) * r.square() / dim  # [T]
            grad_v = torch.mm(c, w)  # [T, D]
            grad_v.addcmul_(coef.unsqueeze(-1), v, value=-1)
            if go is not None:  # value path: sum_s a_j[s] g_s
                grad_v += torch.einsum("ts,std->td", weights[j], go)
            grad_blocks.append(grad_v.to(block.dtype).reshape(block.shape))

        grad_q = (grad_w * gammas.to(sdt)).to(queries.dtype) if need_q else None
        grad_g = (grad_w * queries.to(sdt)).to(gammas.dtype) if need_g else None
        return (None, grad_q, grad_g, *grad_blocks)


def attnres_phase1(
    blocks: Sequence[Tensor], queries: Tensor, gammas: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Phase 1 of Algorithm 1: S pseudo-queries attend over n completed blocks in one pass.

    Args:
        blocks: n tensors of identical shape ``[..., D]`` (keys = RMSNorm(block), values = raw).
        queries, gammas: ``[S, D]``, one row per sublayer of the current block.
        eps: RMSNorm epsilon.

    Returns:
        ``(o, lse)``: ``o`` of shape ``[S, ..., D]`` in the blocks' dtype, the *normalised*
        softmax mix of each query over the blocks; ``lse`` of shape ``[S, ...]`` in
        ``promote_types(dtype, float32)``, the log-sum-exp of the logits, which
        :func:`attnres_merge` needs to fold in one more source exactly.
    """
    check_phase1_args(blocks, queries, gammas)
    return _Phase1.apply(eps, queries, gammas, *blocks)


def check_phase1_args(blocks: Sequence[Tensor], queries: Tensor, gammas: Tensor) -> None:
    """Phase 1's contract (shared by the Triton kernels): blocks alike, queries/gammas [S, D]."""
    if len(blocks) == 0:
        raise ValueError("attnres_phase1 needs at least one block")
    shape = blocks[0].shape
    for b in blocks:
        if b.shape != shape or b.dtype != blocks[0].dtype or b.device != blocks[0].device:
            raise ValueError("all blocks must share shape, dtype and device")
    if queries.dim() != 2 or queries.shape != gammas.shape or queries.shape[-1] != shape[-1]:
        raise ValueError(
            f"queries/gammas must be [S, D] with D={shape[-1]}, got "
            f"{tuple(queries.shape)} / {tuple(gammas.shape)}"
        )


class _Merge(torch.autograd.Function):
    """Online-softmax merge of a phase-1 result with one extra source (the partial sum)."""

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, gamma: Tensor,
                eps: float):
        dim = partial.shape[-1]
        sdt = _stat_dtype(torch.promote_types(out.dtype, partial.dtype))
        w = query.to(sdt) * gamma.to(sdt)  # [D]
        p = partial.reshape(-1, dim).to(sdt)
        z2 = torch.mv(p, w) * _rstd(p, eps)  # [T]
        # softmax over [blocks..., partial] = sigma * o + (1 - sigma) * partial with
        # sigma = e^lse / (e^lse + e^z2) = sigmoid(lse - z2).
        sigma = torch.sigmoid(lse.reshape(-1).to(sdt) - z2)
        hidden = torch.lerp(p, out.reshape(-1, dim).to(sdt), sigma.unsqueeze(-1))
        ctx.eps = eps
        # o is saved (it is the phase-1 output, [..., D] per sublayer, the same size as the
        # residual-stream activation a standard block would keep); the partial's rstd/logit
        # are recomputed.
        ctx.save_for_backward(out, lse, partial, query, gamma)
        return hidden.to(out.dtype).reshape(out.shape)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        out, lse, partial, query, gamma = ctx.saved_tensors
        eps = ctx.eps
        dim = partial.shape[-1]
        sdt = _stat_dtype(torch.promote_types(out.dtype, partial.dtype))
        w = query.to(sdt) * gamma.to(sdt)
        p = partial.reshape(-1, dim).to(sdt)
        o = out.reshape(-1, dim).to(sdt)
        g = grad_h.reshape(-1, dim).to(sdt)
        r = _rstd(p, eps)
        z2 = torch.mv(p, w) * r
        sigma = torch.sigmoid(lse.reshape(-1).to(sdt) - z2)

        # dL/d(lse - z2) = (g . (o - p)) sigma (1 - sigma)
        dlogit = ((g * (o - p)).sum(dim=-1)) * sigma * (1 - sigma)  # [T]
        grad_o = grad_lse = grad_p = grad_q = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_o = (sigma.unsqueeze(-1) * g).to(out.dtype).reshape(out.shape)
        if ctx.needs_input_grad[1]:
            grad_lse = dlogit.to(lse.dtype).reshape(lse.shape)
        dz2 = -dlogit
        c = dz2 * r  # [T]
        if ctx.needs_input_grad[2]:
            # value path (1 - sigma) g, key path dz2 r (w - z2 r p / D)
            grad_p = (1 - sigma).unsqueeze(-1) * g + torch.outer(c, w)
            grad_p -= (c * z2 * r / dim).unsqueeze(-1) * p
            grad_p = grad_p.to(partial.dtype).reshape(partial.shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_w = torch.mv(p.t(), c)  # [D]
            if ctx.needs_input_grad[3]:
                grad_q = (grad_w * gamma.to(sdt)).to(query.dtype)
            if ctx.needs_input_grad[4]:
                grad_g = (grad_w * query.to(sdt)).to(gamma.dtype)
        return grad_o, grad_lse, grad_p, grad_q, grad_g, None


def attnres_merge(
    out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, gamma: Tensor, eps: float
) -> Tensor:
    """Phase 2 for one sublayer: fold the intra-block partial sum into a phase-1 result.

    Args:
        out: ``[..., D]``, this sublayer's row of the phase-1 output (``o[s]``).
        lse: ``[...]``, this sublayer's row of the phase-1 lse (``lse[s]``).
        partial: ``[..., D]``, the block's running partial sum ``b_n^i``.
        query, gamma: ``[D]``, this sublayer's pseudo-query and key-RMSNorm gain.
        eps: RMSNorm epsilon.

    Returns:
        ``[..., D]`` in ``out``'s dtype: ``sigma * out + (1 - sigma) * partial`` with
        ``sigma = sigmoid(lse - z2)``, ``z2 = (query * gamma) . RMSNorm(partial)``, which equals
        the full softmax over ``[blocks..., partial]`` exactly.
    """
    check_merge_args(out, lse, partial, query, gamma)
    return _Merge.apply(out, lse, partial, query, gamma, eps)


def check_merge_args(out: Tensor, lse: Tensor, partial: Tensor, query: Tensor,
                     gamma: Tensor) -> None:
    """The merge's contract (shared by the Triton kernels): out/partial ``[..., D]``, lse
    ``[...]``, query/gamma ``[D]``."""
    if out.shape != partial.shape or lse.shape != out.shape[:-1]:
        raise ValueError(
            f"shape mismatch: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
            f"partial {tuple(partial.shape)}"
        )
    if query.shape != (out.shape[-1],) or gamma.shape != query.shape:
        raise ValueError(f"query/gamma must be [D={out.shape[-1]}]")


def attnres_lean(sources: Sequence[Tensor], query: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """Drop-in for :func:`attnres_naive` (one query over k sources) with the lean backward.

    Args:
        sources: k tensors ``[..., D]``; query, gamma: ``[D]``; eps: RMSNorm epsilon.

    Returns:
        ``[..., D]`` in the sources' dtype.
    """
    out, _ = attnres_phase1(sources, query.unsqueeze(0), gamma.unsqueeze(0), eps)
    return out.squeeze(0)


def block_attnres_chain_two_phase(
    embedding: Tensor,
    sublayer_fns: Sequence[SublayerFn],
    queries: Tensor,
    gammas: Tensor,
    block_size: int,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """Same contract as :func:`block_attnres_chain_naive`, computed with the two-phase scheme.

    Per block: one :func:`attnres_phase1` call batches all the block's queries over the
    completed blocks (possible because the queries do not depend on the input); then each
    sublayer merges that result with the block's running partial sum via
    :func:`attnres_merge` (the first sublayer of a block has no partial and uses the phase-1
    output directly). The final aggregate's query is batched into the last block's phase 1,
    since it attends over the same completed blocks (plus the last partial, merged after).
    """
    num_layers = _check_chain_args(sublayer_fns, queries, block_size)
    blocks: list[Tensor] = [embedding]
    inputs: list[Tensor] = []
    final: Tensor | None = None
    for start in range(0, num_layers, block_size):
        stop = min(start + block_size, num_layers)
        is_last = stop == num_layers
        q_stop = stop + 1 if is_last else stop  # include the final-aggregate query
        out, lse = attnres_phase1(blocks, queries[start:q_stop], gammas[start:q_stop], eps)
        # unbind (not indexing) so backward stacks the per-sublayer grads once instead of
        # materialising a zero-filled [S, ..., D] buffer per sublayer.
        outs, lses = out.unbind(0), lse.unbind(0)
        partial: Tensor | None = None
        for i, layer in enumerate(range(start, stop)):
            if partial is None:
                hidden = outs[i]
            else:
                hidden = attnres_merge(
                    outs[i], lses[i], partial, queries[layer], gammas[layer], eps
                )
            inputs.append(hidden)
            sub_out = sublayer_fns[layer](hidden)
            partial = sub_out if partial is None else partial + sub_out
        assert partial is not None
        if is_last:
            final = attnres_merge(
                outs[-1], lses[-1], partial, queries[num_layers], gammas[num_layers], eps
            )
        else:
            blocks = blocks + [partial]
    assert final is not None
    return inputs, final

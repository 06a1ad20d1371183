"""Fused Triton kernels for the two-phase Block-AttnRes op (forward and backward).

Drop-in replacements for :func:`.two_phase.attnres_phase1` / :func:`.two_phase.attnres_merge`
(same signatures, return conventions and dtypes); the math and the gradient formulas are the
ones in :mod:`.two_phase`'s docstring. Per token (``w_s = query_s * gamma_s``,
``r_j = rsqrt(mean(v_j**2) + eps)``)::

    z_j[s] = r_j (w_s . v_j)    lse[s] = logsumexp_j z_j[s]    o[s] = sum_j exp(z_j[s] - lse[s]) v_j

Statistics and accumulators run in fp32 (fp64 for fp64 inputs); ``o`` is stored in the sources'
dtype, ``lse`` in the statistics dtype. Nothing activation-sized is saved for backward: the
sources (alive in the model anyway), ``[S, D]`` queries/gains and the lse; rstd and logits are
recomputed in the backward kernels.

Kernels (grid: one program per tile of ``BLOCK_T`` tokens; every program handles all S queries,
padded to ``BLOCK_S = next_pow2(S)``, and all n sources, padded to ``BLOCK_N = next_pow2(n)``;
D is walked in chunks of ``BLOCK_D``, so any D works, powers of two or not):

``_phase1_fwd``
    pass 1, per source j (outer) and D chunk (inner): sum of squares and the S dots ``w_s . v_j``
    (broadcast-multiply-sum, no ``tl.dot``: no tf32 rounding, fp64 capable, and S is tiny, so the
    op is bandwidth bound anyway). The n logit rows are kept in registers as one
    ``[BLOCK_N, BLOCK_T, BLOCK_S]`` tensor, so the softmax over sources (max, sum-exp, lse) is
    done in registers without a scratch buffer.
    pass 2, per D chunk (outer) and source (inner): ``o[s] += a_j[s] v_j`` for all S queries at
    once, stored per chunk. Each source tile is therefore read twice per token tile (once per
    pass; the second may hit L2) and once for all S queries, against S reads for S
    separate ops. A single-pass version would need the whole ``[S, BLOCK_T, D]`` accumulator in
    registers, since a source's weight is only known after its full-D dot.
``_phase1_bwd``
    pass A, per D chunk (outer) and source (inner), so the ``[S, T, D]`` output gradient is read
    once, not once per source: sums of squares, ``w . v_j`` and ``g . v_j`` for all (j, s).
    Then in registers: rstd, logits, weights, ``dL/dz_j = a_j (g.v_j - g.o + g_lse)`` and the
    key-path coefficients. The lse is recomputed from the recomputed logits rather than loaded,
    so the weights are self-consistent (a single source gets a weight of exactly 1 and its
    queries a gradient of exactly 0, as in the torch op).
    pass B, per D chunk and source: the source gradient (value path + key path) in one store,
    and the ``[S, D]`` query gradient ``sum_t c_j[t, s] v_j[t]`` accumulated per program into a
    ``[tiles, S, D]`` fp32 (fp64) buffer that torch sums (deterministic, no atomics).
``_merge_fwd`` / ``_merge_bwd``
    per token tile: pass A reads the partial (and, in backward, o and the incoming gradient) to
    get the key RMSNorm, the logit ``z2`` and ``sigma = sigmoid(lse - z2)``; pass B writes
    ``h = lerp(partial, o, sigma)`` (forward) or the o / partial / lse gradients (backward), plus
    per-tile ``[D]`` query-gradient partials. Everything of the merge is fused; only the final
    reduction of the query-gradient partials and the ``w -> (query, gamma)`` chain rule (both
    ``[S, D]``-sized) run in torch.

How the n sources are passed. The sources are separate tensors (the model keeps them as a list);
stacking them into ``[n, T, D]`` would copy ``n·T·D`` elements per call. Instead the kernels get
the first source as the base pointer plus an int64 table of element offsets
``(data_ptr_j - data_ptr_0) / itemsize`` (a "pointer table" relative to one base, which also works
in the Triton interpreter on CPU tensors). The offsets are hinted as multiples of 16 bytes when
every source is 16-byte aligned (always, for whole allocations), so the loads can vectorise;
otherwise the hint is dropped. The cost is one tiny pinned, non-blocking host-to-device copy of
the offset table per call (no host sync). Source gradients are written into one ``[n, T, D]``
buffer and handed back as views (they are fresh tensors anyway, so this copies nothing).

Tile sizes are module constants (``FWD_TILE``, ``BWD_TILE``, ``MERGE_TILE``); the defaults are
reasonable first guesses for H100/H200 at the Kimi-48B shapes, not tuned (no GPU was available
when this was written).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .two_phase import _stat_dtype, check_merge_args, check_phase1_args

__all__ = ["attnres_phase1_triton", "attnres_merge_triton"]

#: (BLOCK_T, BLOCK_D, num_warps) per kernel. Overridable (tests shrink them for the interpreter).
FWD_TILE = (16, 64, 8)
BWD_TILE = (16, 32, 8)
MERGE_TILE = (8, 128, 4)
#: The phase-1 tiles are sized for up to this many queries per block (BLOCK_S; S = 6 in the 48B
#: model). The phase-1 kernels hold [BLOCK_T, BLOCK_S, BLOCK_D] tiles in registers, so for a larger
#: S :func:`phase1_launch_tile` shrinks BLOCK_D in proportion: compiled for sm_90, the paper's
#: S = 16 otherwise spills in the forward (bench/results/triton_tiles_sm90_compile_*).
PHASE1_TILE_QUERIES = 8


def phase1_launch_tile(tile: tuple[int, int, int], num_queries: int,
                       dim: int) -> tuple[int, int, int]:
    """The (BLOCK_T, BLOCK_D, num_warps) a phase-1 kernel is launched with for ``num_queries``
    queries and hidden size ``dim``: ``tile``'s BLOCK_D scaled down by BLOCK_S /
    PHASE1_TILE_QUERIES when BLOCK_S is larger (never below 16), and never above next_pow2(dim)."""
    block_t, block_d, warps = tile
    block_s = _np2(num_queries)
    if block_s > PHASE1_TILE_QUERIES:
        block_d = max(16, block_d * PHASE1_TILE_QUERIES // block_s)
    return block_t, min(block_d, _np2(dim)), warps


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _np2(x: int) -> int:
    return max(1, triton.next_power_of_2(x))


def _source_table(flats: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor, int]:
    """Base tensor, (possibly re-allocated) sources, int64 element offsets, offset hint.

    All ``flats`` are contiguous ``[T, D]`` of one dtype. A source whose address is not a whole
    number of elements away from the base (never for real allocations) is cloned.
    """
    item = flats[0].element_size()
    base = flats[0].data_ptr()
    fixed = []
    for f in flats:
        if (f.data_ptr() - base) % item:
            f = f.clone()
        fixed.append(f)
    offs = [(f.data_ptr() - base) // item for f in fixed]
    aligned = all(f.data_ptr() % 16 == 0 for f in fixed)
    hint = 16 // item if aligned and item < 16 else 1
    table = torch.tensor(offs, dtype=torch.int64)
    if flats[0].device.type == "cuda":  # pinned + non_blocking: no host sync per call
        table = table.pin_memory().to(flats[0].device, non_blocking=True)
    return fixed[0], fixed, table, hint


def _flat(t: Tensor, dim: int) -> Tensor:
    return t.reshape(-1, dim).contiguous()


def _device_guard(t: Tensor):
    """Launch on the tensor's GPU (triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- kernels


@triton.jit
def _src_ptr(src_base, src_offs, j, HINT: tl.constexpr):
    off = tl.load(src_offs + j)
    if HINT > 1:
        off = tl.multiple_of(off, HINT)
    return src_base + off


@triton.jit
def _phase1_indices(T, D, S, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's token tile (ids, mask, element offset of each token's row), query ids and
    mask, and source ids: the index set both phase-1 kernels work on."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    s = tl.arange(0, BLOCK_S)
    return t, t < T, t.to(tl.int64) * D, s, s < S, tl.arange(0, BLOCK_N)


@triton.jit
def _phase1_fwd(
    src_base, src_offs, w_ptr, o_ptr, lse_ptr,
    T, D, S, n, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, CDT: tl.constexpr, HINT: tl.constexpr,
):
    t, tmask, row, s, smask, nidx = _phase1_indices(T, D, S, BLOCK_T, BLOCK_S, BLOCK_N)

    # pass 1: logits of every (source, token, query), kept in registers
    Z = tl.full([BLOCK_N, BLOCK_T, BLOCK_S], float("-inf"), CDT)
    for j in range(n):
        vp = _src_ptr(src_base, src_offs, j, HINT)
        ss = tl.zeros([BLOCK_T], CDT)
        dots = tl.zeros([BLOCK_T, BLOCK_S], CDT)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            v = tl.load(vp + row[:, None] + d[None, :],
                        mask=tmask[:, None] & dmask[None, :], other=0.0).to(CDT)
            w = tl.load(w_ptr + s[:, None] * D + d[None, :],
                        mask=smask[:, None] & dmask[None, :], other=0.0)
            ss += tl.sum(v * v, axis=1)
            dots += tl.sum(v[:, None, :] * w[None, :, :], axis=2)
        r = 1.0 / tl.sqrt(ss / D + eps)
        z = dots * r[:, None]
        Z = tl.where((nidx == j)[:, None, None], z[None, :, :], Z)

    m = tl.max(Z, axis=0)  # [BT, BS]; source 0 is always real, so finite
    lse = m + tl.log(tl.sum(tl.exp(Z - m[None, :, :]), axis=0))
    A = tl.exp(Z - lse[None, :, :])  # padded sources: exp(-inf) = 0
    tl.store(lse_ptr + s[None, :].to(tl.int64) * T + t[:, None], lse,
             mask=tmask[:, None] & smask[None, :])

    # pass 2: o[s] = sum_j a_j[s] v_j, chunk by chunk over D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        acc = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_D], CDT)
        for j in range(n):
            vp = _src_ptr(src_base, src_offs, j, HINT)
            v = tl.load(vp + row[:, None] + d[None, :],
                        mask=tmask[:, None] & dmask[None, :], other=0.0).to(CDT)
            a = tl.sum(tl.where((nidx == j)[:, None, None], A, 0.0), axis=0)  # [BT, BS]
            acc += a[:, :, None] * v[:, None, :]
        optr = (o_ptr + s[None, :, None].to(tl.int64) * T * D + row[:, None, None]
                + d[None, None, :])
        omask = tmask[:, None, None] & smask[None, :, None] & dmask[None, None, :]
        tl.store(optr, acc.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _phase1_bwd(
    src_base, src_offs, w_ptr, go_ptr, glse_ptr, gsrc_ptr, gw_ptr,
    T, D, S, n, eps,
    HAS_GO: tl.constexpr, HAS_GLSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, CDT: tl.constexpr, HINT: tl.constexpr,
):
    t, tmask, row, s, smask, nidx = _phase1_indices(T, D, S, BLOCK_T, BLOCK_S, BLOCK_N)
    nmask = nidx < n
    g_rows = s[None, :, None].to(tl.int64) * T * D + row[:, None, None]  # [BT, BS, 1]
    gmask_ts = tmask[:, None, None] & smask[None, :, None]

    # pass A: sum of squares, w . v_j and g . v_j for every (source, token, query)
    SS = tl.zeros([BLOCK_N, BLOCK_T], CDT)
    WV = tl.zeros([BLOCK_N, BLOCK_T, BLOCK_S], CDT)
    GV = tl.zeros([BLOCK_N, BLOCK_T, BLOCK_S], CDT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        w = tl.load(w_ptr + s[:, None] * D + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        if HAS_GO:
            g = tl.load(go_ptr + g_rows + d[None, None, :],
                        mask=gmask_ts & dmask[None, None, :], other=0.0).to(CDT)
        for j in range(n):
            vp = _src_ptr(src_base, src_offs, j, HINT)
            v = tl.load(vp + row[:, None] + d[None, :],
                        mask=tmask[:, None] & dmask[None, :], other=0.0).to(CDT)
            sel = nidx == j
            SS = tl.where(sel[:, None], SS + tl.sum(v * v, axis=1)[None, :], SS)
            wv = tl.sum(v[:, None, :] * w[None, :, :], axis=2)
            WV = tl.where(sel[:, None, None], WV + wv[None, :, :], WV)
            if HAS_GO:
                gv = tl.sum(v[:, None, :] * g, axis=2)
                GV = tl.where(sel[:, None, None], GV + gv[None, :, :], GV)

    # in registers: rstd, logits, weights, dL/dz and the key-path coefficients
    R = 1.0 / tl.sqrt(SS / D + eps)  # [BN, BT]
    Zb = tl.where(nmask[:, None, None], WV * R[:, :, None], float("-inf"))
    m = tl.max(Zb, axis=0)
    lse = m + tl.log(tl.sum(tl.exp(Zb - m[None, :, :]), axis=0))  # recomputed, see docstring
    A = tl.exp(Zb - lse[None, :, :])  # 0 for padded sources
    A = tl.where(smask[None, None, :], A, 0.0)
    if HAS_GO:
        GO = tl.sum(A * GV, axis=0)  # g . o
        DZ = A * (GV - GO[None, :, :])
    else:
        DZ = tl.zeros([BLOCK_N, BLOCK_T, BLOCK_S], CDT)
    if HAS_GLSE:
        glse = tl.load(glse_ptr + s[None, :].to(tl.int64) * T + t[:, None],
                       mask=tmask[:, None] & smask[None, :], other=0.0).to(CDT)
        DZ += A * glse[None, :, :]
    C = DZ * R[:, :, None]  # dL/dz * r
    Zf = tl.where(nmask[:, None, None], Zb, 0.0)
    COEF = tl.sum(DZ * Zf, axis=2) * R * R / D  # [BN, BT]

    # pass B: source gradients and per-tile query-gradient partials
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        tdmask = tmask[:, None] & dmask[None, :]
        w = tl.load(w_ptr + s[:, None] * D + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        if HAS_GO:
            g = tl.load(go_ptr + g_rows + d[None, None, :],
                        mask=gmask_ts & dmask[None, None, :], other=0.0).to(CDT)
        gw = tl.zeros([BLOCK_S, BLOCK_D], CDT)
        for j in range(n):
            vp = _src_ptr(src_base, src_offs, j, HINT)
            v = tl.load(vp + row[:, None] + d[None, :], mask=tdmask, other=0.0).to(CDT)
            sel = nidx == j
            c = tl.sum(tl.where(sel[:, None, None], C, 0.0), axis=0)  # [BT, BS]
            coef = tl.sum(tl.where(sel[:, None], COEF, 0.0), axis=0)  # [BT]
            grad = tl.sum(c[:, :, None] * w[None, :, :], axis=1) - coef[:, None] * v
            if HAS_GO:
                a = tl.sum(tl.where(sel[:, None, None], A, 0.0), axis=0)
                grad += tl.sum(a[:, :, None] * g, axis=1)
            gp = gsrc_ptr + (j * T + t).to(tl.int64)[:, None] * D + d[None, :]
            tl.store(gp, grad.to(gsrc_ptr.dtype.element_ty), mask=tdmask)
            gw += tl.sum(c[:, :, None] * v[:, None, :], axis=0)
        gwp = gw_ptr + tl.program_id(0).to(tl.int64) * S * D + s[:, None] * D + d[None, :]
        tl.store(gwp, gw, mask=smask[:, None] & dmask[None, :])


@triton.jit
def _merge_stats(p_ptr, w_ptr, row, tmask, D, eps, BLOCK_T: tl.constexpr,
                 BLOCK_D: tl.constexpr, CDT: tl.constexpr):
    """(rstd [BT], z2 [BT]) of the partial sum rows."""
    ss = tl.zeros([BLOCK_T], CDT)
    dot = tl.zeros([BLOCK_T], CDT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        p = tl.load(p_ptr + row[:, None] + d[None, :],
                    mask=tmask[:, None] & dmask[None, :], other=0.0).to(CDT)
        w = tl.load(w_ptr + d, mask=dmask, other=0.0)
        ss += tl.sum(p * p, axis=1)
        dot += tl.sum(p * w[None, :], axis=1)
    r = 1.0 / tl.sqrt(ss / D + eps)
    return r, dot * r


@triton.jit
def _merge_fwd(
    o_ptr, lse_ptr, p_ptr, w_ptr, h_ptr, T, D, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    row = t.to(tl.int64) * D
    r, z2 = _merge_stats(p_ptr, w_ptr, row, tmask, D, eps, BLOCK_T, BLOCK_D, CDT)
    lse = tl.load(lse_ptr + t, mask=tmask, other=0.0).to(CDT)
    sig = 1.0 / (1.0 + tl.exp(z2 - lse))  # sigmoid(lse - z2)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = tmask[:, None] & (d < D)[None, :]
        offs = row[:, None] + d[None, :]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CDT)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(CDT)
        # torch.lerp(p, o, sig): the two-sided formula keeps either endpoint exact
        sg = sig[:, None]
        h = tl.where(sg < 0.5, p + sg * (o - p), o - (o - p) * (1.0 - sg))
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_bwd(
    o_ptr, lse_ptr, p_ptr, w_ptr, gh_ptr, go_ptr, glse_ptr, gp_ptr, gw_ptr, T, D, eps,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    row = t.to(tl.int64) * D
    # pass A: key RMSNorm, logit, and g . (o - p)
    ss = tl.zeros([BLOCK_T], CDT)
    dot = tl.zeros([BLOCK_T], CDT)
    gd = tl.zeros([BLOCK_T], CDT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        mask = tmask[:, None] & dmask[None, :]
        offs = row[:, None] + d[None, :]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CDT)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(CDT)
        g = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(CDT)
        w = tl.load(w_ptr + d, mask=dmask, other=0.0)
        ss += tl.sum(p * p, axis=1)
        dot += tl.sum(p * w[None, :], axis=1)
        gd += tl.sum(g * (o - p), axis=1)
    r = 1.0 / tl.sqrt(ss / D + eps)
    z2 = dot * r
    lse = tl.load(lse_ptr + t, mask=tmask, other=0.0).to(CDT)
    sig = 1.0 / (1.0 + tl.exp(z2 - lse))
    dlogit = gd * sig * (1.0 - sig)  # dL/d(lse - z2)
    tl.store(glse_ptr + t, dlogit.to(glse_ptr.dtype.element_ty), mask=tmask)
    c = -dlogit * r  # dL/dz2 * r
    coef = c * z2 * r / D
    c = tl.where(tmask, c, 0.0)
    # pass B: o / partial gradients and the query-gradient partial of this tile
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        mask = tmask[:, None] & dmask[None, :]
        offs = row[:, None] + d[None, :]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CDT)
        g = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(CDT)
        w = tl.load(w_ptr + d, mask=dmask, other=0.0)
        tl.store(go_ptr + offs, (sig[:, None] * g).to(go_ptr.dtype.element_ty), mask=mask)
        gp = (1.0 - sig)[:, None] * g + c[:, None] * w[None, :] - coef[:, None] * p
        tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=mask)
        gw = tl.sum(c[:, None] * p, axis=0)
        tl.store(gw_ptr + pid.to(tl.int64) * D + d, gw, mask=dmask)


# --------------------------------------------------------------------------- autograd wrappers


class _Phase1Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eps: float, queries: Tensor, gammas: Tensor, *blocks: Tensor):
        lead, dim = blocks[0].shape[:-1], blocks[0].shape[-1]
        dtype = blocks[0].dtype
        sdt = _stat_dtype(dtype)
        num_q, n = queries.shape[0], len(blocks)
        w = (queries.to(sdt) * gammas.to(sdt)).contiguous()
        base, flats, table, hint = _source_table([_flat(b, dim) for b in blocks])
        num_tok = base.shape[0]
        out = torch.empty(num_q, num_tok, dim, dtype=dtype, device=base.device)
        lse = torch.empty(num_q, num_tok, dtype=sdt, device=base.device)
        block_t, block_d, warps = phase1_launch_tile(FWD_TILE, num_q, dim)
        if num_tok:
            with _device_guard(base):
                _phase1_fwd[(triton.cdiv(num_tok, block_t),)](
                    base, table, w, out, lse, num_tok, dim, num_q, n, eps,
                    BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=_np2(num_q), BLOCK_N=_np2(n),
                    CDT=_tl_dtype(sdt), HINT=hint, num_warps=warps,
                )
        del flats
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(queries, gammas, lse, *blocks)
        return out.reshape(num_q, *lead, dim), lse.reshape(num_q, *lead)

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        queries, gammas, lse, *blocks = ctx.saved_tensors
        dim, dtype = blocks[0].shape[-1], blocks[0].dtype
        sdt = lse.dtype
        num_q, n = queries.shape[0], len(blocks)
        w = (queries.to(sdt) * gammas.to(sdt)).contiguous()
        base, flats, table, hint = _source_table([_flat(b, dim) for b in blocks])
        num_tok = base.shape[0]
        block_t, block_d, warps = phase1_launch_tile(BWD_TILE, num_q, dim)
        tiles = triton.cdiv(num_tok, block_t)
        grad_src = torch.empty(n, num_tok, dim, dtype=dtype, device=base.device)
        grad_w_part = torch.empty(tiles, num_q, dim, dtype=sdt, device=base.device)
        go = grad_out.reshape(num_q, num_tok, dim).contiguous() if grad_out is not None else w
        gl = grad_lse.reshape(num_q, num_tok).contiguous() if grad_lse is not None else w
        if num_tok:
            with _device_guard(base):
                _phase1_bwd[(tiles,)](
                    base, table, w, go, gl, grad_src, grad_w_part,
                    num_tok, dim, num_q, n, ctx.eps,
                    HAS_GO=grad_out is not None, HAS_GLSE=grad_lse is not None,
                    BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=_np2(num_q), BLOCK_N=_np2(n),
                    CDT=_tl_dtype(sdt), HINT=hint, num_warps=warps,
                )
        del flats
        grad_w = grad_w_part.sum(0)
        need_q, need_g = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_q = (grad_w * gammas.to(sdt)).to(queries.dtype) if need_q else None
        grad_g = (grad_w * queries.to(sdt)).to(gammas.dtype) if need_g else None
        grad_blocks = [
            grad_src[j].view(blocks[j].shape) if ctx.needs_input_grad[3 + j] else None
            for j in range(n)
        ]
        return (None, grad_q, grad_g, *grad_blocks)


def attnres_phase1_triton(
    blocks: Sequence[Tensor], queries: Tensor, gammas: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`.two_phase.attnres_phase1` (same arguments and results)."""
    check_phase1_args(blocks, queries, gammas)
    return _Phase1Triton.apply(eps, queries, gammas, *blocks)


class _MergeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, gamma: Tensor,
                eps: float):
        dim = partial.shape[-1]
        sdt = _stat_dtype(torch.promote_types(out.dtype, partial.dtype))
        w = (query.to(sdt) * gamma.to(sdt)).contiguous()
        o, p = _flat(out, dim), _flat(partial, dim)
        ls = lse.reshape(-1).contiguous()
        num_tok = o.shape[0]
        hidden = torch.empty_like(o)
        block_t, block_d, warps = MERGE_TILE
        block_d = min(block_d, _np2(dim))
        if num_tok:
            with _device_guard(o):
                _merge_fwd[(triton.cdiv(num_tok, block_t),)](
                    o, ls, p, w, hidden, num_tok, dim, eps,
                    BLOCK_T=block_t, BLOCK_D=block_d, CDT=_tl_dtype(sdt), num_warps=warps,
                )
        ctx.eps = eps
        ctx.save_for_backward(out, lse, partial, query, gamma)
        return hidden.reshape(out.shape)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        out, lse, partial, query, gamma = ctx.saved_tensors
        dim = partial.shape[-1]
        sdt = _stat_dtype(torch.promote_types(out.dtype, partial.dtype))
        w = (query.to(sdt) * gamma.to(sdt)).contiguous()
        o, p = _flat(out, dim), _flat(partial, dim)
        ls = lse.reshape(-1).contiguous()
        g = _flat(grad_h, dim)
        num_tok = o.shape[0]
        block_t, block_d, warps = MERGE_TILE
        block_d = min(block_d, _np2(dim))
        tiles = triton.cdiv(num_tok, block_t)
        grad_o = torch.empty_like(o)
        grad_p = torch.empty_like(p)
        grad_lse = torch.empty_like(ls)
        grad_w_part = torch.empty(tiles, dim, dtype=sdt, device=o.device)
        if num_tok:
            with _device_guard(o):
                _merge_bwd[(tiles,)](
                    o, ls, p, w, g, grad_o, grad_lse, grad_p, grad_w_part, num_tok, dim, ctx.eps,
                    BLOCK_T=block_t, BLOCK_D=block_d, CDT=_tl_dtype(sdt), num_warps=warps,
                )
        need = ctx.needs_input_grad
        grad_q = grad_g = None
        if need[3] or need[4]:
            grad_w = grad_w_part.sum(0)
            if need[3]:
                grad_q = (grad_w * gamma.to(sdt)).to(query.dtype)
            if need[4]:
                grad_g = (grad_w * query.to(sdt)).to(gamma.dtype)
        return (
            grad_o.view(out.shape) if need[0] else None,
            grad_lse.view(lse.shape) if need[1] else None,
            grad_p.view(partial.shape) if need[2] else None,
            grad_q,
            grad_g,
            None,
        )


def attnres_merge_triton(
    out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, gamma: Tensor, eps: float
) -> Tensor:
    """Triton version of :func:`.two_phase.attnres_merge` (same arguments and result)."""
    check_merge_args(out, lse, partial, query, gamma)
    return _MergeTriton.apply(out, lse, partial, query, gamma, eps)

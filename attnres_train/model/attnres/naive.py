"""Ground-truth (plain autograd) AttnRes and Block-AttnRes reference drivers.

Everything here is written for clarity, not speed or memory: it materialises the stacked
sources and the normalised keys and lets autograd save whatever it wants. Tests compare the
memory-lean implementation in :mod:`two_phase` against these functions in fp64.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def attnres_naive(sources: Sequence[Tensor], query: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """Depth-wise softmax attention over ``sources`` (paper Eqs. 2-4), plain autograd.

    Args:
        sources: k tensors of identical shape ``[..., D]`` (e.g. ``[S, B, D]``). They are both the
            keys (after a gain-free RMSNorm) and the values (raw).
        query: pseudo-query ``w_l``, shape ``[D]``.
        gamma: RMSNorm gain of the keys, shape ``[D]``. Only ``query * gamma`` matters, so the gain
            is folded into the query instead of into every key.
        eps: RMSNorm epsilon.

    Returns:
        ``[..., D]``: ``sum_j a_j v_j`` with ``a = softmax_j(z)`` (per token, over the depth axis)
        and ``z_j = sum_d query[d] gamma[d] v_j[d] / rms(v_j)``. No temperature. Computed in the
        input dtype.
    """
    if len(sources) == 0:
        raise ValueError("attnres_naive needs at least one source")
    values = torch.stack(list(sources), dim=0)  # [k, ..., D]
    keys = values * torch.rsqrt(values.pow(2).mean(dim=-1, keepdim=True) + eps)
    logits = (keys * (query * gamma)).sum(dim=-1)  # [k, ...]
    weights = torch.softmax(logits, dim=0)
    return (weights.unsqueeze(-1) * values).sum(dim=0)


SublayerFn = Callable[[Tensor], Tensor]


def _check_chain_args(sublayer_fns: Sequence[SublayerFn], queries: Tensor, block_size: int) -> int:
    num_layers = len(sublayer_fns)
    if num_layers < 1:
        raise ValueError("need at least one sublayer")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if queries.shape[0] != num_layers + 1:
        raise ValueError(
            f"queries/gammas need L+1={num_layers + 1} rows (one per sublayer + the final "
            f"aggregate), got {queries.shape[0]}"
        )
    return num_layers


def block_attnres_chain_naive(
    embedding: Tensor,
    sublayer_fns: Sequence[SublayerFn],
    queries: Tensor,
    gammas: Tensor,
    block_size: int,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """Run L sublayers wired with Block AttnRes (paper Eq. 6), using :func:`attnres_naive`.

    Sublayer ``l`` (0-based) attends over ``[b_0 = embedding, completed blocks..., partial]``
    where the partial sum of the current block is present only if ``l % block_size != 0``.
    Its output starts a new partial sum if ``l % block_size == 0``, otherwise it is added to it;
    at ``l % block_size == 0, l > 0`` the previous partial is first frozen into a completed
    block. ``block_size == 1`` is Full AttnRes; ``block_size >= L`` is one block (a standard
    residual stream with the embedding kept as a separate source).

    Args:
        embedding: ``b_0``, shape ``[..., D]``.
        sublayer_fns: L callables ``[..., D] -> [..., D]``.
        queries, gammas: ``[L+1, D]``; row ``l`` for sublayer ``l``, the last row for the final
            aggregate.
        block_size: sublayers per block (the paper's S).
        eps: RMSNorm epsilon.

    Returns:
        ``(inputs, final)``: the L sublayer inputs ``h_l`` and the final aggregate over
        ``[b_0, completed blocks..., last partial]`` (what the final norm / LM head would see).
    """
    num_layers = _check_chain_args(sublayer_fns, queries, block_size)
    blocks: list[Tensor] = [embedding]
    partial: Tensor | None = None
    inputs: list[Tensor] = []
    for layer, fn in enumerate(sublayer_fns):
        if layer % block_size == 0 and layer > 0:
            assert partial is not None
            blocks.append(partial)
            partial = None
        sources = blocks if partial is None else blocks + [partial]
        hidden = attnres_naive(sources, queries[layer], gammas[layer], eps)
        inputs.append(hidden)
        out = fn(hidden)
        partial = out if partial is None else partial + out
    assert partial is not None
    final = attnres_naive(blocks + [partial], queries[num_layers], gammas[num_layers], eps)
    return inputs, final

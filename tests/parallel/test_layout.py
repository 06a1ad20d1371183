"""Per-hop payloads from the static layout: the closed forms and the bad-layout errors."""

import pytest

from attnres_train.errors import ConfigError
from attnres_train.model.attnres.state import state_after
from parallel.layout import (
    aligned_blocks_per_chunk,
    build_layout,
    closed_forms,
    expected_aligned,
    hop_bytes,
    naive_full,
    paper_eq7,
    paper_eq8,
)


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("Np", [1, 2])
def test_aligned_layouts_match_closed_forms(P, V, Np):
    S = 2  # one layer = one block: chunk boundaries are block boundaries
    layers = Np * S // 2 * P * V
    cached = build_layout(layers, P, V, S)
    naive = build_layout(layers, P, V, S, cache=False)
    assert cached.tensors_per_microbatch() == expected_aligned(P, V, Np)
    assert naive.tensors_per_microbatch() == naive_full(P, V, Np) == paper_eq7(P, V, Np) + P * V - 1
    # the paper counts non-embedding blocks: Eq. 7 is the naive hops' blocks other than block 0;
    # the naive scheme sends the embedding on all C-1 hops, ours on P-1 (each rank caches it)
    assert paper_eq7(P, V, Np) == sum(len([b for b in h.blocks if b != 0]) for h in naive.hops)
    assert sum(0 in h.blocks for h in cached.hops) == P - 1
    if V > 1:  # we send less than the paper's cached scheme (which re-sends the receiver's own blocks)
        assert cached.tensors_per_microbatch() < paper_eq8(P, V, Np)
    assert all(not h.partial for h in cached.hops)


def test_hops_carry_only_what_the_receiver_lacks():
    # P=4, V=2, 8 layers, one block per layer (block j completes in chunk j-1). Rank 0's second
    # chunk (4) already holds the embedding and block 1 (from its first chunk): hop 3 -> 4 carries
    # blocks 2, 3, 4. Rank 1's second chunk (5) holds 0, 1, 2: hop 4 -> 5 carries 3, 4, 5.
    lay = build_layout(8, 4, 2, 2)
    assert [h.blocks for h in lay.hops] == [(0, 1), (0, 1, 2), (0, 1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6), (5, 6, 7)]


def test_unaligned_layout_has_partials():
    # block size 3 sublayers, 2 sublayers per layer: blocks span chunk boundaries
    lay = build_layout(4, 2, 2, 3)
    assert [(h.blocks, h.partial) for h in lay.hops] == [((0,), True), ((1,), True), ((2,), False)]
    assert lay.tensors_per_hop() == [2, 2, 1]


def test_uneven_explicit_layout():
    lay = build_layout(6, 2, 1, 2, layers_per_stage=[2, 4])
    assert lay.layers == (2, 4) and [h.blocks for h in lay.hops] == [(0, 1, 2)]


def test_standard_residual_is_one_tensor_per_hop():
    assert build_layout(8, 4, 2, None).tensors_per_hop() == [1] * 7


@pytest.mark.parametrize("args,match", [
    ((6, 4, 1), r"parallel.pp=4: 6 layers do not split evenly into pp\*vpp = 4 chunks; use pp\*vpp in \[1, 2, 3, 6\]"),
    ((4, 2, 4), r"parallel.vpp=4: 4 layers cannot fill pp\*vpp = 8 pipeline chunks"),
])
def test_bad_layouts(args, match):
    with pytest.raises(ConfigError, match=match):
        build_layout(*args, block_size=2)


def test_explicit_layout_must_sum_to_model():
    with pytest.raises(ConfigError, match=r"parallel.layers_per_stage.*sum to 5 but the model has model.num_layers=6"):
        build_layout(6, 2, 1, 2, layers_per_stage=[2, 3])
    with pytest.raises(ConfigError, match=r"one layer count per pipeline chunk: pp\*vpp = 2\*2 = 4"):
        build_layout(6, 2, 2, 2, layers_per_stage=[3, 3])


@pytest.mark.parametrize("layers_per_stage,block_size", [(None, 2), (None, 3), ([1, 3, 3, 1], 3), (None, 1)])
def test_state_at_follows_the_block_state_rule(layers_per_stage, block_size):
    lay = build_layout(8, 2, 2, block_size, layers_per_stage=layers_per_stage)
    for c in range(lay.num_chunks + 1):  # num_chunks: the state after the last chunk
        assert lay.state_at(c) == state_after(2 * sum(lay.layers[:c]), block_size)
    assert lay.state_at(lay.num_chunks) == state_after(16, block_size)
    # a hop carries the partial sum exactly when a block spans the boundary
    assert [h.partial for h in lay.hops] == [lay.state_at(c + 1).has_partial for c in range(lay.num_chunks - 1)]


def test_closed_forms_tiny_pp2_vpp2():
    # tiny (4 layers, S=2) on pp=2 x vpp=2: one block per chunk. Ours 4 tensors; the paper's
    # Eq. 8 5 and Eq. 7 6 (non-embedding blocks); the naive scheme's full count 6 + 3 = 9.
    lay = build_layout(4, 2, 2, 2)
    forms = closed_forms(lay.pp, lay.vpp, lay.layers, lay.block_size)
    assert (forms.blocks_per_chunk, forms.expected, forms.eq8, forms.eq7, forms.naive_full) == (1, 4, 5, 6, 9)
    assert closed_forms(2, 2, (1, 1, 1, 1), 2, cache=False).expected == 9
    payload = hop_bytes(lay, seq=64, micro_batch=8, hidden=128, elem_bytes=2, tp=2)
    tb = 64 * 8 * 128 * 2
    assert payload.tensor_bytes == tb and payload.tensors == (2, 1, 1)  # hop 0 -> 1: embedding + block 1
    assert payload.bytes == (2 * tb, tb, tb) and payload.bytes_per_tp_rank == (tb, tb // 2, tb // 2)
    assert payload.closed_bytes("eq7") == 6 * tb and payload.closed_bytes("expected") == sum(payload.bytes)


@pytest.mark.parametrize("layers,block_size,np_", [
    ((1, 1, 1, 1), 2, 1), ((2, 2), 2, 2), ((3, 3), 6, 1), ((2, 2), 3, None), ((2, 3), 2, None), ((2, 2), None, None),
])
def test_aligned_blocks_per_chunk(layers, block_size, np_):
    assert aligned_blocks_per_chunk(layers, block_size) == np_


def test_closed_forms_not_applicable():
    assert closed_forms(2, 2, (1, 1, 1, 1), None) is None  # standard residual
    assert closed_forms(2, 1, (2, 2), 3) is None  # blocks span chunk boundaries
    assert closed_forms(1, 1, (4,), 2) is None  # no pipeline hops
    assert hop_bytes(build_layout(4, 2, 1, 3), seq=4, micro_batch=1, hidden=8, elem_bytes=4).closed_bytes("eq8") is None

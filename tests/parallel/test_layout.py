"""Per-hop payloads from the static layout: the closed forms and the bad-layout errors."""

import pytest

from attnres_train.config.validate import ConfigError
from parallel.layout import build_layout, expected_aligned, paper_eq7, paper_eq8


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("Np", [1, 2])
def test_aligned_layouts_match_closed_forms(P, V, Np):
    S = 2  # one layer = one block: chunk boundaries are block boundaries
    layers = Np * S // 2 * P * V
    cached = build_layout(layers, P, V, S)
    naive = build_layout(layers, P, V, S, cache=False)
    assert cached.tensors_per_microbatch() == expected_aligned(P, V, Np)
    assert naive.tensors_per_microbatch() == paper_eq7(P, V, Np)
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

"""The hand-over of one rank's chunks through ChunkIO and BlockCache, without processes.

P=2, V=2, one layer per chunk, block size 2 sublayers (every chunk completes one block). Rank 0
runs chunks 0 and 2: chunk 0 sends blocks (0, 1); hop 1 -> 2 carries only block 2, because rank 0
still holds blocks 0 and 1 from chunk 0. Chunk 2 uses detached copies of those, and their gradients
are deposited into chunk 0's graph when its backward reaches them.
"""

import pytest
import torch

from attnres_train.model.attnres.state import BlockState
from parallel.layout import build_layout
from parallel.payload import BlockCache, ChunkIO

S, B, D = 3, 2, 4


def test_cached_blocks_deposit_their_gradients_into_the_owner():
    layout = build_layout(4, 2, 2, 2)
    assert [h.blocks for h in layout.hops] == [(0, 1), (2,), (3,)]
    cache = BlockCache(layout, rank=0)
    io0, io2 = ChunkIO(cache, 0), ChunkIO(cache, 2)
    x = torch.randn(S, B, D, dtype=torch.float64, requires_grad=True)

    with io0.micro_batch(0):  # chunk 0: the embedding and the block its layer completes
        emb = x * 1.0
        b1 = emb * 2.0
        sent = io0.send(BlockState([emb, b1]))
    assert torch.equal(sent, torch.cat([emb, b1]))

    received = torch.randn(S, B, D, dtype=torch.float64, requires_grad=True)  # block 2, from rank 1
    with io2.micro_batch(0):
        state = io2.receive(received)
    assert len(state.blocks) == 3 and state.partial is None
    assert state.blocks[0] is not emb and torch.equal(state.blocks[0], emb)  # a detached copy
    assert torch.equal(state.blocks[1], b1) and torch.equal(state.blocks[2], received)
    assert cache.owners == {}  # chunk 2 is rank 0's last chunk: no more lookups for micro-batch 0

    # backward as the schedule runs it: the later chunk first, then chunk 0 with the sent gradient
    (3.0 * state.blocks[0] + 5.0 * state.blocks[1] + state.blocks[2]).sum().backward()
    assert torch.equal(received.grad, torch.ones_like(received))
    sent.backward(torch.ones_like(sent))
    # d/dx: emb's own slice 1 + deposit 3, plus 2 x (b1's slice 1 + deposit 5)
    assert torch.equal(x.grad, torch.full_like(x, 1.0 + 3.0 + 2.0 * (1.0 + 5.0)))
    assert cache.consumers == {}  # every deposit was collected


def test_state_is_exchanged_only_inside_a_micro_batch():
    io = ChunkIO(BlockCache(build_layout(4, 2, 2, 2), rank=0), 2)
    with pytest.raises(RuntimeError, match=r"pipeline chunk 2: .*inside ChunkIO.micro_batch\(mb\)"):
        io.receive(torch.zeros(S, B, D))

"""What a pipeline chunk receives and sends under Block AttnRes, and the rank-local cache.

Per micro-batch, each rank keeps the block summaries it has seen (received, or completed in one of
its chunks). A chunk's input state is assembled from the received payload plus that cache; its
output payload holds only what the next rank lacks (parallel/layout.py decides which blocks).

`ChunkIO` is the decoder's `StageIO` (attnres_train/model/attnres/state.py) for one chunk: the
decoder calls `receive(payload)` / `send(state)` from its forward, and `Pipeline.forward_step`
wraps that forward in `chunk_io.micro_batch(mb)`, which names the micro-batch the cache works on.

Gradients of cached blocks ("deposits"): the first appearance of a block on a rank (a slice of a
received payload, or a block completed in a chunk) is its *owner*. Later chunks of the same rank use
a detached leaf copy; their backward fills the leaf's .grad. A hook on the owner adds those grads
when the owner's backward reaches it, so received blocks pass the full gradient back to the rank
that sent them. Megatron's interleaved schedule runs a micro-batch's later chunk backward before
its earlier chunks on the same rank, so every deposit is in place when the owner's hook fires.
Design notes: docs/pipeline.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from attnres_train.model.attnres.state import BlockState
from parallel.layout import StageLayout


class BlockCache:
    """Rank-local store of block summaries, per micro-batch, with gradient deposits."""

    def __init__(self, layout: StageLayout, rank: int):
        self.layout = layout
        self.rank = rank
        self.last_chunk = max(layout.chunks_of_rank(rank))
        self.owners: dict = {}  # mb -> {block id: owner tensor}
        self.consumers: dict = {}  # (mb, block id) -> [leaf tensors used by later chunks]

    def _own(self, mb: int, block: int, tensor: torch.Tensor) -> None:
        self.owners.setdefault(mb, {})[block] = tensor
        if tensor.requires_grad:
            leaves = self.consumers.setdefault((mb, block), [])

            def deposit(grad, leaves=leaves, key=(mb, block)):
                for leaf in leaves:
                    if leaf.grad is not None:
                        grad = grad + leaf.grad
                self.consumers.pop(key, None)
                return grad

            tensor.register_hook(deposit)

    def _use(self, mb: int, block: int) -> torch.Tensor:
        owner = self.owners[mb][block]
        leaf = owner.detach().requires_grad_(owner.requires_grad)
        if owner.requires_grad:
            self.consumers[(mb, block)].append(leaf)
        return leaf

    def input_state(self, chunk: int, mb: int, payload: torch.Tensor) -> BlockState:
        """Split the received payload [k·s, b, d] and fill in the blocks this rank already holds."""
        n_blocks = self.layout.state_at(chunk).num_blocks
        hop = self.layout.hops[chunk - 1]
        pieces = payload.chunk(hop.num_tensors, dim=0)
        received = dict(zip(hop.blocks, pieces))
        blocks = []
        for b in range(n_blocks):
            if b in received:
                self._own(mb, b, received[b])
                blocks.append(received[b])
            else:
                blocks.append(self._use(mb, b))
        return BlockState(blocks, pieces[-1] if hop.partial else None)

    def output_payload(self, chunk: int, mb: int, state: BlockState) -> torch.Tensor:
        """Register the blocks `chunk` completed, then pack what the next rank lacks."""
        first_new = self.layout.state_at(chunk).num_blocks if chunk > 0 else 0
        for b in range(first_new, len(state.blocks)):
            self._own(mb, b, state.blocks[b])
        hop = self.layout.hops[chunk]
        parts = [state.blocks[b] for b in hop.blocks] + ([state.partial] if hop.partial else [])
        return torch.cat(parts, dim=0)

    def finish_forward(self, chunk: int, mb: int) -> None:
        """After the rank's last chunk of `mb` ran forward, later chunks need no owner lookups;
        the autograd graph (and the deposit hooks) keep what backward needs."""
        if chunk == self.last_chunk:
            self.owners.pop(mb, None)

    def clear(self) -> None:
        self.owners.clear()
        self.consumers.clear()


class ChunkIO:
    """The StageIO of one chunk of this rank: payloads <-> BlockState through the rank's BlockCache."""

    def __init__(self, cache: BlockCache, chunk: int):
        self.cache = cache
        self.chunk = chunk
        self._mb: Optional[int] = None

    @contextmanager
    def micro_batch(self, mb: int) -> Iterator["ChunkIO"]:
        """Around the chunk's forward of micro-batch `mb`: receive/send work on `mb`'s cache entry;
        afterwards the cache drops what later chunks of this rank no longer look up."""
        self._mb = mb
        try:
            yield self
        finally:
            self._mb = None
        self.cache.finish_forward(self.chunk, mb)

    def _current_mb(self) -> int:
        if self._mb is None:
            raise RuntimeError(f"pipeline chunk {self.chunk}: the block state is exchanged only inside "
                               "ChunkIO.micro_batch(mb) (opened by parallel.Pipeline.forward_step)")
        return self._mb

    def receive(self, payload: torch.Tensor) -> BlockState:
        return self.cache.input_state(self.chunk, self._current_mb(), payload)

    def send(self, state: BlockState) -> torch.Tensor:
        return self.cache.output_payload(self.chunk, self._current_mb(), state)

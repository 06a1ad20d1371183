"""The AttnRes depth state between sublayers, and the rule that sizes it.

After `done` sublayers (every layer has two: its attention and its FFN) with `S` sublayers per
block, the state is

    blocks  = [b_0 = token embedding, b_1, ..., b_{done // S}]   (completed block sums)
    partial = the running sum of the current block, present iff done % S != 0

A block's partial becomes a completed block right after its last sublayer. The standard residual
has no block state (block size None); Full AttnRes is block size 1. See docs/attnres.md.

Between pipeline chunks the state travels as one packed tensor; `StageIO` is the interface through
which a chunk's decoder turns the received tensor into its input state and its output state into
the tensor it hands on (parallel/payload.py implements it).

No heavy imports here: the model, the pipeline runtime and the planner all share this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class BlockState:
    """blocks: [b_0, completed block sums...], each [S, B, D]; partial: [S, B, D] or None."""

    blocks: list = field(default_factory=list)
    partial: Optional["Tensor"] = None

    def sources(self) -> list:
        """What the next sublayer mixes: the blocks, then the partial sum if any."""
        return self.blocks + ([self.partial] if self.partial is not None else [])


class StageIO(Protocol):
    """How a pipeline chunk receives and hands over its BlockState (one object per chunk).

    A non-first chunk's decoder calls `receive` with the tensor megatron's schedule received
    (delivered through `set_input_tensor`); a non-last chunk's decoder returns `send(state)` from
    its forward, and megatron ships exactly that tensor to the next stage (and its gradient back).
    """

    def receive(self, payload: "Tensor") -> BlockState:
        """The chunk's input state from the received payload [k·S, B, D] (k tensors stacked)."""
        ...

    def send(self, state: BlockState) -> "Tensor":
        """The payload [k·S, B, D] the next chunk receives, packed from this chunk's output state."""
        ...


class StateShape(NamedTuple):
    """How many tensors a BlockState holds: blocks (embedding included), and whether a partial exists."""

    num_blocks: int
    has_partial: bool

    @property
    def num_tensors(self) -> int:
        return self.num_blocks + int(self.has_partial)


def state_after(done: int, block_size: int) -> StateShape:
    """The shape of the state after `done` sublayers with `block_size` sublayers per block."""
    return StateShape(1 + done // block_size, done % block_size != 0)


def num_sublayers(model_cfg) -> int:
    """Every layer has two sublayers: its attention (KDA or MLA) and its FFN (dense or MoE)."""
    return 2 * model_cfg.num_layers


def effective_block_size(model_cfg) -> Optional[int]:
    """Sublayers per AttnRes block: None for the standard residual, 1 for Full AttnRes."""
    residual = str(getattr(model_cfg.residual, "value", model_cfg.residual))
    return {"standard": None, "full": 1}.get(residual, model_cfg.attnres.block_size)


def num_sources(model_cfg) -> Optional[int]:
    """Depth sources the final aggregate mixes (the embedding + one per block), None without AttnRes."""
    bs = effective_block_size(model_cfg)
    if bs is None:
        return None
    return 1 + -(-num_sublayers(model_cfg) // bs)  # the last block may be shorter

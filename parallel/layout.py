"""Pipeline stage layout and the AttnRes payload of every hop, derived from the static layout alone.

Chunks are numbered in pipeline order c = v·P + p (virtual stage v, pipeline rank p), as in
megatron's interleaved schedule; chunk c holds a contiguous range of layers. Every layer has two
sublayers. After `done` sublayers the AttnRes state is `1 + done // S` blocks (block 0 is the
token embedding, block j ≥ 1 the sum of sublayers [(j-1)·S, j·S)) plus a partial sum when
`done % S != 0` (`state_after`, attnres_train/model/attnres/state.py).

A hop c -> c+1 carries, in this order, the blocks the receiving rank needs but neither received
nor produced in an earlier chunk of the same micro-batch, then the partial sum when a block spans
the boundary. With `cache=False` it carries every block the receiver needs (the naive scheme).
The standard residual is one hidden state per hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from attnres_train.errors import ConfigError
from attnres_train.model.attnres.state import StateShape, effective_block_size, state_after


@dataclass(frozen=True)
class Hop:
    """The tensors hop `src` -> `src + 1` carries: block ids, then the partial sum if `partial`."""

    src: int
    blocks: tuple
    partial: bool

    @property
    def num_tensors(self) -> int:
        return len(self.blocks) + int(self.partial)


@dataclass
class StageLayout:
    """Layers per pipeline chunk and, under AttnRes, what every hop carries (`hops[c]`: c -> c+1)."""

    pp: int
    vpp: int
    layers: tuple  # layers per chunk, chunk order c = v·pp + p
    block_size: Optional[int]  # None: standard residual
    cache: bool = True
    hops: list = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        return self.pp * self.vpp

    def first_layer(self, chunk: int) -> int:
        return sum(self.layers[:chunk])

    def rank_of(self, chunk: int) -> int:
        return chunk % self.pp

    def chunks_of_rank(self, rank: int) -> list:
        return [c for c in range(self.num_chunks) if c % self.pp == rank]

    def state_at(self, chunk: int) -> StateShape:
        """The AttnRes state entering `chunk` (chunk = num_chunks: the state after the last chunk)."""
        return state_after(2 * self.first_layer(chunk), self.block_size)

    def owned_before(self, chunk: int) -> set:
        """Blocks the rank of `chunk` holds for this micro-batch before `chunk` runs: those it
        received in, or completed during, its earlier chunks."""
        held = set()
        for c in self.chunks_of_rank(self.rank_of(chunk)):
            if c >= chunk:
                break
            held |= set(self.hops[c - 1].blocks) if c > 0 else {0}
            held |= set(range(self.state_at(c).num_blocks, self.state_at(c + 1).num_blocks))
        return held

    def tensors_per_hop(self) -> list:
        """Number of [s, b, d] tensors each hop carries (1 for the standard residual)."""
        if self.block_size is None:
            return [1] * (self.num_chunks - 1)
        return [h.num_tensors for h in self.hops]

    def tensors_per_microbatch(self) -> int:
        """[s, b, d] tensors one micro-batch's forward sends over all hops (backward: the same)."""
        return sum(self.tensors_per_hop())


def split_layers(num_layers: int, pp: int, vpp: int, layers_per_stage: Optional[Sequence[int]] = None) -> tuple:
    """Layers per chunk (chunk order v·pp + p). Even split unless given explicitly."""
    chunks = pp * vpp
    if layers_per_stage:
        layers = tuple(int(x) for x in layers_per_stage)
        if len(layers) != chunks:
            raise ConfigError("parallel.layers_per_stage", list(layers),
                              f"give one layer count per pipeline chunk: pp*vpp = {pp}*{vpp} = {chunks} "
                              "numbers, in chunk order (virtual stage 0 of ranks 0..pp-1, then virtual stage 1, ...)")
        if sum(layers) != num_layers:
            raise ConfigError("parallel.layers_per_stage", list(layers),
                              f"the counts sum to {sum(layers)} but the model has model.num_layers={num_layers}")
        if min(layers) < 1:
            raise ConfigError("parallel.layers_per_stage", list(layers), "every chunk needs at least one layer")
        return layers
    if num_layers < chunks:
        raise ConfigError("parallel.vpp" if vpp > 1 else "parallel.pp", vpp if vpp > 1 else pp,
                          f"{num_layers} layers cannot fill pp*vpp = {chunks} pipeline chunks (each needs at "
                          "least one layer): lower parallel.pp / parallel.vpp")
    if num_layers % chunks:
        valid = [c for c in range(1, num_layers + 1) if num_layers % c == 0]
        raise ConfigError("parallel.pp", pp,
                          f"{num_layers} layers do not split evenly into pp*vpp = {chunks} chunks; use pp*vpp in "
                          f"{valid} or give parallel.layers_per_stage explicitly (uneven first/last stages)")
    return (num_layers // chunks,) * chunks


def build_layout(num_layers: int, pp: int, vpp: int, block_size: Optional[int], *, cache: bool = True,
                 layers_per_stage: Optional[Sequence[int]] = None) -> StageLayout:
    layout = StageLayout(pp, vpp, split_layers(num_layers, pp, vpp, layers_per_stage), block_size, cache)
    if block_size is None:
        return layout
    for c in range(layout.num_chunks - 1):
        n, partial = layout.state_at(c + 1)
        held = layout.owned_before(c + 1) if cache else set()
        layout.hops.append(Hop(c, tuple(b for b in range(n) if b not in held), partial))
    return layout


# -- payload bytes and closed forms (derivation and the paper's counts: docs/pipeline.md) ---------
# Aligned layouts: every chunk holds the same number N_p of whole AttnRes blocks, so block
# boundaries fall on chunk boundaries and no hop carries a partial sum. C = P·V chunks. Per
# micro-batch forward, in [s, b, d] tensors:
#   ours, cached (full count)   (P-1) + N_p·P(P-1)/2 + N_p·P(P-1)(V-1)  the embedding reaches each
#                                                                        other rank once: P-1 hops
#   naive (full count)          (C-1) + N_p·C(C-1)/2                    every hop re-sends all blocks
#   paper Eq. 7 (naive)         N_p·C(C-1)/2                            non-embedding blocks only,
#   paper Eq. 8 (cached)        N_p·P(P-1)/2 + N_p·(V-1)·P²             as the paper counts
def expected_aligned(P: int, V: int, Np: int) -> int:
    """Ours, full count (embedding hops included): (P-1) + Np·P(P-1)/2 + Np·P(P-1)(V-1)."""
    return (P - 1) + Np * P * (P - 1) // 2 + Np * P * (P - 1) * (V - 1)


def naive_full(P: int, V: int, Np: int) -> int:
    """The naive scheme (parallel.attnres_cache=false), full count: paper Eq. 7 + the embedding
    on each of the C-1 hops."""
    return paper_eq7(P, V, Np) + (P * V - 1)


def paper_eq7(P: int, V: int, Np: int) -> int:
    """The paper's Eq. 7 (naive scheme, non-embedding blocks): Np·C(C-1)/2, C = P·V chunks."""
    C = P * V
    return Np * C * (C - 1) // 2


def paper_eq8(P: int, V: int, Np: int) -> int:
    """The paper's Eq. 8 (cached scheme, non-embedding blocks): Np·P(P-1)/2 + Np·(V-1)·P²."""
    return Np * P * (P - 1) // 2 + Np * (V - 1) * P * P


def aligned_blocks_per_chunk(layers: Sequence[int], block_size: Optional[int]) -> Optional[int]:
    """N_p when every chunk holds the same number of whole AttnRes blocks, else None (also for the
    standard residual)."""
    if block_size is None or len(set(layers)) != 1 or (2 * layers[0]) % block_size:
        return None
    return 2 * layers[0] // block_size


@dataclass(frozen=True)
class ClosedForms:
    """The closed forms above, in tensors per micro-batch forward, for an aligned layout."""

    blocks_per_chunk: int  # N_p
    expected: int  # what this layout sends, full count: ours cached, or naive with attnres_cache=false
    naive_full: int
    eq7: int  # the paper's, non-embedding blocks
    eq8: int


def closed_forms(pp: int, vpp: int, layers: Sequence[int], block_size: Optional[int], *,
                 cache: bool = True) -> Optional[ClosedForms]:
    """ClosedForms of an AttnRes layout with pp > 1 whose block boundaries fall on chunk
    boundaries; None otherwise."""
    Np = aligned_blocks_per_chunk(layers, block_size)
    if Np is None or pp == 1:
        return None
    return ClosedForms(Np, expected_aligned(pp, vpp, Np) if cache else naive_full(pp, vpp, Np),
                       naive_full(pp, vpp, Np), paper_eq7(pp, vpp, Np), paper_eq8(pp, vpp, Np))


@dataclass(frozen=True)
class HopBytes:
    """A layout's pipeline payload per micro-batch forward (the backward sends the same again).

    tensor_bytes: one [s, b, d] tensor, the whole sequence (all TP ranks together); under sequence
    parallelism each TP rank sends 1/tp of it."""

    tensor_bytes: int
    tp: int
    tensors: tuple  # per hop c -> c+1
    closed: Optional[ClosedForms]

    @property
    def bytes(self) -> tuple:
        return tuple(n * self.tensor_bytes for n in self.tensors)

    @property
    def bytes_per_tp_rank(self) -> tuple:
        return tuple(n * self.tensor_bytes // self.tp for n in self.tensors)

    def closed_bytes(self, name: str) -> Optional[int]:
        """A closed form ("expected", "naive_full", "eq7", "eq8") in bytes; None if not aligned."""
        return None if self.closed is None else getattr(self.closed, name) * self.tensor_bytes


def hop_bytes(layout: StageLayout, *, seq: int, micro_batch: int, hidden: int, elem_bytes: int,
              tp: int = 1) -> HopBytes:
    """Per-hop tensors and bytes of `layout` for [seq, micro_batch, hidden] tensors of
    `elem_bytes`, with its closed forms when aligned."""
    return HopBytes(seq * micro_batch * hidden * elem_bytes, tp, tuple(layout.tensors_per_hop()),
                    closed_forms(layout.pp, layout.vpp, layout.layers, layout.block_size, cache=layout.cache))


def layout_for(model_cfg, parallel_cfg) -> StageLayout:
    """The layout a run with these configs uses (even split unless parallel.layers_per_stage)."""
    return build_layout(model_cfg.num_layers, parallel_cfg.pp, parallel_cfg.vpp, effective_block_size(model_cfg),
                        cache=parallel_cfg.attnres_cache, layers_per_stage=parallel_cfg.layers_per_stage)

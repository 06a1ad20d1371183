"""Pipeline stage layout and the AttnRes payload of every hop, derived from the static layout alone.

Chunks are numbered in pipeline order c = v·P + p (virtual stage v, pipeline rank p), as in
megatron's interleaved schedule; chunk c holds a contiguous range of layers. Every layer has two
sublayers. After `done` sublayers the AttnRes state is `1 + done // S` blocks (block 0 is the
token embedding, block j ≥ 1 the sum of sublayers [(j-1)·S, j·S)) plus a partial sum when
`done % S != 0` (see attnres_train/model/block.py).

A hop c -> c+1 carries, in this order, the blocks the receiving rank needs but neither received
nor produced in an earlier chunk of the same micro-batch, then the partial sum when a block spans
the boundary. With `cache=False` it carries every block the receiver needs (the naive scheme).
The standard residual is one hidden state per hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from attnres_train.config.validate import ConfigError


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

    def state_at(self, chunk: int) -> tuple:
        """(number of blocks, has partial) entering `chunk`."""
        done = 2 * self.first_layer(chunk)
        return 1 + done // self.block_size, done % self.block_size != 0

    def owned_before(self, chunk: int) -> set:
        """Blocks the rank of `chunk` holds for this micro-batch before `chunk` runs: those it
        received in, or completed during, its earlier chunks."""
        held = set()
        for c in self.chunks_of_rank(self.rank_of(chunk)):
            if c >= chunk:
                break
            held |= set(self.hops[c - 1].blocks) if c > 0 else {0}
            n_out, _ = self.state_at(c + 1) if c + 1 < self.num_chunks else self._final_state()
            n_in, _ = self.state_at(c)
            held |= set(range(n_in, n_out))
        return held

    def _final_state(self) -> tuple:
        done = 2 * sum(self.layers)
        return 1 + done // self.block_size, done % self.block_size != 0

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


# -- the paper's and our closed forms (aligned layouts: N_p completed blocks per chunk) -----------
def expected_aligned(P: int, V: int, Np: int) -> int:
    """Ours: (P-1) + Np·P(P-1)/2 + Np·P(P-1)(V-1) tensors per micro-batch forward."""
    return (P - 1) + Np * P * (P - 1) // 2 + Np * P * (P - 1) * (V - 1)


def paper_eq8(P: int, V: int, Np: int) -> int:
    """The paper's cached scheme: Np·P(P-1)/2 + Np·(V-1)·P²."""
    return Np * P * (P - 1) // 2 + Np * (V - 1) * P * P


def paper_eq7(P: int, V: int, Np: int) -> int:
    """The naive scheme: Np·C(C-1)/2 with C = P·V chunks, plus the embedding on C-1 hops."""
    C = P * V
    return Np * C * (C - 1) // 2 + (C - 1)


def layout_for(model_cfg, parallel_cfg) -> StageLayout:
    """The layout a run with these configs uses (even split unless parallel.layers_per_stage)."""
    from attnres_train.config.validate import effective_block_size

    return build_layout(model_cfg.num_layers, parallel_cfg.pp, parallel_cfg.vpp, effective_block_size(model_cfg),
                        cache=parallel_cfg.attnres_cache, layers_per_stage=parallel_cfg.layers_per_stage)

"""Pipeline-parallel training of one rank's model chunks with AttnRes payloads and the block cache.

`Pipeline.run(batches)` drives megatron's 1F1B (vpp=1) or interleaved 1F1B (vpp>1) schedule over
this rank's chunks. Under AttnRes every chunk's decoder gets a `ChunkIO` (parallel/payload.py)
through `set_stage_io`: a non-first chunk turns the tensor megatron received into its input state
with it, a non-last chunk returns the payload it packs, which megatron sends as the chunk's output
(attnres_train/model/block.py). `forward_step` names the micro-batch around each chunk forward.
The standard residual is megatron's own hand-over: one hidden state per hop.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from parallel.layout import StageLayout
from parallel.payload import BlockCache, ChunkIO
from parallel.schedule import StaticShapeCommunicator, process_groups


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    # at least fp32 (bf16 logits' per-token losses), never below the model's dtype (fp64 tests)
    losses = output_tensor.reshape(-1).to(torch.promote_types(output_tensor.dtype, torch.float32))
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def configure_pipeline(config) -> None:
    """p2p settings that are safe on every backend (why: docs/pipeline.md#p2p-settings-configure_pipeline).

    batch_p2p_comm posts sends and receives to the same peer in one batch, which gloo matches in
    FIFO order and silently swaps under virtual stages; overlap_p2p_comm together with
    deallocate_pipeline_outputs races on gloo. So: no batching, no overlap, outputs deallocated."""
    config.batch_p2p_comm = False
    config.batch_p2p_sync = False
    config.overlap_p2p_comm = False
    config.deallocate_pipeline_outputs = True


class Pipeline:
    """This rank's model chunks under megatron's schedule, with the AttnRes hand-over between them."""

    def __init__(self, chunks: list, layout: StageLayout, *, seq_length: int, micro_batch_size: int):
        self.chunks = chunks
        self.layout = layout
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.rank = ps.get_pipeline_model_parallel_rank()
        self.chunk_ids = [v * layout.pp + self.rank for v in range(layout.vpp)]
        self.last = layout.num_chunks - 1
        self.cache = BlockCache(layout, self.rank) if layout.block_size is not None else None
        # one StageIO per chunk of this rank (AttnRes only), handed to its decoder below
        self.chunk_io = {c: ChunkIO(self.cache, c) for c in self.chunk_ids} if self.cache is not None else {}
        config = unwrap(chunks[0]).config
        configure_pipeline(config)
        # under sequence parallelism every hop tensor holds this TP rank's slice of the sequence
        local_seq = seq_length // config.tensor_model_parallel_size if config.sequence_parallel else seq_length
        self.comm = StaticShapeCommunicator(ps.get_pipeline_model_parallel_group(), config, layout,
                                            seq_length=local_seq, micro_batch_size=micro_batch_size)
        self.groups = process_groups()
        for c, chunk in zip(self.chunk_ids, chunks):
            if c in self.chunk_io:
                unwrap(chunk).decoder.set_stage_io(self.chunk_io[c])

    def forward_step(self, data_iterator, model):
        """megatron's forward_step_func: the chunk's output is the loss (last chunk) or the payload
        megatron sends on (every other chunk)."""
        chunk, mb, batch = next(data_iterator)
        first, last = chunk == 0, chunk == self.last
        io = self.chunk_io.get(chunk)  # None: the standard residual, megatron's own hand-over
        with io.micro_batch(mb) if io is not None else nullcontext():
            out = model(batch["tokens"] if first else None, batch["position_ids"] if first else None, None,
                        labels=batch["labels"] if last else None)
        return out, partial(_loss_func, batch["loss_mask"])

    def run(self, batches: list, *, forward_only: bool = False) -> list:
        """One schedule call over `batches` (this rank's micro-batches). Returns the per-micro-batch
        loss dicts on the last stage, [] elsewhere."""
        M = len(batches)
        iters = [iter([(c, m, batches[m]) for m in range(M)]) for c in self.chunk_ids]
        if self.cache is not None:
            self.cache.clear()
        self.comm.arm(M)
        out = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iters,
            model=self.chunks,
            num_microbatches=M,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            p2p_communicator=self.comm,
            pg_collection=self.groups,
        )
        self.comm.check_drained(forward_only)
        return out

"""megatron-core's pipeline schedules with AttnRes payloads: per-hop shapes, no padding, no handshake.

megatron sizes every receive buffer from one `tensor_shape`, unless `variable_seq_lengths`, where
it first exchanges shapes with the peer. We give the communicator a private config copy with
`variable_seq_lengths=True` and answer `_communicate_shapes` locally from the static layout: p2p
messages between two ranks arrive in the order they were posted, so the i-th forward receive on
rank r is the i-th forward send of rank r-1, whose hop follows from megatron's schedule table.
The communicator also counts the bytes it sends.
"""

from __future__ import annotations

import copy
from collections import deque

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import get_schedule_table
from megatron.core.process_groups_config import ProcessGroupCollection

from parallel.layout import StageLayout


class StaticShapeCommunicator(P2PCommunicator):
    """P2PCommunicator whose receive shapes come from the layout; counts bytes sent."""

    def __init__(self, pp_group, config, layout: StageLayout, *, seq_length: int, micro_batch_size: int):
        comm_config = copy.copy(config)  # copy.copy skips __post_init__ validation
        comm_config.variable_seq_lengths = True
        super().__init__(pp_group=pp_group, config=comm_config)
        self.layout = layout
        self.rank = dist.get_rank(pp_group)
        self.hop_rows = [n * seq_length for n in layout.tensors_per_hop()]
        self.rest = (micro_batch_size, config.hidden_size)
        self.fwd_shapes: deque = deque()
        self.bwd_shapes: deque = deque()
        self.bytes_sent = {"forward": 0, "backward": 0}

    def arm(self, num_microbatches: int) -> None:
        """Queue the shapes this rank will receive during one schedule call."""
        P, V = self.layout.pp, self.layout.vpp
        if V > 1:
            table = get_schedule_table(num_microbatches, V, self.config.microbatch_group_size_per_vp_stage)
        else:
            table = [(m, 0) for m in range(num_microbatches)]
        self.fwd_shapes.clear()
        self.bwd_shapes.clear()
        sender = (self.rank - 1) % P
        for _, v in table:  # the sender's forwards, in its order
            if not (sender == P - 1 and v == V - 1):
                self.fwd_shapes.append(self._shape(v * P + sender))
        sender = (self.rank + 1) % P
        for _, v in table:  # the sender's backwards: chunk ids in reverse
            v = V - 1 - v
            if not (sender == 0 and v == 0):
                self.bwd_shapes.append(self._shape(v * P + sender - 1))

    def _shape(self, hop: int) -> tuple:
        return (self.hop_rows[hop], *self.rest)

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        prev = self.fwd_shapes.popleft() if recv_prev else None
        nxt = self.bwd_shapes.popleft() if recv_next else None
        return prev, nxt

    def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape,
                     wait_on_reqs=True):
        if tensor_send_next is not None:
            self.bytes_sent["forward"] += tensor_send_next.numel() * tensor_send_next.element_size()
        if tensor_send_prev is not None:
            self.bytes_sent["backward"] += tensor_send_prev.numel() * tensor_send_prev.element_size()
        return super()._communicate(tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                                    recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape,
                                    wait_on_reqs=wait_on_reqs)

    def check_drained(self, forward_only: bool) -> None:
        if self.fwd_shapes or (self.bwd_shapes and not forward_only):
            raise RuntimeError(f"pipeline rank {self.rank}: {len(self.fwd_shapes)} forward / "
                               f"{len(self.bwd_shapes)} backward receives were planned but not made")


def process_groups() -> ProcessGroupCollection:
    """The ProcessGroupCollection the schedules want when a communicator is passed in."""
    pgs = ProcessGroupCollection()
    pgs.tp = ps.get_tensor_model_parallel_group()
    pgs.cp = ps.get_context_parallel_group()
    pgs.embd = ps.get_embedding_group(check_initialized=False)
    pgs.pos_embd = ps.get_position_embedding_group(check_initialized=False)
    pgs.pp = ps.get_pipeline_model_parallel_group()
    pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=False)
    return pgs

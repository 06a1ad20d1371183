"""The decoder block for AttnRes: carries the BlockState (block sums, partial sum) between sublayers.

The state and the rule that sizes it live in attnres_train/model/attnres/state.py: after `done`
sublayers, `blocks` = [b_0 = embedding, b_1, ..., b_{done // S}] and `partial` = the running sum of
the current block, or None when `done % S == 0` (megatron tensors are [S, B, D]).

Per AttnRes block the two-phase schedule runs once: phase 1 mixes all of the block's pseudo-queries
over the completed blocks in one batched pass (fp32 running max / sum-exp); each sublayer then
merges its intra-block partial sum with an online-softmax step (exact). When a block starts in an
earlier pipeline stage, phase 1 covers the block's sublayers that live in this stage.

Pipeline hand-over: megatron passes one tensor between stages. A chunk of a split model gets a
`StageIO` through `set_stage_io` (next to megatron's `set_input_tensor`); forward then reads

    first chunk:      state = BlockState([embedding])
    other chunks:     state = stage_io.receive(self.input_tensor)   (the tensor megatron received)
    non-last chunks:  return stage_io.send(state)                   (the tensor megatron sends)
    last chunk:       return final_layernorm(final AttnRes aggregate of the state)
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from attnres_train.choices import AttnResImpl
from attnres_train.model.attnres import attnres_merge_auto, attnres_naive, attnres_phase1_auto
from attnres_train.model.attnres.state import BlockState, StageIO, state_after
from attnres_train.model.sublayer import DepthQuery


class AttnResTransformerBlock(TransformerBlock):
    """megatron TransformerBlock whose layers mix their inputs with Block AttnRes.

    Layers must be `AttnResTransformerLayer`s. On the stage with the final norm, one more
    AttnRes aggregate over all sources (`final_res`) feeds the final RMSNorm and the LM head.
    A chunk of a split model receives and hands over its state through the `StageIO` given to
    `set_stage_io` (parallel.Pipeline gives one per chunk); see the module docstring.
    """

    def __init__(self, config, spec, *, block_size: int, impl: AttnResImpl | str = AttnResImpl.two_phase,
                 **kwargs):
        super().__init__(config, spec, **kwargs)
        self.block_size = block_size
        self.impl = AttnResImpl.parse(impl, "AttnRes impl")  # a member compares equal to its string
        self.final_res = DepthQuery(config) if self.final_layernorm is not None else None
        # Optional observer, called as hook(sublayer_index, sources, depth_query) before each mix
        # (index 2·num_layers is the final aggregate); diagnostics use it for depth-weight maps.
        self.mix_observer = None
        self.stage_io: Optional[StageIO] = None

    # -- pipeline hand-over -------------------------------------------------------------------
    def set_stage_io(self, stage_io: Optional[StageIO]) -> None:
        """How this chunk receives its input state (non-first chunk) and hands over its output
        state (non-last chunk). The payload itself arrives through megatron's set_input_tensor."""
        self.stage_io = stage_io

    def _require_stage_io(self, what: str) -> StageIO:
        if self.stage_io is None:
            raise RuntimeError(f"a {what} pipeline chunk of an AttnRes model exchanges its block state "
                               "through a StageIO: run it through parallel.Pipeline (or call set_stage_io)")
        return self.stage_io

    # -- forward ------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
        """hidden_states: the embedding [S, B, D] on the first stage (ignored elsewhere: the
        received payload comes through set_input_tensor).

        Returns the final-normed hidden states [S, B, D] on the last stage, else the payload
        [k·S, B, D] that `stage_io.send` packed for the next stage.
        """
        if inference_context is not None:
            raise NotImplementedError("AttnRes inference with a KV/state cache is not supported yet")
        if self.pre_process:
            hidden_states = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
            state = BlockState([hidden_states])
        else:
            state = self._require_stage_io("non-first").receive(self.input_tensor)
        attn_kwargs = dict(
            attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset, padding_mask=padding_mask,
        )
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            state = self.run_layers(state, list(self.layers), attn_kwargs, padding_mask)
        if self.final_layernorm is None:
            return self._require_stage_io("non-last").send(state)
        q = self.final_res
        if self.mix_observer is not None:
            self.mix_observer(2 * self.config.num_layers, state.sources(), q)
        h = attnres_naive(state.sources(), q.query, q.key_norm_weight, q.eps) if self.impl == "naive" \
            else self._mix_all(state, q)
        h = self.final_layernorm(h)
        return make_viewless_tensor(h, requires_grad=True, keep_graph=True)

    @staticmethod
    def _mix_all(state: BlockState, q: DepthQuery) -> Tensor:
        o, lse = attnres_phase1_auto(state.blocks, q.query[None], q.key_norm_weight[None], q.eps)
        if state.partial is None:
            return o[0]
        return attnres_merge_auto(o[0], lse[0], state.partial, q.query, q.key_norm_weight, q.eps)

    @staticmethod
    def _query_rows(vectors: list, rows: list, bs: int) -> Tensor:
        """[bs, D]: vectors[j] in row rows[j], zeros elsewhere (zero rows contribute exact zeros)."""
        stacked = torch.stack(vectors)
        if len(rows) == bs:
            return stacked
        padded = stacked.new_zeros(bs, stacked.shape[-1])
        return padded.index_copy(0, torch.tensor(rows, device=stacked.device), stacked)

    def run_layers(self, state: BlockState, layers: list, attn_kwargs: dict, padding_mask=None) -> BlockState:
        """Run `layers` in order, updating the AttnRes state; with full recomputation
        (config.recompute_granularity == "full") in checkpointed groups of layers."""
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training:
            return self._run_sublayers(state, layers, attn_kwargs, padding_mask)
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "block":  # the first n layers of this chunk recomputed, the rest not
            state = self._checkpointed(state, layers[:n], attn_kwargs, padding_mask)
            return self._run_sublayers(state, layers[n:], attn_kwargs, padding_mask) if layers[n:] else state
        for i in range(0, len(layers), n):  # uniform: groups of n layers
            state = self._checkpointed(state, layers[i:i + n], attn_kwargs, padding_mask)
        return state

    def _checkpointed(self, state: BlockState, layers: list, attn_kwargs: dict, padding_mask) -> BlockState:
        """Run `layers` under megatron's activation checkpoint. megatron's own full recompute
        (`_checkpointed_forward`) threads one hidden tensor through; here the whole AttnRes state
        (every block summary the group reads, and the partial sum) enters as explicit checkpoint
        inputs, so their gradients flow back, and only the blocks the group completes plus the
        new partial sum leave it."""
        num_in = len(state.blocks)
        has_partial = state.partial is not None

        def run(*tensors):
            inner = BlockState(list(tensors[:num_in]), tensors[num_in] if has_partial else None)
            out = self._run_sublayers(inner, layers, attn_kwargs, padding_mask)
            return tuple(out.blocks[num_in:]) + ((out.partial,) if out.partial is not None else ())

        outputs = tensor_parallel.checkpoint(run, False, *state.sources())
        outputs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
        num_out, out_partial = state_after(2 * layers[-1].layer_number, self.block_size)
        new_blocks = list(outputs[:num_out - num_in])
        assert len(new_blocks) + int(out_partial) == len(outputs), (num_in, num_out, len(outputs))
        return BlockState(state.blocks + new_blocks, outputs[-1] if out_partial else None)

    def _run_sublayers(self, state: BlockState, layers: list, attn_kwargs: dict, padding_mask=None) -> BlockState:
        """Run the attention and FFN sublayers of `layers` in order, updating the AttnRes state."""
        sublayers = [(layer, kind) for layer in layers for kind in (0, 1)]
        bs = self.block_size
        blocks, partial = list(state.blocks), state.partial
        i = 0
        while i < len(sublayers):
            first = 2 * (sublayers[i][0].layer_number - 1) + sublayers[i][1]
            # The group: this stage's remaining sublayers of the AttnRes block containing `first`.
            n = min(bs - first % bs, len(sublayers) - i)
            group = sublayers[i:i + n]
            queries = [layer.attn_res if kind == 0 else layer.mlp_res for layer, kind in group]
            if self.impl == "two_phase":
                # Sublayer l's pseudo-query sits in row l % bs of a [bs, D] batch, whatever part of
                # the block this stage holds: the batched GEMM then computes every row exactly as
                # the unsplit model does, so pipeline stages agree with it bit for bit.
                rows = [(first + j) % bs for j in range(n)]
                o, lse = attnres_phase1_auto(
                    blocks,
                    self._query_rows([q.query for q in queries], rows, bs),
                    self._query_rows([q.key_norm_weight for q in queries], rows, bs),
                    queries[0].eps,
                )
                o, lse = o[rows[0]:rows[0] + n], lse[rows[0]:rows[0] + n]
            for j, ((layer, kind), q) in enumerate(zip(group, queries)):
                if self.mix_observer is not None:
                    self.mix_observer(first + j, blocks + ([partial] if partial is not None else []), q)
                if self.impl == "naive":
                    h = attnres_naive(blocks + ([partial] if partial is not None else []),
                                      q.query, q.key_norm_weight, q.eps)
                elif partial is None:
                    h = o[j]
                else:
                    h = attnres_merge_auto(o[j], lse[j], partial, q.query, q.key_norm_weight, q.eps)
                if kind == 0:
                    out = layer.attention_sublayer(h, **attn_kwargs)
                else:
                    out = layer.ffn_sublayer(h, padding_mask=padding_mask)
                partial = out if partial is None else partial + out
            if (first + n) % bs == 0:  # the block ended inside this stage
                blocks.append(partial)
                partial = None
            i += n
        return BlockState(blocks, partial)

"""Dry run: build the model on the meta device, count parameters, plan the pipeline, write plan.json.

The plan covers, per pipeline chunk (chunk c = v·pp + p: virtual stage v of pipeline rank p, as in
parallel/layout.py), its layers, its parameters and a memory estimate, plus the AttnRes payload of
every pipeline hop. Nothing here needs the pipeline's process groups: the whole model is built once
on the meta device (one process) and each chunk's share is read off it by layer index, following
the layout the trainer uses (`parallel.layout.layout_for`).

Parameters per chunk
    total / active    the chunk's slice of the unsharded model; chunk 0 adds the embedding, the last
                      chunk the LM head, the final norm and the final AttnRes aggregate. Summed over
                      the chunks they equal params_total / params_active exactly. Pieces and active
                      counts are attnres_train/model/structure.py's (routed experts at top_k /
                      num_experts), as in counting.py.
    per_gpu           what one GPU of that pipeline rank holds: routed-expert weights / (ep · etp)
                      (megatron's expert tensor parallel size etp defaults to tp); weights of
                      megatron's tensor-parallel layers (column/row-parallel linears, the vocab-
                      parallel embedding) and parameters flagged `tensor_model_parallel` (KDA's
                      convs, dt_bias, A_log) / tp; everything else (norms, AttnRes queries and key
                      norms, routers + expert bias, MLA's replicated key/value down projection)
                      counted whole on every TP rank. Integer division: exact when tp divides the
                      split dimensions (validate_config checks the ones that matter).

Memory (per GPU of a pipeline rank; rough, for sizing; MEMORY_ASSUMPTIONS is written to plan.json)
    weights + grads + optimizer: bf16 weights 2 + fp32 main grads 4 + fp32 master 4 + Adam m 4 +
        v 4 = 18 bytes/param (fp32 training: 4 + 4 + 4 + 4 = 16, no master copy). With dp > 1 the
        distributed optimizer shards master + m + v: dense parameters over dp, routed experts over
        the expert data-parallel size dp·tp/(ep·etp).
    activations, per micro-batch per layer: a·s·b·d·B/tp elements·bytes (B = activation bytes, 2
        for bf16; /tp: sequence + tensor parallel) with a = ATTN_COEFF (attention sublayer and its
        norm) + RESIDUAL_COEFF (the residual / AttnRes partial sum each sublayer keeps) + the FFN:
        dense 1 + 3·f/d (norm output, GLU fc1 output 2f, activation f), MoE 1 + top_k·(1 + 3·f_e/d)
        (dispatched copies of the token, their fc1/activation outputs) + 3·f_s/d (shared expert).
        Full recompute keeps RECOMPUTE_FULL_COEFF·s·b·d per layer instead; selective recompute is
        not modelled (the no-recompute figure is an upper bound).
    + AttnRes block summaries the rank keeps per micro-batch in flight: the blocks (and partial
        sum) available at the end of the furthest chunk that micro-batch reached on the rank, each
        s·b·d·B/tp.
    + on the last pipeline rank, one micro-batch's logits: s·b·V/tp · LOGIT_BYTES (bf16 logits +
        the fp32 softmax the loss saves; only one micro-batch: the last stage runs its backward
        right after its forward).
    Micro-batches in flight: megatron's schedule (pipeline_parallel/schedules.py): 1F1B holds
        pp − p forwards on rank p; interleaved 1F1B runs warmup = 2·(pp − p − 1) + (vpp − 1)·pp
        chunk forwards (in megatron's schedule-table order, groups of pp micro-batches per virtual
        stage) then one more before the first backward; each is capped at micro-batches × vpp.

Pipeline payloads: hop c -> c + 1 carries `layout.tensors_per_hop()[c]` tensors of [s, b, d]
(bf16 unless train.dtype=fp32; under sequence parallelism each TP rank sends s/tp of it), forward
and the same again backward. Micro-batches per step = global_batch / (micro_batch · dp) with
dp = world / (tp · pp), the world size taken from $ATTNRES_PLAN_WORLD_SIZE or $WORLD_SIZE (a plain
single-process run sets WORLD_SIZE=1), else dp = 1. Where block boundaries fall on chunk boundaries
(N_p blocks per chunk) the closed forms of parallel/layout.py sit beside the count, each labelled:
bytes_expected (this layout, full count: embedding hops and partial sums included; equals
bytes_per_microbatch), bytes_eq8 / bytes_eq7 (the paper's Eq. 8 / Eq. 7 as the paper counts them:
non-embedding blocks only) and bytes_naive_full (the naive scheme's full count, Eq. 7 + the C-1
embedding hops: what parallel.attnres_cache=false sends); null otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from megatron.core.pipeline_parallel.schedules import get_schedule_table
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from attnres_train.model.attnres.state import effective_block_size, num_sources, num_sublayers, state_after
from attnres_train.model.counting import count_parameters, format_table
from attnres_train.model.model import build_model
from attnres_train.model.structure import active_count, counted_tensors, layer_kind, param_role
from parallel.layout import aligned_blocks_per_chunk, hop_bytes, layout_for

WORLD_SIZE_ENV = "ATTNRES_PLAN_WORLD_SIZE"
GIB = 1024 ** 3

# Activation coefficients (elements per token, in units of the hidden size d unless stated).
ATTN_COEFF = 18  # attention sublayer incl. its norm: q/k/v before+after the conv, gates, core output...
RESIDUAL_COEFF = 2  # one residual stream / AttnRes partial sum per sublayer
RECOMPUTE_FULL_COEFF = 2  # full recompute: the layer's checkpointed inputs only
LOGIT_BYTES = 6  # bf16 logits + fp32 softmax saved by the loss, per vocabulary element

MEMORY_ASSUMPTIONS = {
    "weights_grads_optimizer": "bytes/param: bf16 weights 2 + fp32 grads 4 + fp32 master 4 + Adam m 4 + v 4 = 18 "
                               "(train.dtype=fp32: 16, no master); dp>1: master+m+v sharded by the distributed "
                               "optimizer over dp (dense) and dp*tp/(ep*etp) (routed experts)",
    "params_per_gpu": "routed experts /(ep*etp), etp=tp; tensor-parallel linears, vocab-parallel embedding and "
                      "params flagged tensor_model_parallel /tp; norms, AttnRes, routers, expert bias and MLA's "
                      "kv down projection replicated",
    "activations_per_layer": f"a*s*b*d*bytes/tp per micro-batch, a = {ATTN_COEFF} (attention) + {RESIDUAL_COEFF} "
                             "(residual/AttnRes partial per sublayer) + FFN: dense 1+3f/d, MoE "
                             f"1+top_k*(1+3f_e/d)+3f_s/d; full recompute: a = {RECOMPUTE_FULL_COEFF}; selective "
                             "recompute not modelled (upper bound); rough",
    "attnres_blocks": "per micro-batch in flight: blocks (+ partial) at the end of the furthest chunk it reached "
                      "on the rank, s*b*d*bytes/tp each",
    "logits": f"last pipeline rank, one micro-batch: s*b*vocab/tp*{LOGIT_BYTES} bytes",
    "in_flight": "megatron's schedule: 1F1B pp-p micro-batches on rank p; interleaved "
                 "2*(pp-p-1)+(vpp-1)*pp+1 chunk forwards (schedule-table order); capped at micro-batches*vpp",
    "not_included": "CUDA context, allocator fragmentation, communication buffers, MoE dispatch buffers",
}


# plan.json's closed-form keys -> parallel.layout.ClosedForms fields, and their labels
CLOSED_FORM_KEYS = (("bytes_expected", "expected"), ("bytes_eq8", "eq8"), ("bytes_eq7", "eq7"),
                    ("bytes_naive_full", "naive_full"))
CLOSED_FORM_LABELS = {
    "bytes_expected": "this layout (full count: embedding + partial)",
    "bytes_eq8": "paper Eq. 8 (cached, non-embedding blocks)",
    "bytes_eq7": "paper Eq. 7 (naive, non-embedding blocks)",
    "bytes_naive_full": "naive full count (Eq. 7 + embedding hops)",
}


def single_process_parallel(parallel_cfg):
    """The parallel config a one-process dry run initialises its process groups with: every size 1.
    The plan itself reads the real sizes from cfg.parallel."""
    return dataclasses.replace(parallel_cfg, tp=1, pp=1, vpp=1, ep=1, layers_per_stage=None)


# -- parameters ----------------------------------------------------------------------------------
def _tp_split_ids(model) -> set:
    """ids of the parameters megatron splits over tensor-parallel ranks."""
    ids = set()
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    ids.update(id(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    return ids


def _zero() -> dict:
    return {"total": 0, "active": 0, "dense_per_gpu": 0, "expert_per_gpu": 0}


def piece_counts(model, model_cfg, tp: int, ep: int) -> dict:
    """Parameter counts of the whole (meta) model split into pieces: {"embedding", "head", "layers":
    [one per global layer]}, each {"total", "active", "dense_per_gpu", "expert_per_gpu"}; expert_bias
    buffers included (structure.counted_tensors, as counting.py)."""
    split = _tp_split_ids(model)
    pieces = {"embedding": _zero(), "head": _zero(), "layers": [_zero() for _ in range(model_cfg.num_layers)]}
    for name, tensor in counted_tensors(model):
        role = param_role(name, model_cfg)  # the whole model is built: local layer index == global
        piece = pieces["layers"][role.layer] if role.piece == "layer" else pieces[role.piece]
        n = tensor.numel()
        piece["total"] += n
        piece["active"] += active_count(n, role, model_cfg)
        if role.routed_expert:
            piece["expert_per_gpu"] += n // (ep * tp)  # ep · etp, etp = tp (megatron's default)
        else:
            piece["dense_per_gpu"] += n // tp if id(tensor) in split else n
    return pieces


# -- schedule ------------------------------------------------------------------------------------
def in_flight(pp: int, vpp: int, rank: int, num_micro: int) -> list:
    """(micro-batch, virtual stage) chunk forwards whose activations rank `rank` holds at its peak
    (just before its first backward), in megatron's order."""
    total = num_micro * vpp
    if vpp == 1:
        warmup = pp - rank - 1 if pp > 1 else 0
        order = [(m, 0) for m in range(num_micro)]
    else:
        warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
        order = get_schedule_table(num_micro, vpp, pp)  # microbatch_group_size_per_vp_stage = pp
    return list(order[:min(warmup + 1, total)])


def data_parallel_size(tp: int, pp: int, configured: Optional[int] = None) -> tuple:
    """(dp, how it was found): world / (tp·pp) with the world from $ATTNRES_PLAN_WORLD_SIZE, else
    train.dry_run_world_size (`configured`), else $WORLD_SIZE, else dp = 1."""
    sources = [(WORLD_SIZE_ENV, os.environ.get(WORLD_SIZE_ENV)),
               ("train.dry_run_world_size", None if configured is None else str(configured)),
               ("WORLD_SIZE", os.environ.get("WORLD_SIZE"))]
    for name, value in sources:
        if value and value.isdigit() and int(value) >= tp * pp and int(value) % (tp * pp) == 0:
            world = int(value)
            return world // (tp * pp), f"{name}={world} / (tp*pp={tp * pp})"
    return 1, "assumed 1 (set train.dry_run_world_size=<GPUs> to plan for a data-parallel world)"


# -- the plan ------------------------------------------------------------------------------------
def layer_activation_coeff(model_cfg, layer: int, recompute: str) -> float:
    """a in a·s·b·d: activation elements one layer keeps per token and micro-batch, over d."""
    if recompute == "full":
        return float(RECOMPUTE_FULL_COEFF)
    d, moe = model_cfg.hidden_size, model_cfg.moe
    a = ATTN_COEFF + RESIDUAL_COEFF + 1.0
    if not layer_kind(model_cfg, layer).is_moe:
        a += 3 * moe.dense_ffn_hidden_size / d
    else:
        a += moe.top_k * (1 + 3 * moe.ffn_hidden_size / d) + 3 * moe.num_shared_experts * moe.ffn_hidden_size / d
    return a


def build_plan(cfg, pieces: dict) -> dict:
    """Stages, hops, payload bytes and memory from the layout and the per-piece counts."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp, ep = par.tp, par.pp, par.vpp, par.ep
    layout = layout_for(m, par)
    s, b, d = m.seq_length, t.micro_batch_size, m.hidden_size
    fp32 = t.dtype == "fp32"
    nbytes = 4 if fp32 else 2
    dtype_note = ("fp32 (train.dtype=fp32)" if fp32 else
                  "bf16 (train.dtype=bf16)" if t.dtype == "bf16" else
                  "bf16 (train.dtype=auto: bf16 on GPU, assumed for planning)")
    payload = hop_bytes(layout, seq=s, micro_batch=b, hidden=d, elem_bytes=nbytes, tp=tp)
    tensor_bytes = payload.tensor_bytes  # one [s, b, d] tensor, whole sequence (all TP ranks together)
    dp, dp_note = data_parallel_size(tp, pp, t.dry_run_world_size)
    notes = []
    if dp % ep:
        notes.append(f"a real run needs dp a multiple of ep={ep} (world = tp*pp*dp); planned with dp={dp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        notes.append(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*dp="
                     f"{t.micro_batch_size * dp}: training would refuse it; planned with the floor")
    num_micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    if vpp > 1 and num_micro % pp:
        notes.append(f"with vpp>1 training needs micro-batches per step ({num_micro}) to be a multiple of pp={pp}")

    # -- stages: one per chunk --------------------------------------------------------------------
    # bytes/param kept whole (weights + fp32 grads) and sharded by the distributed optimizer
    # (fp32 master + Adam m, v; fp32 training has no master copy)
    w_bytes, master_opt = (8, 8) if fp32 else (6, 12)
    etp = tp  # megatron's expert_tensor_parallel_size defaults to tp
    expert_dp = max(1, dp * tp // (ep * etp))
    stages, last = [], layout.num_chunks - 1
    for c in range(layout.num_chunks):
        first = layout.first_layer(c)
        layers = list(range(first, first + layout.layers[c]))
        kinds = [layer_kind(m, i) for i in layers]
        parts = [pieces["layers"][i] for i in layers]
        if c == 0:
            parts.append(pieces["embedding"])
        if c == last:
            parts.append(pieces["head"])
        sums = {k: sum(p[k] for p in parts) for k in _zero()}
        dense, expert = sums["dense_per_gpu"], sums["expert_per_gpu"]
        wo = dense * (w_bytes + master_opt / dp) + expert * (w_bytes + master_opt / expert_dp)
        act_layers = sum(layer_activation_coeff(m, i, par.recompute) for i in layers) * s * b * d * nbytes / tp
        stages.append({
            "chunk": c, "rank": layout.rank_of(c), "vstage": c // pp,
            "layers": layers, "attention": [k.letter for k in kinds], "ffn": [k.ffn for k in kinds],
            "embedding": c == 0, "lm_head": c == last,
            "params_total": sums["total"], "params_active": sums["active"],
            "params_per_gpu": dense + expert, "expert_params_per_gpu": expert,
            "weights_optimizer_bytes": int(wo),
            "activation_bytes_per_microbatch": int(act_layers),
        })

    # -- memory per pipeline rank -------------------------------------------------------------------
    ranks = []
    for p in range(pp):
        window = in_flight(pp, vpp, p, num_micro)
        mine = [st for st in stages if st["rank"] == p]
        counts = {v: sum(1 for _, vv in window if vv == v) for v in range(vpp)}
        for st in mine:
            st["microbatches_in_flight"] = counts[st["vstage"]]
            st["activation_bytes"] = st["activation_bytes_per_microbatch"] * counts[st["vstage"]]
            st["memory_bytes"] = st["weights_optimizer_bytes"] + st["activation_bytes"]
        furthest = {}
        for mb, v in window:
            furthest[mb] = max(furthest.get(mb, 0), v)
        blocks_kept = 0
        if layout.block_size is not None:
            for v in furthest.values():
                c = v * pp + p
                done = 2 * layout.first_layer(c + 1)  # sublayers done at the end of chunk c
                blocks_kept += state_after(done, layout.block_size).num_tensors
        block_bytes = blocks_kept * tensor_bytes / tp
        logit_bytes = s * b * m.vocab_size / tp * LOGIT_BYTES if p == layout.rank_of(last) else 0
        total = sum(st["memory_bytes"] for st in mine) + block_bytes + logit_bytes
        ranks.append({
            "rank": p, "chunks": [st["chunk"] for st in mine],
            "params_per_gpu": sum(st["params_per_gpu"] for st in mine),
            "microbatches_in_flight": len(furthest), "chunk_forwards_in_flight": len(window),
            "weights_optimizer_bytes": sum(st["weights_optimizer_bytes"] for st in mine),
            "activation_bytes": sum(st["activation_bytes"] for st in mine),
            "attnres_block_tensors": blocks_kept, "attnres_block_bytes": int(block_bytes),
            "logits_bytes": int(logit_bytes), "memory_bytes": int(total),
        })

    # -- hops ---------------------------------------------------------------------------------------
    hops = []
    for c, (n, nb, nb_tp) in enumerate(zip(payload.tensors, payload.bytes, payload.bytes_per_tp_rank)):
        hop = layout.hops[c] if layout.block_size is not None else None
        hops.append({
            "src": c, "dst": c + 1, "src_rank": layout.rank_of(c), "dst_rank": layout.rank_of(c + 1),
            "blocks": list(hop.blocks) if hop else [], "partial": hop.partial if hop else False,
            "hidden": hop is None, "tensors": n, "bytes": nb, "bytes_per_tp_rank": nb_tp,
        })
    per_mb = sum(payload.bytes)
    # closed forms (parallel/layout.py): null unless block boundaries fall on chunk boundaries
    closed = {key: payload.closed_bytes(name) for key, name in CLOSED_FORM_KEYS}
    return {
        "pipeline": {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "dp": dp, "dp_source": dp_note,
                     "layers_per_chunk": list(layout.layers), "attnres_cache": layout.cache,
                     "aligned_blocks_per_chunk": aligned_blocks_per_chunk(layout.layers, layout.block_size)},
        "stages": stages, "ranks": ranks, "hops": hops,
        "payload_dtype": dtype_note, "tensor_bytes": tensor_bytes,
        "tensors_per_microbatch": sum(payload.tensors),
        "bytes_per_microbatch": per_mb,  # forward; the backward sends the same again
        "microbatches_per_step": num_micro,
        "bytes_per_step": 2 * per_mb * num_micro,  # forward + backward, one pipeline (dp replica)
        **closed,
        "memory_assumptions": dict(MEMORY_ASSUMPTIONS, payload_dtype=dtype_note, dp=f"{dp}: {dp_note}"),
        "notes": notes,
    }


def _gib(x: float) -> str:
    """Bytes, human-readable: GiB from 1 GiB up, else MiB."""
    return f"{x / GIB:.1f} GiB" if x >= GIB else f"{x / 1024 ** 2:.1f} MiB"


def _span(layers: list) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def format_plan(plan: dict) -> str:
    pl = plan["pipeline"]
    out = [f"pipeline: tp={pl['tp']} pp={pl['pp']} vpp={pl['vpp']} ep={pl['ep']} dp={pl['dp']} ({pl['dp_source']}); "
           f"{plan['microbatches_per_step']} micro-batches/step; layers per chunk {pl['layers_per_chunk']}",
           "attn: K = KDA, M = MLA; ffn: D = dense, E = MoE; params/GPU: after TP/EP sharding; memory per GPU; "
           "mb: micro-batches in flight",
           f"{'rank':>4} {'vst':>3} {'chunk':>5} {'layers':>7} {'attn':>6} {'ffn':>6} {'params':>16} "
           f"{'active':>15} {'params/GPU':>15} {'w+grad+opt':>10} {'activations':>11} {'mb':>3}"]
    for st in sorted(plan["stages"], key=lambda x: (x["rank"], x["vstage"])):
        extra = ("+emb" if st["embedding"] else "") + ("+head" if st["lm_head"] else "")
        out.append(f"{st['rank']:>4} {st['vstage']:>3} {st['chunk']:>5} {_span(st['layers']):>7} "
                   f"{''.join(st['attention']):>6} {''.join('D' if f == 'dense' else 'E' for f in st['ffn']):>6} "
                   f"{st['params_total']:>16,} {st['params_active']:>15,} {st['params_per_gpu']:>15,} "
                   f"{_gib(st['weights_optimizer_bytes']):>10} {_gib(st['activation_bytes']):>11} "
                   f"{st['microbatches_in_flight']:>3} {extra}")
    for r in plan["ranks"]:
        out.append(f"rank {r['rank']}: {r['params_per_gpu']:,} params/GPU; weights+grads+optimizer "
                   f"{_gib(r['weights_optimizer_bytes'])} + activations {_gib(r['activation_bytes'])} "
                   f"(in flight: {r['microbatches_in_flight']} micro-batches, {r['chunk_forwards_in_flight']} "
                   f"chunk forwards) + AttnRes blocks {_gib(r['attnres_block_bytes'])} ({r['attnres_block_tensors']} "
                   f"tensors) + logits {_gib(r['logits_bytes'])} = {_gib(r['memory_bytes'])} (rough)")
    mib = 1024 ** 2
    if not plan["hops"]:
        out.append("pipeline hops: none (one pipeline chunk)")
        out.extend(f"note: {n}" for n in plan["notes"])
        return "\n".join(out)
    out.append(f"pipeline hops ({plan['payload_dtype']}; one [s,b,d] tensor = {plan['tensor_bytes'] / mib:.1f} MiB):")
    for h in plan["hops"]:
        what = "hidden state" if h["hidden"] else (
            f"blocks {h['blocks']}" + (" + partial" if h["partial"] else ""))
        out.append(f"  chunk {h['src']} -> {h['dst']} (rank {h['src_rank']} -> {h['dst_rank']}): {what}: "
                   f"{h['tensors']} tensors, {h['bytes'] / mib:.1f} MiB")
    out.append(f"per micro-batch: {plan['tensors_per_microbatch']} tensors, "
               f"{plan['bytes_per_microbatch'] / mib:.1f} MiB forward (the same backward); per step: {_gib(plan['bytes_per_step'])} "
               f"(forward + backward, {plan['microbatches_per_step']} micro-batches, per pipeline)")
    if plan["bytes_expected"] is not None:
        tb = plan["tensor_bytes"]
        out.append(f"closed forms (N_p={pl['aligned_blocks_per_chunk']} blocks per chunk), per micro-batch forward:")
        out.extend(f"  {CLOSED_FORM_LABELS[key]}: {plan[key] // tb} tensors ({plan[key] / mib:.1f} MiB)"
                   for key, _ in CLOSED_FORM_KEYS)
    else:
        out.append("closed forms (paper Eq.7/Eq.8): n/a (standard residual, or block boundaries not at chunk "
                   "boundaries); the count above is the layout's")
    out.extend(f"note: {n}" for n in plan["notes"])
    return "\n".join(out)


def dry_run(cfg, run_dir: Path) -> dict:
    model = build_model(cfg.model, meta=True)  # the whole model, one process (as train() counts it)
    counts = count_parameters(model, cfg.model)
    pieces = piece_counts(model, cfg.model, cfg.parallel.tp, cfg.parallel.ep)
    plan = {
        "model": cfg.model.name,
        "residual": cfg.model.residual,
        "block_size": effective_block_size(cfg.model),
        "num_layers": cfg.model.num_layers,
        "num_sublayers": num_sublayers(cfg.model),
        "attnres_sources": num_sources(cfg.model),
        "params_total": counts["params_total"],
        "params_active": counts["params_active"],
        "params_by_module": {k: {"total": t, "active": a} for k, (t, a) in counts["table"].items()},
    }
    plan.update(build_plan(cfg, pieces))
    print(f"model={cfg.model.name} residual={cfg.model.residual} "
          f"block_size={plan['block_size']} sources={plan['attnres_sources']}")
    print(format_table(counts))
    print(format_plan(plan))
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "plan.json"
    out.write_text(json.dumps(plan, indent=2) + "\n")
    print(f"wrote {out}")
    return plan

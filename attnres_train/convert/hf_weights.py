"""Parameter names and layouts: our unsplit model (megatron names, TP=PP=EP=1) <-> transformers'.

`plan(cfg, layout)` lists `Entry`s: which HF tensors correspond to which of ours, and the two
pure functions between them. Export walks the plan calling `to_hf`, import calling `from_hf`;
either can stream entry by entry. Layouts of the HF side:

- "remote_code": the released checkpoint's original names, which transformers 5.23's
  `save_pretrained` writes too (it reverses its load-time renames on save): separate
  `q_conv1d/k_conv1d/v_conv1d`, `self_attn.f_a_proj/f_b_proj/dt_bias/A_log`, the FFN under
  `block_sparse_moe` (dense layers included; the released files name those `mlp`, which import
  also reads), per-expert `w1` (gate), `w3` (up), `w2` (down). Export writes this layout.
- "transformers": transformers' in-memory module layout (`model.state_dict()`): one depthwise
  `conv1d` for q, k, v; the forget gate under `self_attn.forget_gate`; experts stacked
  (`mlp.experts.gate_up_proj` [E, 2F, D], gate rows first; `down_proj` [E, D, F]). Import reads it.

Ours: megatron fuses the SwiGLU gate and up projections into one `linear_fc1` ([gate; up], the gate
rows first: megatron's glu applies the activation to the first half); KDA's A_log is [H] where
transformers keeps [1, 1, H, 1]; MLA's names are megatron's (`linear_q_proj`,
`linear_kv_down_proj` = kv_a_proj_with_mqa: [kv_lora | rope] rows, `kv_layernorm`,
`linear_kv_up_proj` = kv_b_proj: per head [nope | v] rows, `linear_proj` = o_proj).
AttnRes parameters (pseudo-query and key-norm gain per sublayer, the final aggregate's) have the
same names on both sides, under `model.` on the HF side: they exist only in AttnRes models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List

import torch

from attnres_train.choices import Residual
from attnres_train.model.structure import layer_kinds

LAYOUTS = ("transformers", "remote_code")
Tensors = List[torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """HF tensors `hf` <-> our tensors `ours`: to_hf(ours tensors) -> hf tensors, from_hf the inverse."""

    hf: tuple
    ours: tuple
    to_hf: Callable[[Tensors], Tensors]
    from_hf: Callable[[Tensors], Tensors]


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def _halves(ts: Tensors) -> Tensors:
    """[gate; up] rows -> gate, up."""
    (fc1,) = ts
    return list(fc1.chunk(2, dim=0))


def _cat_rows(ts: Tensors) -> Tensors:
    return [torch.cat(ts, dim=0)]


def _split_rows(n: int) -> Callable[[Tensors], Tensors]:
    def split(ts: Tensors) -> Tensors:
        (t,) = ts
        return list(t.chunk(n, dim=0))
    return split


def _stack(ts: Tensors) -> Tensors:
    return [torch.stack(ts, dim=0)]


def _unstack(ts: Tensors) -> Tensors:
    (t,) = ts
    return list(t.unbind(0))


def _a_log_to_hf(ts: Tensors) -> Tensors:
    (a,) = ts
    return [a.reshape(1, 1, -1, 1)]


def _a_log_from_hf(ts: Tensors) -> Tensors:
    (a,) = ts
    return [a.reshape(-1)]


def _one(hf: str, ours: str) -> Entry:
    return Entry((hf,), (ours,), _same, _same)


def _swiglu(hf_gate: str, hf_up: str, hf_down: str, ours: str) -> List[Entry]:
    """A SwiGLU MLP: HF's gate/up/down projections <-> megatron's fused fc1 and fc2."""
    return [Entry((hf_gate, hf_up), (f"{ours}.linear_fc1.weight",), _halves, _cat_rows),
            _one(hf_down, f"{ours}.linear_fc2.weight")]


def _kda(hf: str, ours: str, layout: str) -> List[Entry]:
    gate = f"{hf}.forget_gate" if layout == "transformers" else hf
    out = [_one(f"{hf}.{p}_proj.weight", f"{ours}.{p}_proj.weight") for p in ("q", "k", "v", "b", "g_a", "g_b", "o")]
    out += [_one(f"{gate}.f_a_proj.weight", f"{ours}.f_a_proj.weight"),
            _one(f"{gate}.f_b_proj.weight", f"{ours}.f_b_proj.weight"),
            _one(f"{gate}.dt_bias", f"{ours}.dt_bias"),
            Entry((f"{gate}.A_log",), (f"{ours}.A_log",), _a_log_to_hf, _a_log_from_hf),
            _one(f"{hf}.o_norm.weight", f"{ours}.o_norm.weight")]
    convs = tuple(f"{ours}.{p}_conv1d.weight" for p in ("q", "k", "v"))
    if layout == "transformers":
        out.append(Entry((f"{hf}.conv1d.weight",), convs, _cat_rows, _split_rows(3)))
    else:
        out += [_one(f"{hf}.{p}_conv1d.weight", c) for p, c in zip("qkv", convs)]
    return out


def _mla(hf: str, ours: str) -> List[Entry]:
    return [_one(f"{hf}.q_proj.weight", f"{ours}.linear_q_proj.weight"),
            _one(f"{hf}.kv_a_proj_with_mqa.weight", f"{ours}.linear_kv_down_proj.weight"),
            _one(f"{hf}.kv_a_layernorm.weight", f"{ours}.kv_layernorm.weight"),
            _one(f"{hf}.kv_b_proj.weight", f"{ours}.linear_kv_up_proj.weight"),
            _one(f"{hf}.o_proj.weight", f"{ours}.linear_proj.weight")]


def _moe(hf: str, ours: str, num_experts: int, layout: str) -> List[Entry]:
    experts = [f"{ours}.experts.local_experts.{e}" for e in range(num_experts)]
    out = [_one(f"{hf}.gate.weight", f"{ours}.router.weight"),
           _one(f"{hf}.gate.e_score_correction_bias", f"{ours}.router.expert_bias")]
    if layout == "transformers":
        out += [Entry((f"{hf}.experts.gate_up_proj",), tuple(f"{e}.linear_fc1.weight" for e in experts),
                      _stack, _unstack),
                Entry((f"{hf}.experts.down_proj",), tuple(f"{e}.linear_fc2.weight" for e in experts),
                      _stack, _unstack)]
    else:
        for e, mine in enumerate(experts):
            out += _swiglu(f"{hf}.experts.{e}.w1.weight", f"{hf}.experts.{e}.w3.weight",
                           f"{hf}.experts.{e}.w2.weight", mine)
    shared = f"{hf}.shared_experts"
    out += _swiglu(f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight", f"{shared}.down_proj.weight",
                   f"{ours}.shared_experts")
    return out


def _attnres(hf: str, ours: str) -> List[Entry]:
    return [_one(f"{hf}.query", f"{ours}.query"), _one(f"{hf}.key_norm_weight", f"{ours}.key_norm_weight")]


def plan(cfg, layout: str = "transformers") -> List[Entry]:
    """Every tensor of the model `cfg`, in HF checkpoint order (embedding, layers, norm, head)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
    attnres = cfg.residual != Residual.standard
    out = [_one("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for kind in layer_kinds(cfg):
        hf, ours = f"model.layers.{kind.index}", f"decoder.layers.{kind.index}"
        out.append(_one(f"{hf}.input_layernorm.weight", f"{ours}.input_layernorm.weight"))
        out += _mla(f"{hf}.self_attn", f"{ours}.self_attention") if kind.is_mla else \
            _kda(f"{hf}.self_attn", f"{ours}.self_attention", layout)
        out.append(_one(f"{hf}.post_attention_layernorm.weight", f"{ours}.pre_mlp_layernorm.weight"))
        mlp = f"{hf}.mlp" if layout == "transformers" else f"{hf}.block_sparse_moe"
        out += _moe(mlp, f"{ours}.mlp", cfg.moe.num_experts, layout) if kind.is_moe else \
            _swiglu(f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight", f"{mlp}.down_proj.weight", f"{ours}.mlp")
        if attnres:
            out += _attnres(f"{hf}.attn_res", f"{ours}.attn_res") + _attnres(f"{hf}.mlp_res", f"{ours}.mlp_res")
    out.append(_one("model.norm.weight", "decoder.final_layernorm.weight"))
    if attnres:
        out += _attnres("model.final_res", "decoder.final_res")
    out.append(_one("lm_head.weight", "output_layer.weight"))
    return out


def detect_layout(hf_names: Iterable[str]) -> str:
    """"transformers" when the names are transformers' module layout, else "remote_code"."""
    names = list(hf_names)
    modules = any(n.endswith(("experts.gate_up_proj", "self_attn.conv1d.weight")) or ".forget_gate." in n
                  for n in names)
    return "transformers" if modules else "remote_code"


def aliases(name: str) -> List[str]:
    """Other spellings of an HF tensor name that mean the same tensor: the released remote-code
    files name dense FFNs `mlp`, transformers' save_pretrained `block_sparse_moe`."""
    if ".block_sparse_moe." in name:
        return [name.replace(".block_sparse_moe.", ".mlp.")]
    return []

"""Parameter counts by walking a built (usually meta) model: total, active, and a per-module table.

total  = every parameter + the MoE routers' `expert_bias` buffers (persistent state that is part of
         the checkpoint; megatron registers it as a buffer, not a Parameter).
active = parameters touched per token: everything except the routed experts that are not
         selected, i.e. routed experts count top_k / num_experts of their size.
"""

from __future__ import annotations

from collections import OrderedDict

ROUTED = ".mlp.experts."


def _category(name: str, layer_kind: dict) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "lm_head"
    if ".attn_res." in name or ".mlp_res." in name or "final_res." in name:
        return "attnres (query + key norm)"
    if name.startswith("decoder.final_layernorm") or ".input_layernorm." in name \
            or ".pre_mlp_layernorm." in name:
        return "norms"
    if ".self_attention." in name:
        layer = int(name.split(".")[2])
        return f"{layer_kind.get(layer, 'attention')} attention"
    if ROUTED in name:
        return "moe routed experts"
    if ".mlp.shared_experts." in name:
        return "moe shared expert"
    if ".mlp.router." in name:
        return "moe router (+ expert bias)"
    if ".mlp." in name:
        return "dense ffn"
    return "other"


def count_parameters(model, model_cfg) -> dict:
    """Returns {"params_total", "params_active", "table": OrderedDict(category -> (total, active))}."""
    local_layer_kind = {}
    for i, layer in enumerate(model.decoder.layers):
        local_layer_kind[i] = "MLA" if model_cfg.layer_pattern[layer.layer_number - 1] == "M" else "KDA"
    tensors = [(n, p.numel()) for n, p in model.named_parameters()]
    tensors += [(n, b.numel()) for n, b in model.named_buffers() if n.endswith("expert_bias")]
    moe = model_cfg.moe
    table: "OrderedDict[str, int]" = OrderedDict()
    for name, n in tensors:
        cat = _category(name, local_layer_kind)
        table[cat] = table.get(cat, 0) + n
    rows = OrderedDict()
    for cat, n in table.items():
        # All experts have the same size, so top_k of num_experts is the touched fraction.
        rows[cat] = (n, n * moe.top_k // moe.num_experts if cat == "moe routed experts" else n)
    return {"params_total": sum(t for t, _ in rows.values()),
            "params_active": sum(a for _, a in rows.values()), "table": rows}


def format_table(counts: dict) -> str:
    lines = [f"{'module':<30} {'total':>18} {'active':>18}"]
    for cat, (t, a) in counts["table"].items():
        lines.append(f"{cat:<30} {t:>18,} {a:>18,}")
    lines.append(f"{'TOTAL':<30} {counts['params_total']:>18,} {counts['params_active']:>18,}")
    return "\n".join(lines)

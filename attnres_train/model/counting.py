"""Parameter counts by walking a built (usually meta) model: total, active, and a per-module table.

total  = every parameter + the MoE routers' `expert_bias` buffers (structure.counted_tensors).
active = parameters touched per token (structure.active_count: routed experts at top_k / num_experts).
The table's rows are structure.ParamRole categories.
"""

from __future__ import annotations

from collections import OrderedDict

from attnres_train.model.structure import active_count, counted_tensors, layer_index, param_role


def count_parameters(model, model_cfg) -> dict:
    """Returns {"params_total", "params_active", "table": OrderedDict(category -> (total, active))}
    for one model chunk (the whole model when built unsplit)."""
    layers = model.decoder.layers
    first_layer = layer_index(layers[0]) if len(layers) else 0
    rows: "OrderedDict[str, tuple]" = OrderedDict()
    for name, tensor in counted_tensors(model):
        role = param_role(name, model_cfg, first_layer)
        total, active = rows.get(role.category, (0, 0))
        rows[role.category] = (total + tensor.numel(), active + active_count(tensor.numel(), role, model_cfg))
    return {"params_total": sum(t for t, _ in rows.values()),
            "params_active": sum(a for _, a in rows.values()), "table": rows}


def format_table(counts: dict) -> str:
    lines = [f"{'module':<30} {'total':>18} {'active':>18}"]
    for cat, (t, a) in counts["table"].items():
        lines.append(f"{cat:<30} {t:>18,} {a:>18,}")
    lines.append(f"{'TOTAL':<30} {counts['params_total']:>18,} {counts['params_active']:>18,}")
    return "\n".join(lines)

"""Dry run: build the model on the meta device, count parameters, write plan.json."""

from __future__ import annotations

import json
from pathlib import Path

from attnres_train.config.validate import effective_block_size, num_sublayers
from attnres_train.model.counting import count_parameters, format_table
from attnres_train.model.model import build_model


def attnres_sources(model_cfg) -> int | None:
    """Depth sources the final aggregate mixes: the embedding + one per block."""
    bs = effective_block_size(model_cfg)
    if bs is None:
        return None
    return 1 + -(-num_sublayers(model_cfg) // bs)


def dry_run(cfg, run_dir: Path) -> dict:
    model = build_model(cfg.model, cfg.parallel, meta=True)
    counts = count_parameters(model, cfg.model)
    plan = {
        "model": cfg.model.name,
        "residual": cfg.model.residual,
        "block_size": effective_block_size(cfg.model),
        "num_layers": cfg.model.num_layers,
        "num_sublayers": num_sublayers(cfg.model),
        "attnres_sources": attnres_sources(cfg.model),
        "params_total": counts["params_total"],
        "params_active": counts["params_active"],
        "params_by_module": {k: {"total": t, "active": a} for k, (t, a) in counts["table"].items()},
    }
    print(f"model={cfg.model.name} residual={cfg.model.residual} "
          f"block_size={plan['block_size']} sources={plan['attnres_sources']}")
    print(format_table(counts))
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "plan.json"
    out.write_text(json.dumps(plan, indent=2) + "\n")
    print(f"wrote {out}")
    return plan

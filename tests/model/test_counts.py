"""Parameter counts of Kimi-Linear-48B-A3B on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from attnres_train.model.counting import count_parameters
from attnres_train.model.model import build_model
from tests.helpers import model_cfg

TOTAL, ACTIVE = 49_122_681_728, 3_484_459_904
ATTNRES_EXTRA = (54 + 1) * 2 * 2304  # 2d per sublayer + 2d for the final aggregate = 253,440


@pytest.mark.parametrize("residual,extra", [("standard", 0), ("block", ATTNRES_EXTRA), ("full", ATTNRES_EXTRA)])
def test_48b_counts(mcore_world, residual, extra):
    start = time.time()
    cfg = model_cfg("kimi_linear_48b_a3b", residual=residual)
    model = build_model(cfg, meta=True)
    counts = count_parameters(model, cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert counts["params_total"] == TOTAL + extra
    assert counts["params_active"] == ACTIVE + extra
    table = counts["table"]
    assert table["KDA attention"][0] == 20 * 39_514_272
    assert table["MLA attention"][0] == 7 * 29_114_880
    assert table["dense ffn"][0] == 63_700_992
    assert time.time() - start < 60


def test_dry_run_cli_writes_plan(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "attnres_train.train", "model=kimi_linear_48b_a3b",
         "train.dry_run=true", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["params_total"] == TOTAL + ATTNRES_EXTRA
    assert plan["params_active"] == ACTIVE + ATTNRES_EXTRA
    assert plan["attnres_sources"] == 10
    assert "49,122,935,168" in proc.stdout  # the printed table's total


def test_unknown_config_key_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnres_train.train", "model.no_such_key=1", "train.dry_run=true",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr

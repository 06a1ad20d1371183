"""`attnres-train-profile`: baseline and AttnRes twin in one command, under PP=2 x VPP=2 (2 CPU ranks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, _env

pytestmark = pytest.mark.slow

REQUIRED = ("device", "step_time_baseline_s", "step_time_attnres_s", "overhead", "bytes_per_step",
            "bytes_expected", "bytes_eq7", "bytes_eq8", "bytes_naive_full", "peak_mem_baseline_bytes",
            "peak_mem_attnres_bytes")


def test_profile_pp2_vpp2(tmp_path, data_cache):
    cmd = [sys.executable, "-m", "attnres_train.profiler", "--nproc", "2", "--steps", "2", "--warmup", "1",
           "--name", "t", "--out-dir", str(tmp_path), "parallel.pp=2", "parallel.vpp=2",
           "train.global_batch_size=8", "train.micro_batch_size=2", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(data_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "t.json").read_text())
    for key in REQUIRED:
        assert key in res, key
    assert res["device"].startswith("CPU")
    assert math.isclose(res["overhead"], res["overhead_per_repeat"][0])  # one pair: its ratio
    # tiny: 4 layers, block size 2 sublayers -> one block per chunk (N_p = 1), P=2, V=2, 4 micro-batches
    tensor = 64 * 2 * 128 * 4  # [s, b, d] fp32
    per = tensor * 4 * 2  # x micro-batches x (fwd + bwd)
    assert res["blocks_per_chunk"] == 1
    assert res["bytes_per_step"] == res["bytes_expected"] == (1 + 1 + 2) * per  # (P-1)+P(P-1)/2+P(P-1)(V-1)
    # the paper's closed forms count non-embedding blocks; the naive full count adds the C-1 = 3 hops
    assert res["bytes_eq8"] == (1 + 4) * per  # N_p P(P-1)/2 + N_p (V-1) P^2
    assert res["bytes_eq7"] == 6 * per  # N_p C(C-1)/2, C = 4
    assert res["bytes_naive_full"] == (6 + 3) * per
    assert res["bytes_per_step_baseline"] == 3 * per  # one hidden state per hop, 3 hops
    rows = res["breakdown_attnres"]
    assert {"kda", "mla", "moe", "lm_head", "decoder_self"} <= set(rows)
    assert rows["lm_head"]["flops"] == res["breakdown_baseline"]["lm_head"]["flops"] > 0
    assert rows["decoder_self"]["flops"] > res["breakdown_baseline"]["decoder_self"]["flops"]  # the mixes
    md = (tmp_path / "t.md").read_text()
    assert "overhead = AttnRes / baseline" in md and "paper Eq. 8 (cached, non-embedding blocks)" in md
    assert "paper Eq. 7 (naive, non-embedding blocks)" in md and "naive full count" in md

"""A diverging run stops cleanly and keeps its last good checkpoint (CLI, tiny model, gloo).

lr=1e6 makes the tiny model's loss NaN from its third step on: those updates are skipped, no
checkpoint is written from them (keep_last=2 would otherwise rotate the good ones out), and after
train.max_bad_steps=3 of them the run exits with code 1 and one line naming the step, the value,
the last good checkpoint and what to try. Under PP=2 both ranks agree and stop at the same step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e.conftest import metrics

pytestmark = pytest.mark.slow

DIVERGE = ["train.lr=1e6", "train.min_lr=0", "train.warmup_steps=1", "train.steps=12", "train.save_interval=1",
           "train.keep_last=2", "train.eval_interval=0"]
MESSAGE = re.compile(r"attnres-train: error: training diverged at step (\d+): 3 steps in a row \((\d+)-\1\) had a "
                     r"non-finite loss or gradient \(loss nan\).*The last good checkpoint is (\S+); rerunning the "
                     r"same command resumes from it.*Try a new run \(another hydra.run.dir\) with a lower "
                     r"train.lr \(now 1e\+06\), a longer "
                     r"train.warmup_steps \(now 1\) or a smaller train.clip_grad")


def _finite_checkpoint(path: Path, tmp: Path) -> bool:
    """Every floating-point tensor the distributed checkpoint holds is finite."""
    out = tmp / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    tensors = []

    def walk(x):
        if torch.is_tensor(x):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    floats = [t for t in tensors if t.is_floating_point()]
    return len(floats) > 10 and all(bool(torch.isfinite(t).all()) for t in floats)


def _check_stopped(proc, run: Path, tmp: Path) -> int:
    assert proc.returncode != 0
    found = MESSAGE.findall(proc.stderr)
    assert len(found) == 1, proc.stderr[-3000:]  # one line, from one rank
    last, first, good = int(found[0][0]), int(found[0][1]), Path(found[0][2])
    assert last == first + 2
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    # nothing written from the skipped steps; the newest two good ones kept
    assert kept == [f"step_{first - 2:07d}", f"step_{first - 1:07d}"] and good.name == kept[-1]
    assert all(_finite_checkpoint(run / "checkpoints" / k, tmp) for k in kept)
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "summary.json").exists()
    return first


def test_diverging_run_stops_and_keeps_its_good_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli(run, *DIVERGE, check=False)
    assert proc.returncode == 1
    first = _check_stopped(proc, run, tmp_path)
    records = {r["step"]: r for r in metrics(run)}
    for step in (first, first + 1, first + 2):  # every skipped step is logged, with its reason
        assert records[step]["update_skipped"] == "non-finite loss or gradient"
        assert records[step]["loss"] != records[step]["loss"]  # nan
    assert all("update_skipped" not in records[s] for s in range(1, first))
    assert f"step {first}: no checkpoint (its update was skipped" in proc.stdout

    again = cli(run, *DIVERGE, check=False)  # the same command resumes from the last good checkpoint
    assert f"resumed from step {first - 1}" in again.stdout
    assert _check_stopped(again, run, tmp_path) == first


def test_diverging_pipeline_run_stops_on_every_rank(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli(run, *DIVERGE, "parallel.pp=2", nproc=2, check=False)
    _check_stopped(proc, run, tmp_path)
    assert json.loads((run / "checkpoints" / "step_0000001" / "meta.json").read_text())["step"] == 1

"""End-to-end helpers: run the real CLI (`python -m attnres_train.train`) in a subprocess."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small and fast: tiny model, few steps, small batches, a capped validation pass.
FAST = ["train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=2",
        "train.eval_interval=3", "train.eval_batches=4", "logging.log_interval=1",
        "logging.diag_interval=0", "logging.wandb.enabled=false", "logging.tensorboard=false"]


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def run_cli(data_cache: Path, run_dir: Path, *overrides, nproc: int = 1, check: bool = True, timeout: int = 600):
    """`attnres-train` (torchrun for nproc > 1) with FAST and `overrides`; the finished process."""
    args = [f"hydra.run.dir={run_dir}", f"data.cache_dir={data_cache}", *FAST, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "attnres_train.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "attnres_train.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(data_cache), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def cli(data_cache):
    return functools.partial(run_cli, data_cache)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# Block AttnRes trained this long writes text a unigram model rates worse (tests/e2e/test_generate.py)
TRAINED_STEPS = 80


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache):
    """trained_run(residual): the run dir of a finished tiny run (block: TRAINED_STEPS steps, the
    others 2), made once per session for the tests that export or sample from one."""
    made = {}

    def get(residual: str) -> Path:
        if residual not in made:
            run = tmp_path_factory.mktemp(f"trained-{residual}") / "run"
            steps = ["train.steps=2"] if residual != "block" else [
                f"train.steps={TRAINED_STEPS}", "train.eval_interval=1000", "logging.log_interval=50",
                "train.warmup_steps=10"]
            run_cli(data_cache, run, f"model.residual={residual}", *steps)
            made[residual] = run
        return made[residual]

    return get

"""Launchers: launch/torchrun.sh (a real 4-process CPU job), launch/slurm.sbatch (derived settings
with faked slurm commands, and the signal path end to end) and the trainer's preemption handling
(SIGUSR1 -> checkpoint at the current step -> exit 0 -> resume)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm.sbatch"
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
JOB_ID = 4242117


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def _clean_env(**extra) -> dict:
    """This environment minus anything a launcher reads from it, plus `extra`."""
    drop = ("SLURM_", "ATTNRES_", "MASTER_", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    env.update(extra)
    return env


def _fake_bin(tmp_path: Path, hosts=("node-a17", "node-a18")) -> Path:
    """`scontrol` that prints `hosts` for `show hostnames` and logs every call; `nvidia-smi` that
    finds no GPU; `srun` that runs its command here as node 0 (exec: it receives srun's signals)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    scripts = {
        "scontrol": f'#!/bin/sh\necho "$*" >> "{log}"\n'
                    f'[ "$1 $2" = "show hostnames" ] && printf "%s\\n" {" ".join(hosts)}\nexit 0\n',
        "nvidia-smi": "#!/bin/sh\nexit 9\n",
        "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\n'
                'SLURM_NODEID=0 exec "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _slurm_env(bin_dir: Path, **extra) -> dict:
    slurm = dict(SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NODELIST="node-a[17-18]", SLURM_NNODES="2")
    return _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **{**slurm, **extra})


def _dry_run(env: dict, *overrides) -> dict:
    proc = subprocess.run(["bash", str(SBATCH), *overrides], env=dict(env, ATTNRES_SLURM_DRY_RUN="1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, log: Path, timeout: float = 120) -> int:
    """Poll metrics.jsonl until it records `step` or later; returns the newest step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Kill a test process (and its process group) that is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _preempted_step(out: str, reason: str = "SIGUSR1") -> int:
    m = re.search(rf"preempted at step (\d+)/(\d+) \({reason}\): checkpoint saved to (\S+);", out)
    assert m, out[-4000:]
    step, total, path = int(m.group(1)), int(m.group(2)), Path(m.group(3))
    assert step < total and path.name == f"step_{step:07d}" and (path / "meta.json").is_file()
    assert json.loads((path / "meta.json").read_text())["step"] == step
    return step


def _worker_with_rank(parent: int, rank: int) -> int:
    """The pid of `parent`'s child process whose environment has RANK=rank (a torchrun worker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {parent} with RANK={rank}")


# --- launch/torchrun.sh ------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_sh_four_processes_dp2_pp2(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = ["bash", str(TORCHRUN_SH), "parallel.pp=2", f"hydra.run.dir={run}", f"data.cache_dir={data_cache}",
           *FAST, "train.steps=3", "train.eval_interval=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(NPROC_PER_NODE="4"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "nproc_per_node=4" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_val_loss"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- launch/slurm.sbatch: derived settings (dry run) ---------------------------------------------


def test_slurm_dry_run_two_nodes(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    env = _slurm_env(bin_dir, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    v = _dry_run(env, "model=small", "train.lr=1e-3")
    port = 10000 + JOB_ID % 20000
    run_dir = f"{ROOT}/runs/slurm-{JOB_ID}"
    assert v["MASTER_ADDR"] == "node-a17"  # the first host of the allocation
    assert v["MASTER_PORT"] == str(port)
    assert v["NNODES"] == "2" and v["NPROC_PER_NODE"] == "4"
    assert v["RUN_DIR"] == run_dir
    assert v["SRUN_CMD"].startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    assert "--cpus-per-task=16" in v["SRUN_CMD"]
    # the command launch/torchrun.sh execs on node 0: c10d rendezvous on the head node, the
    # per-job run dir, then the user's overrides untouched
    cmd = v["TORCHRUN_CMD"]
    assert cmd.startswith(f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 4 ")
    assert f"--rdzv-backend c10d --rdzv-endpoint node-a17:{port} --rdzv-id attnres-slurm-{JOB_ID} --node-rank 0" in cmd
    assert cmd.endswith(f"-m attnres_train.train hydra.run.dir={run_dir} model=small train.lr=1e-3")
    assert "show hostnames node-a[17-18]" in (tmp_path / "scontrol.log").read_text()
    # the same job (a requeue) gets the same port and run dir; another job another port
    assert _dry_run(env, "model=small", "train.lr=1e-3") == v
    other = _dry_run(dict(env, SLURM_JOB_ID=str(JOB_ID + 1)))
    assert other["MASTER_PORT"] != v["MASTER_PORT"] and other["RUN_DIR"] != v["RUN_DIR"]


@pytest.mark.parametrize("gpu_env,nproc", [
    ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),  # --gpus-per-node=a100:2
    ({"SLURM_GPUS_PER_NODE": "4"}, "4"),
    ({}, "1"),  # no GPU information and no usable nvidia-smi: one (CPU) process
])
def test_slurm_dry_run_processes_per_node(tmp_path, gpu_env, nproc):
    v = _dry_run(_slurm_env(_fake_bin(tmp_path), **gpu_env))
    assert v["NPROC_PER_NODE"] == nproc
    assert f"--nproc-per-node {nproc} " in v["TORCHRUN_CMD"]


def test_slurm_dry_run_single_node_user_run_dir(tmp_path):
    env = _slurm_env(_fake_bin(tmp_path, hosts=("solo",)), SLURM_JOB_NODELIST="solo", SLURM_NNODES="1")
    v = _dry_run(env, "hydra.run.dir=/data/runs/mine", "train.steps=10")
    assert v["MASTER_ADDR"] == "solo" and v["NNODES"] == "1" and v["RUN_DIR"] == "/data/runs/mine"
    assert "--standalone" in v["TORCHRUN_CMD"]  # torchrun.sh: one node needs no c10d endpoint
    assert v["TORCHRUN_CMD"].endswith("-m attnres_train.train hydra.run.dir=/data/runs/mine train.steps=10")
    assert v["TORCHRUN_CMD"].count("hydra.run.dir=") == 1


def test_slurm_outside_a_job_is_a_clear_error(tmp_path):
    env = _clean_env(PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not inside a slurm job" in proc.stderr


# --- preemption ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_and_resumes(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "attnres_train.train", f"hydra.run.dir={run}", f"data.cache_dir={data_cache}",
           *FAST, "train.steps=40", "train.eval_interval=0"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_step(proc, run / "metrics.jsonl", 2, log)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        finally:
            _stop(proc)
    first = log.read_text()
    step = _preempted_step(first)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{step:07d}"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    assert not (run / "summary.json").exists()  # the run is not finished: no summary

    again = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    assert "preempted" not in again.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert math.isfinite(json.loads((run / "summary.json").read_text())["final_val_loss"])


@pytest.mark.slow
def test_slurm_script_forwards_usr1_and_requeues(tmp_path, data_cache):
    """The whole path with fake srun/scontrol: slurm's warning signal reaches the batch shell only
    (--signal=B:USR1); it goes batch shell -> srun -> node task -> trainer (torchrun ignores it),
    the trainer checkpoints and exits 0, and the job is requeued."""
    bin_dir = _fake_bin(tmp_path, hosts=("localhost",))
    env = _slurm_env(bin_dir, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1")
    run = tmp_path / "run"
    log = tmp_path / "job.log"
    cmd = ["bash", str(SBATCH), f"hydra.run.dir={run}", f"data.cache_dir={data_cache}", *FAST,
           "train.steps=40", "train.eval_interval=0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_step(proc, run / "metrics.jsonl", 2, log)
            proc.send_signal(signal.SIGUSR1)  # to the batch shell only
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        finally:
            _stop(proc)
    out = log.read_text()
    step = _preempted_step(out)
    assert "got SIGUSR1" in out and f"requeueing job {JOB_ID}" in out
    assert f"requeue {JOB_ID}" in (tmp_path / "scontrol.log").read_text().splitlines()
    assert (run / "checkpoints" / f"step_{step:07d}").is_dir()


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, data_cache):
    """SIGUSR1 to rank 1 only (DP=2): the all-reduced flag stops rank 0 after the same step, and the
    checkpoint (a collective save) is complete."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "attnres_train.train", f"hydra.run.dir={run}", f"data.cache_dir={data_cache}", *FAST,
           "train.steps=40", "train.eval_interval=0"]
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_step(proc, run / "metrics.jsonl", 2, log)
            os.kill(_worker_with_rank(proc.pid, 1), signal.SIGUSR1)
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        finally:
            _stop(proc)
    step = _preempted_step(log.read_text(), reason="signal received by another rank")
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step

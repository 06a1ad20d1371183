"""Checkpoint durability end to end (subprocess, CPU): a run SIGKILLed at random points during steps
and during saves and rerun with the same command each time ends exactly where an unbroken run
does; a save that fails (full disk) stops the run with one clear line, exit code 1, and the
previous checkpoint intact, from which the same command resumes."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST, ROOT, _env, losses, metrics, summary

pytestmark = pytest.mark.slow

# every step saves, so that a kill lands in a save as often as in a step
RUN = ["train.steps=8", "train.save_interval=1"]


def _start(run_dir: Path, data_cache: Path, log: Path) -> subprocess.Popen:
    """The trainer in its own process group (megatron's writer forks workers: a kill takes them too)."""
    cmd = [sys.executable, "-m", "attnres_train.train", f"hydra.run.dir={run_dir}",
           f"data.cache_dir={data_cache}", *FAST, *RUN]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(data_cache), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, seen, count: int, what: str, timeout: float = 120) -> None:
    """Poll (1 ms) until this process has made `count` directories of `seen()`: its count-th save
    started (`.tmp-step_*`) or ended (`step_*`). A directory is its name and inode: a resumed run
    re-saves the step whose tmp dir a kill left, under the same name."""
    before, deadline = set(_identities(seen())), time.monotonic() + timeout
    made = set()
    while len(made) < count:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {count} new {what}"
        assert time.monotonic() < deadline, f"no {count} new {what} in {timeout} s"
        time.sleep(0.001)
        made |= set(_identities(seen())) - before


def _identities(paths: list) -> list:
    out = []
    for path in paths:
        try:
            out.append((path.name, path.stat().st_ino))
        except FileNotFoundError:  # renamed or removed since the listing
            pass
    return out


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_steps_and_saves_then_rerun_matches_an_unbroken_run(cli, data_cache, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    cli(unbroken, *RUN)
    ckpts = broken / "checkpoints"

    def started() -> list:  # saves under way (or killed)
        return list(ckpts.glob(".tmp-step_*"))

    def finished() -> list:  # complete checkpoints
        return list(ckpts.glob("step_*"))

    rng = random.Random(13)
    # (what to wait for, which save of this process, then a delay): at most 2 saves per process,
    # so that the 8 steps are not done before the last kill
    plan = [("save", started, rng.randint(1, 2), rng.uniform(0, 0.005)),
            ("step", finished, rng.randint(1, 2), rng.uniform(0.05, 0.3)),
            ("save", started, rng.randint(1, 2), rng.uniform(0, 0.005))]
    left_in_save = []
    for i, (what, seen, count, delay) in enumerate(plan):
        proc = _start(broken, data_cache, tmp_path / f"kill{i}.log")
        _wait_for(proc, seen, count, what)
        time.sleep(delay)
        _kill(proc)
        left_in_save.append(bool(started()))
    assert left_in_save[0] and left_in_save[2]  # those kills did land inside a save
    proc = cli(broken, *RUN)  # the same command, to the end
    assert "resumed from step" in proc.stdout
    assert [r["step"] for r in metrics(broken) if "loss" in r] == list(range(1, 9))
    assert losses(broken) == losses(unbroken)
    assert summary(broken)["weights_sha256"] == summary(unbroken)["weights_sha256"]
    assert summary(broken)["final_val_loss"] == summary(unbroken)["final_val_loss"]
    assert sorted(p.name for p in finished()) == ["step_0000007", "step_0000008"]
    assert not started()  # no tmp dir left


# a launcher whose disk is full for the step-4 checkpoint's shards, on every rank or only on rank
# FULL_DISK_RANK (a node's local disk)
FULL_DISK = '''
import builtins, errno, os
real_open = builtins.open
full_here = os.environ.get("FULL_DISK_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")

def full_disk_open(file, mode="r", *args, **kwargs):
    if (full_here and ".tmp-step_0000004" in str(file) and str(file).endswith(".distcp")
            and "w" in mode):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return real_open(file, mode, *args, **kwargs)

builtins.open = full_disk_open
if __name__ == "__main__":  # megatron's writer starts a multiprocessing manager, which imports this
    from attnres_train.train import main
    main()
'''


def test_a_full_disk_stops_the_run_with_one_line_and_the_same_command_resumes(cli, data_cache, tmp_path):
    run, launcher = tmp_path / "run", tmp_path / "full_disk.py"
    launcher.write_text(FULL_DISK)
    args = [f"hydra.run.dir={run}", f"data.cache_dir={data_cache}", *FAST, "train.steps=4", "train.save_interval=2"]
    proc = subprocess.run([sys.executable, str(launcher), *args], cwd=ROOT, env=_env(data_cache),
                          capture_output=True, text=True, timeout=600)
    ckpts = run / "checkpoints"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    head, tail = last.split(f"{ckpts}/.tmp-step_0000004/__0_", 1)
    assert head == (f"attnres-train: error: cannot save checkpoint {ckpts}/step_0000004: "
                    "[Errno 28] No space left on device: '")
    assert tail[1:] == (f".distcp'. Free space or fix the permissions on {ckpts}, then rerun the same "
                        f"command to resume from step 2 ({ckpts}/step_0000002 is intact)")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no tmp dir, step 2 kept
    assert not (run / "summary.json").exists()
    proc = cli(run, "train.steps=4", "train.save_interval=2")  # space freed: the same command
    assert "resumed from step 2" in proc.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004"]


def test_a_full_disk_on_one_of_two_ranks_stops_both_without_a_hang(data_cache, tmp_path):
    """DP=2 (gloo): rank 1 cannot write its shards; both ranks stop at that save, none waits."""
    run, launcher = tmp_path / "run", tmp_path / "full_disk.py"
    launcher.write_text(FULL_DISK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           f"hydra.run.dir={run}", f"data.cache_dir={data_cache}", *FAST, "train.steps=4", "train.save_interval=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(data_cache), "FULL_DISK_RANK": "1"}, capture_output=True,
                          text=True, timeout=300)  # a hang fails here
    ckpts = run / "checkpoints"
    assert proc.returncode != 0
    assert (f"attnres-train: error: cannot save checkpoint {ckpts}/step_0000004: rank 1: [Errno 28] No space "
            f"left on device: '{ckpts}/.tmp-step_0000004/__1_") in proc.stderr, proc.stderr[-3000:]
    # a rank exits with 1, with no traceback of the trainer (torchrun prints its own report, and
    # stops the other rank once the first has exited: every rank holds the same message)
    assert re.search(r"exitcode\s*: 1 ", proc.stderr)
    assert f'File "{ROOT / "attnres_train"}' not in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]

"""Resuming on another layout end to end (subprocess, CPU, gloo).

One run is moved to a new layout after every step (train.exit_interval=1 stops it, checkpointed,
and the next command resumes it): one process -> DP=2 -> PP=2 -> TP=2 -> one process, so DP goes
1 -> 2 -> 1, PP 1 -> 2 -> 1, TP 1 -> 2 -> 1, and 1 process -> 2 -> 1. megatron reshards the weights and the optimizer's model-space moments, the
RNG streams follow the model-parallel position, and the data position is in samples, so the moved
run follows the unbroken one-process run. Then what cannot resume says so: a changed global batch,
and a checkpoint that fails to load on another layout (never reported as corrupt, no fallback).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import losses, metrics

pytestmark = pytest.mark.slow

# (processes, layout overrides, the layout as the resume line names it) of each step's command
CHAIN = [(1, [], "world=1 tp=1 pp=1 vpp=1 ep=1 dp=1"),
         (2, [], "world=2 tp=1 pp=1 vpp=1 ep=1 dp=2"),
         (2, ["parallel.pp=2"], "world=2 tp=1 pp=2 vpp=1 ep=1 dp=1"),
         (2, ["parallel.tp=2"], "world=2 tp=2 pp=1 vpp=1 ep=1 dp=1"),
         (1, [], "world=1 tp=1 pp=1 vpp=1 ep=1 dp=1")]
STEPS = len(CHAIN)
GLOBAL_BATCH = 8  # FAST's train.global_batch_size
# Tolerance: that of the DP=2 test (2e-5 relative per step): only the order of fp32 reductions
# differs between the layouts.
RTOL = 2e-5


def test_a_run_moved_to_another_layout_every_step_follows_the_one_process_run(cli, tmp_path):
    unbroken, moved = tmp_path / "unbroken", tmp_path / "moved"
    cli(unbroken, f"train.steps={STEPS}")
    for i, (nproc, layout, now) in enumerate(CHAIN):
        out = cli(moved, f"train.steps={STEPS}", "train.exit_interval=1", *layout, nproc=nproc).stdout
        if i:
            before = CHAIN[i - 1][2]
            # the RNG streams map when only DP changed (same tp, pp, ep)
            same_position = [f for f in before.split() if f[:2] in ("tp", "pp", "ep")] == [
                f for f in now.split() if f[:2] in ("tp", "pp", "ep")]
            rng = ("restored (data-parallel replicas share them)" if same_position else
                   f"re-seeded from train.seed=1234 and step {i}")
            assert (f"checkpoint {moved}/checkpoints/step_{i:07d} was saved on {before}, resuming on {now}: "
                    f"weights and optimizer state resharded, RNG streams {rng}") in out, out
            assert f"resumed from step {i}" in out
        if i < STEPS - 1:
            assert f"stopped at step {i + 1}/{STEPS} (train.exit_interval=1): checkpoint saved" in out
    a, b = losses(unbroken), losses(moved)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= RTOL * abs(a[step]), (step, a[step], b[step])
    # the data position: every step started where the unbroken run's did (the samples each rank
    # takes from there are the same set on any DP size: tests/data)
    consumed = [r["consumed_samples"] for r in metrics(moved) if "loss" in r]
    assert consumed == [r["consumed_samples"] for r in metrics(unbroken) if "loss" in r]
    assert consumed == [GLOBAL_BATCH * s for s in range(1, STEPS + 1)]
    val = [r["val_loss"] for r in metrics(moved) if "val_loss" in r]
    val_0 = [r["val_loss"] for r in metrics(unbroken) if "val_loss" in r]
    assert len(val) == len(val_0) and all(abs(x - y) <= RTOL * y for x, y in zip(val, val_0))

    # a changed global batch cannot resume (the position and the schedule count in its batches):
    # one line naming the saved value, exit code 2, nothing written
    ckpts = moved / "checkpoints"
    kept = sorted(p.name for p in ckpts.iterdir())
    proc = cli(moved, f"train.steps={STEPS + 1}", "train.global_batch_size=16", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"attnres-train: error: train.global_batch_size=16: checkpoint {ckpts}/step_{STEPS:07d} was trained "
        f"with train.global_batch_size={GLOBAL_BATCH} ({STEPS} steps, {GLOBAL_BATCH * STEPS} samples). Resume "
        f"with train.global_batch_size={GLOBAL_BATCH} (any data-parallel size and micro-batch size that divide "
        "it), or start a new run (a new hydra.run.dir)")

    # a checkpoint that fails to load on another layout may be intact: no fallback to an older one
    for shard in (ckpts / f"step_{STEPS:07d}").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    proc = cli(moved, f"train.steps={STEPS + 1}", nproc=2, check=False)
    assert proc.returncode == 1
    assert (f"attnres-train: error: checkpoint {ckpts}/step_{STEPS:07d} was saved on {CHAIN[-1][2]} and "
            f"cannot be loaded on {CHAIN[1][2]}") in proc.stderr, proc.stderr[-3000:]
    assert "It is not known to be corrupt: resume on the layout it was saved on" in proc.stderr
    assert "falling back" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == kept  # nothing removed or rewritten
    # on the layout it was saved on, the same damage is a corrupt checkpoint: the older one serves
    out = cli(moved, f"train.steps={STEPS + 1}").stdout
    assert "falling back to the previous checkpoint" in out and f"resumed from step {STEPS - 1}" in out

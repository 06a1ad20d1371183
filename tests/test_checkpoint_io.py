"""checkpoint.save's durability, in process: fsync before the rename and the rename before the
rotation, stale tmp dirs removed, and a failing save (full disk, unwritable directory, failing
fsync) that leaves the previous checkpoint intact and raises one clear CheckpointSaveError."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import CheckpointException

from attnres_train import checkpoint
from attnres_train.config.schema import TrainConfig
from attnres_train.errors import CheckpointError, CheckpointSaveError
from attnres_train.train_state import TrainState
from parallel.groups import free_port
from tests.helpers import tiny_model_cfg
from tests.test_train_loop import _state

MODEL, TRAIN = tiny_model_cfg(), TrainConfig(steps=8, warmup_steps=2, global_batch_size=4)


def _trained() -> TrainState:
    """A state after one update, so that the optimizer holds moments (a resumable checkpoint)."""
    state = _state(MODEL, TRAIN)
    for p in state.model_chunks[0].parameters():
        p.main_grad.fill_(0.01)
    state.optimizer.step()
    return state


def _at_step(state, step: int):
    state.step, state.consumed_samples = step, step * TRAIN.global_batch_size
    return state


def _files(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _resumed_step(ckpt_root: Path) -> int:
    """The step a fresh state resumes at from ckpt_root (train.resume=auto): it loads."""
    fresh = _trained()  # other moments, overwritten by the load
    checkpoint.resume("auto", ckpt_root, fresh, MODEL, log=lambda *_: None)
    return fresh.step


def test_files_and_dirs_are_fsynced_before_the_rename_and_old_ones_rotated_after(mcore_world, tmp_path,
                                                                                  monkeypatch):
    state = _trained()
    checkpoint.save(tmp_path, _at_step(state, 1), model_cfg=MODEL, keep_last=1)
    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, Path.rename, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self), str(target)))
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    final = checkpoint.save(tmp_path, _at_step(state, 2), model_cfg=MODEL, keep_last=1)

    tmp, old = tmp_path / ".tmp-step_0000002", tmp_path / "step_0000001"
    at = {e: i for i, e in enumerate(events)}  # the last occurrence of each event
    renamed = at[("rename", str(tmp), str(final))]
    names = sorted(p.name for p in final.iterdir())
    assert {"meta.json", "common.pt", "metadata.json", ".metadata"} <= set(names)
    file_syncs = [at[("fsync", str(tmp / n))] for n in names]  # every file, meta.json included
    assert max(file_syncs) < at[("fsync", str(tmp))] < renamed  # files, then their dir, then the rename
    assert renamed < at[("fsync", str(tmp_path))] < at[("rmtree", str(old))]  # the parent before rotating
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_0000002"]


def test_a_successful_save_removes_tmp_dirs_left_by_a_killed_run(mcore_world, tmp_path):
    for stale in (".tmp-step_0000003", ".tmp-step_0000009"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "__0_0.distcp").write_bytes(b"half a shard")
    checkpoint.save(tmp_path, _at_step(_trained(), 1), model_cfg=MODEL, keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]


def _full_disk_save(*args, **kwargs):
    """dist_checkpointing.save on a full disk: half a shard written, then ENOSPC."""
    tmp = Path(args[1])
    (tmp / "__0_0.distcp").write_bytes(b"half a shard")
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "__0_0.distcp"))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_to_do(mcore_world, tmp_path, monkeypatch):
    state = _trained()
    previous = checkpoint.save(tmp_path, _at_step(state, 3), model_cfg=MODEL, keep_last=1)
    before = _files(previous)
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", _full_disk_save)
    with pytest.raises(CheckpointSaveError) as err:
        checkpoint.save(tmp_path, _at_step(state, 4), model_cfg=MODEL, keep_last=1)
    assert str(err.value) == (
        f"cannot save checkpoint {tmp_path}/step_0000004: [Errno 28] No space left on device: "
        f"'{tmp_path}/.tmp-step_0000004/__0_0.distcp'. Free space or fix the permissions on {tmp_path}, "
        f"then rerun the same command to resume from step 3 ({previous} is intact)")
    assert isinstance(err.value, CheckpointError) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003"]  # the tmp dir is gone
    assert _files(previous) == before
    monkeypatch.undo()
    assert _resumed_step(tmp_path) == 3


def test_a_write_error_inside_megatrons_writer_is_named(mcore_world, tmp_path, monkeypatch):
    """The real writer path: a shard file that cannot be written surfaces through megatron's
    worker and torch's CheckpointException as the OS error, not as a traceback."""
    state = _trained()
    checkpoint.save(tmp_path, _at_step(state, 1), model_cfg=MODEL, keep_last=0)
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".distcp") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(CheckpointSaveError) as err:
        checkpoint.save(tmp_path, _at_step(state, 2), model_cfg=MODEL, keep_last=0)
    monkeypatch.undo()
    assert err.value.reason.startswith(f"[Errno 28] No space left on device: '{tmp_path}/.tmp-step_0000002/__0_")
    assert "resume from step 1" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]
    assert _resumed_step(tmp_path) == 1


def test_an_unwritable_checkpoint_dir_is_an_error_before_anything_is_written(mcore_world, tmp_path):
    """A checkpoints dir that cannot be created (here under a file: root ignores chmod)."""
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointSaveError) as err:
        checkpoint.save(blocker / "checkpoints", _at_step(_trained(), 1), model_cfg=MODEL, keep_last=0)
    assert err.value.reason == f"[Errno 20] Not a directory: '{blocker}/checkpoints/.tmp-step_0000001'"
    assert err.value.fix == (f"Free space or fix the permissions on {blocker}, then rerun the same command to "
                             "start again (no checkpoint was saved yet)")


def test_a_failing_fsync_publishes_nothing_and_rotates_nothing(mcore_world, tmp_path, monkeypatch):
    state = _trained()
    checkpoint.save(tmp_path, _at_step(state, 1), model_cfg=MODEL, keep_last=1)

    def broken_disk(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "_fsync_file", broken_disk)
    with pytest.raises(CheckpointSaveError, match=r"Input/output error.*resume from step 1"):
        checkpoint.save(tmp_path, _at_step(state, 2), model_cfg=MODEL, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]  # not rotated out


def test_the_os_error_is_found_through_torchs_checkpoint_exception():
    """As the coordinator gets it: megatron's "Worker failure" RuntimeError, pickled through the
    gather (which drops its __cause__, the OSError), wrapped per failed rank."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/.tmp-step_0000002/__1_0.distcp")
        except OSError as exc:
            raise RuntimeError(f"Worker failure: {exc}") from exc
    except RuntimeError as worker:
        gathered = pickle.loads(pickle.dumps(worker))
    assert gathered.__cause__ is None
    wrapped = CheckpointException("write", {1: (gathered, None)})
    assert checkpoint._describe(wrapped) == (
        "rank 1: [Errno 28] No space left on device: '/ckpt/.tmp-step_0000002/__1_0.distcp'")
    assert checkpoint._describe(CheckpointException("write", {})) == (
        "CheckpointException: CheckpointException ranks:dict_keys([])")  # no detail: what there is


def _agree_worker(rank: int, port: int, root: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    final, tmp = Path(root) / "step_0000002", Path(root) / ".tmp-step_0000002"
    try:
        checkpoint._agree(final, tmp, "[Errno 13] Permission denied: 'x'" if rank == 1 else None)
        results.put((rank, "passed"))
    except CheckpointSaveError as exc:
        results.put((rank, str(exc)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    (tmp_path / ".tmp-step_0000002").mkdir()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, str(tmp_path), results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]  # neither hung nor crashed
    got = dict(results.get() for _ in procs)
    want = (f"cannot save checkpoint {tmp_path}/step_0000002: rank 1: [Errno 13] Permission denied: 'x'. "
            f"Free space or fix the permissions on {tmp_path}, then rerun the same command to start again "
            "(no checkpoint was saved yet)")
    assert got == {0: want, 1: want}
    assert not (tmp_path / ".tmp-step_0000002").exists()  # rank 0 removed the failed save's tmp dir

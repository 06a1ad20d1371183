"""Distributed checkpoints (megatron dist_checkpointing, torch_dist format), saved atomically.

Layout: <run_dir>/checkpoints/step_0000100/ holding megatron's shards plus `meta.json` (step,
consumed samples, model config). A save writes into `.tmp-step_…` and is renamed only once every
rank has finished and its files are fsynced, so a run killed mid-save (or a power loss) keeps its
previous checkpoint; old checkpoints are rotated out only after that. A save that fails (disk full,
no permission) removes its tmp dir and raises CheckpointSaveError on every rank. Resume takes the
newest complete checkpoint; if it fails to load, the error names it and the previous one is tried.

What is saved is a `TrainState` (model chunks, optimizer, LR schedule, step, consumed samples) plus
every rank's RNG streams. The unsplit initial weights (`train.layout_independent_init`) use the
same format: see save_unsplit_init.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import CheckpointException

from attnres_train.config.schema import ParallelConfig
from attnres_train.errors import CheckpointError, CheckpointSaveError, ConfigError
from attnres_train.model.model import build_model
from attnres_train.train_state import TrainState
from parallel.groups import barrier, global_rank, init_model_parallel, is_distributed

META = "meta.json"
# Model config keys that change parameter shapes: a checkpoint cannot be resumed across them.
SHAPE_KEYS = ("residual", "num_layers", "layer_pattern", "hidden_size", "vocab_size", "kda", "mla", "moe")
STRATEGY = ("torch_dist", 1)
# an OSError as str() writes it, quoted in another exception's message
_ERRNO_TEXT = re.compile(r"\[Errno \d+\][^\n]*")


def step_dirs(ckpt_root: Path) -> list:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.glob("step_*") if (p / META).is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(state: TrainState, *, is_loading: bool) -> dict:
    """The sharded dict megatron saves: model{i} per chunk, optimizer, scheduler, rng (per rank)."""
    model_sd = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(state.model_chunks)}
    sharded = dict(model_sd)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(
        model_sd if len(state.model_chunks) > 1 else model_sd["model0"], is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": "dp_reshardable"},
    )
    sharded["scheduler"] = state.scheduler.state_dict()
    world, rank = (dist.get_world_size(), global_rank()) if dist.is_initialized() else (1, 0)
    sharded["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sharded


def save(ckpt_root: Path, state: TrainState, *, model_cfg, keep_last: int) -> Path:
    """Save `state` as <ckpt_root>/step_<state.step>; keep the newest `keep_last` (0: all).
    A collective: every rank calls it.

    Durable and atomic: the shards go to `.tmp-step_…`, whose files and directory are fsynced
    before the rename to `step_…` (then the parent is fsynced); only then are old checkpoints
    rotated out and stale `.tmp-step_*` dirs of killed runs removed. A failure on any rank (an
    OSError: disk full, no permission) removes the tmp dir, leaves every older checkpoint as it
    was and raises CheckpointSaveError on every rank (none is left waiting in a collective)."""
    final = ckpt_root / f"step_{state.step:07d}"
    tmp = ckpt_root / f".tmp-step_{state.step:07d}"
    rank0 = global_rank() == 0
    meta = {"step": state.step, "consumed_samples": state.consumed_samples,
            "model": dataclasses.asdict(model_cfg)}
    # each phase ends in an agreement (an all-gather), where the barriers were: every rank learns
    # whether some rank failed, and all raise together
    _agree(final, tmp, _attempt(_prepare_tmp, tmp) if rank0 else None)
    sharded = _sharded_state(state, is_loading=False)
    _agree(final, tmp, _attempt(dist_checkpointing.save, sharded, str(tmp), sharded_strategy=STRATEGY))
    _agree(final, tmp, _attempt(_commit, tmp, final, meta, keep_last) if rank0 else None)
    return final


def _attempt(fn, *args, **kwargs) -> Optional[str]:
    """Run one phase of a save on this rank: None if it succeeded, else what failed (one line).
    Only I/O failures are caught (OSError; torch.distributed.checkpoint's CheckpointException,
    which wraps a write error of any rank); anything else is a bug and keeps its traceback."""
    try:
        fn(*args, **kwargs)
        return None
    except (OSError, CheckpointException) as exc:
        return _describe(exc)


def _describe(exc: BaseException) -> str:
    """The OS error behind a save failure, e.g. "[Errno 28] No space left on device: '<file>'".
    It may sit inside torch's CheckpointException (its failures: each failed rank's wrapped
    exception, named "rank r: …"), and there only as text: megatron's writer re-raises its worker's
    OSError as RuntimeError("Worker failure: <the OSError>"), and the gather to the coordinator
    pickles that, which drops the __cause__."""
    todo, seen = [("", exc)], set()
    while todo:
        where, e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return where + str(e)
        if isinstance(e, CheckpointException):
            todo += [(f"rank {rank}: ", wrapped[0]) for rank, wrapped in sorted(e.failures.items())]
        else:
            quoted = _ERRNO_TEXT.search(str(e))
            if quoted:
                return where + quoted.group(0)
        todo += [(where, e.__cause__), (where, e.__context__)]
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _agree(final: Path, tmp: Path, failure: Optional[str]) -> None:
    """A collective: every rank passes what failed on it (None: nothing) and, if any rank failed,
    all of them raise the same CheckpointSaveError once rank 0 has removed the tmp dir. The default
    group serves (gloo on CPU, nccl on GPU: all_gather_object works on both), so no extra group."""
    if is_distributed():
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    else:
        failures = [failure]
    failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not failed:
        return
    if global_rank() == 0:  # every rank has stopped writing: nothing more lands in the tmp dir
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()  # the tmp dir is gone before any rank reads what is left
    # an OS error's text beats a rank that only learnt that another rank failed
    rank, reason = next(((r, f) for r, f in failed if "Errno" in f), failed[0])
    if len(failures) == 1:  # one process: no rank to name
        reason = reason.removeprefix("rank 0: ")
    elif not reason.startswith("rank "):
        reason = f"rank {rank}: {reason}"
    raise CheckpointSaveError(final, reason, _save_fix(final.parent))


def _save_fix(ckpt_root: Path) -> str:
    """What to do after a failed save: the checkpoint the same command resumes from."""
    try:
        kept = step_dirs(ckpt_root)
    except OSError:  # the directory itself is unreadable
        kept = []
    where = (f"resume from step {int(kept[-1].name.split('_')[1])} ({kept[-1]} is intact)" if kept
             else "start again (no checkpoint was saved yet)")
    anchor = ckpt_root if ckpt_root.is_dir() else ckpt_root.parent
    return f"Free space or fix the permissions on {anchor}, then rerun the same command to {where}"


def _prepare_tmp(tmp: Path) -> None:
    """An empty tmp dir for this save (rank 0); a new checkpoints dir is fsynced into its parent."""
    ckpt_root = tmp.parent
    new_root = not ckpt_root.is_dir()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if new_root:
        _fsync_dir(ckpt_root.parent)


def _commit(tmp: Path, final: Path, meta: dict, keep_last: int) -> None:
    """Rank 0, once every rank's shards are written: meta.json, fsync, rename, fsync, then rotate.

    fsync order: every file of the tmp dir and the dir itself, so that the rename never publishes
    a checkpoint whose contents are not on disk yet; the parent after the rename, so that the
    rename survives a power loss before an older checkpoint is deleted. Rank 0 fsyncs the whole dir:
    megatron's writer already fsyncs each shard on the rank that wrote it (what counts on a shared
    file system), and fsyncing an already clean file is cheap, so one rank covers the rest
    (common.pt, metadata.json, meta.json) without knowing who wrote what."""
    ckpt_root = tmp.parent
    (tmp / META).write_text(json.dumps(meta, indent=2))
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(tmp)
    if final.exists():  # an older save of the same step (e.g. after a fallback): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    for old in step_dirs(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename, a new file). Some file systems cannot (EINVAL):
    there the rename is as durable as they make it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def check_compatible(meta: dict, model_cfg, where: Path) -> None:
    saved = meta["model"]
    current = dataclasses.asdict(model_cfg)
    diffs = [k for k in SHAPE_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"model.{diffs[0]}", current.get(diffs[0]),
            f"checkpoint {where} was saved with a different model shape ({detail}). Resume with the "
            "same model config, or start a new run (train.resume=none and a new hydra.run.dir)",
        )


def load_latest(ckpt_root: Path, state: TrainState, model_cfg, *, log=print) -> Optional[dict]:
    """Load the newest loadable checkpoint under ckpt_root into `state` (falling back to older ones).

    Returns its meta dict, or None when there is no checkpoint (`state` is then untouched).
    """
    candidates = step_dirs(ckpt_root)
    for bad in sorted(ckpt_root.glob(".tmp-step_*")) if ckpt_root.is_dir() else []:
        log(f"ignoring incomplete checkpoint {bad} (the run stopped while saving it)")
    errors = []
    for path in reversed(candidates):
        try:
            return load(path, state, model_cfg)
        except (ConfigError, KeyboardInterrupt, SystemExit):
            raise
        # torch.distributed.checkpoint's CheckpointException derives from BaseException
        except BaseException as exc:  # corrupt or incomplete: name it and try the previous one
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            log(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                "falling back to the previous checkpoint")
    if errors:
        raise CheckpointError("no loadable checkpoint under " + str(ckpt_root) + ":\n" + "\n".join(errors))
    return None


def resume(how: str, ckpt_root: Path, state: TrainState, model_cfg, *, log=print) -> Optional[dict]:
    """train.resume: "auto" loads the newest loadable checkpoint under ckpt_root (none there: a
    fresh start), "none" starts fresh, anything else is the checkpoint directory to load.
    Returns the loaded checkpoint's meta dict, or None for a fresh start."""
    if how == "auto":
        return load_latest(ckpt_root, state, model_cfg, log=log)
    if how != "none":
        return load(Path(how), state, model_cfg)
    return None


def load(path: Path, state: TrainState, model_cfg) -> dict:
    """Restore `state` (weights, optimizer, schedule, step, consumed samples) and this rank's RNG
    streams from the checkpoint at `path`; returns its meta dict."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing")
    meta = json.loads(meta_file.read_text())
    check_compatible(meta, model_cfg, path)
    template = _sharded_state(state, is_loading=True)
    loaded = dist_checkpointing.load(template, str(path), sharded_strategy=STRATEGY)
    for i, chunk in enumerate(state.model_chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    with torch.no_grad():  # distrib optimizer copies into views of leaf params
        state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng"])
    state.step, state.consumed_samples = meta["step"], meta["consumed_samples"]
    return meta


# -- unsplit initial weights (train.layout_independent_init) ---------------------------------------
def unsplit_init_dir(scratch_dir: Optional[Path]) -> Path:
    """One directory every rank agrees on: under the run dir (shared by the nodes, like the
    checkpoints), or a temporary one made by rank 0 (single node)."""
    path = [str(Path(scratch_dir) / ".unsplit-init") if scratch_dir else
            (tempfile.mkdtemp(prefix="attnres-init-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def save_unsplit_init(model_cfg, parallel_cfg, dtype, seed: int, path: Path) -> None:
    """The unsplit model's initial weights (what one process gets from `seed`) as a megatron
    distributed checkpoint, so that any TP/PP/EP layout can start from them: dist_checkpointing
    reshards (TP slices, expert ranges, pipeline layer ranges), which a name mapping cannot.
    Every rank builds the whole model under TP=PP=EP=1 groups; the run's groups are restored after."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    ps.destroy_model_parallel()
    init_model_parallel(ParallelConfig())
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    reference = build_model(model_cfg, params_dtype=dtype)
    dist_checkpointing.save({"model": reference.sharded_state_dict()}, str(path), sharded_strategy=STRATEGY)
    del reference
    ps.destroy_model_parallel()
    init_model_parallel(parallel_cfg)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def load_unsplit_init(chunks: list, path: Path) -> None:
    """Load each chunk's shard of save_unsplit_init's checkpoint, then remove it."""
    for chunk in chunks:
        loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(path),
                                         sharded_strategy=STRATEGY)
        result = chunk.load_state_dict(loaded["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"unsplit init: missing {missing}, unexpected {result.unexpected_keys}")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
